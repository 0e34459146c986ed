"""A1111 prompts (loramgr/pipeline/prompts.py): emphasis, BREAK, chunks of 75, embeddings.

References: the worked examples of A1111's ``parse_prompt_attention`` docstring as literals,
chunk layouts written out by hand from A1111's rules, and tests/a1111_conditioning.py (a
reference written from A1111's sources) run on the tiny text encoder.
"""

from __future__ import annotations

from contextlib import contextmanager

import a1111_conditioning as a1111
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from loramgr.errors import LoramgrError
from loramgr.models.architectures import architecture, randomize_
from loramgr.models.tokenizer import CLIP_VOCAB_SIZE, write_byte_level_tokenizer, write_clip_tokenizer
from loramgr.pipeline.prompts import apply_emphasis, parse_attention, plan_prompt

BOS, EOS, COMMA = 49406, 49407, 267  # CLIP ViT-L/14's ids
CAT, DOG = 2368, 1929  # "cat</w>", "dog</w>": one token each


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    write_byte_level_tokenizer(folder, architecture("tiny").vocab_size)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _text_encoder(vocab_size: int) -> CLIPTextModel:
    """The tiny text encoder (seed 0), with ``vocab_size`` token embeddings."""
    model = CLIPTextModel(CLIPTextConfig(**{**architecture("tiny").text_encoder, "vocab_size": vocab_size})).eval()
    randomize_({"text_encoder": model}, 0)
    return model


@pytest.fixture(scope="module")
def tiny_encoder() -> CLIPTextModel:
    return _text_encoder(architecture("tiny").vocab_size)


@pytest.fixture(scope="module")
def clip_encoder() -> CLIPTextModel:
    """The tiny encoder widened to CLIP's 49408 ids, so the real tokenizer's prompts can be encoded."""
    return _text_encoder(CLIP_VOCAB_SIZE)


def words(*parts: tuple[str, int]) -> str:
    """``("cat", 3), (",", 1)`` -> ``"cat cat cat ,"``."""
    return " ".join(word for word, n in parts for _ in range(n))


def padded(tokens: list[int]) -> list[int]:
    return [BOS, *tokens, *[EOS] * (75 - len(tokens)), EOS]


# -- parsing: A1111's docstring examples, literally -------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parse_attention_docstring_examples(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("", [("", 1.0)]),
    ("[a] b", [("a", 1 / 1.1), (" b", 1.0)]),
    ("(a [b)", [("a ", 1.1), ("b", 1.1 / 1.1)]),  # ")" closes "(", the "[" stays open to the end
    ("(\\(x\\):0.5)", [("(x)", 0.5)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight closes nothing without "(": text
    ("(x:-1)", [("x", -1.0)]),
    ("x\\y", [("xy", 1.0)]),  # a lone backslash stands for nothing
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAKb BREAK", [("a BREAKb", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # scaled: a literal word then
])
def test_parse_attention_rules(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])
    assert parse_attention(text) == [tuple(p) for p in a1111.parse_prompt_attention(text)]


@pytest.mark.parametrize("text, reason", [
    ("a (b:1.2.3)", "':1.2.3)': emphasis weight '1.2.3' is not a number"),
    ("a (b:" + "9" * 400 + ")", "not a finite number"),
])
def test_parse_attention_refuses_bad_weights(text, reason):
    with pytest.raises(LoramgrError) as err:
        parse_attention(text, what="negative_prompt")
    message = str(err.value)
    assert message.startswith("negative_prompt: ") and "\n" not in message
    assert reason in message


# -- chunks --------------------------------------------------------------------------------

def test_75_tokens_fill_one_chunk_and_76_open_a_second(clip):
    plan = plan_prompt(words(("cat", 75)), clip)
    assert [c.ids for c in plan.chunks] == [padded([CAT] * 75)]
    assert plan.tokens == 75
    plan = plan_prompt(words(("cat", 76)), clip)
    assert [c.ids for c in plan.chunks] == [padded([CAT] * 75), padded([CAT])]
    assert plan.tokens == 76
    assert all(c.weights == [1.0] * 77 for c in plan.chunks)


def test_empty_prompt_is_one_empty_chunk(clip):
    plan = plan_prompt("", clip)
    assert [c.ids for c in plan.chunks] == [[BOS] + [EOS] * 76]
    assert plan.tokens == 0 and plan.embeddings == [] and plan.chunks[0].vectors == {}


@pytest.mark.parametrize("cats, moved", [(70, True), (55, True), (54, False), (50, False)])
def test_comma_backtrack(clip, cats, moved):
    """A full chunk with a comma among its last 20 tokens sends what follows the comma on."""
    plan = plan_prompt(words(("cat", cats), (",", 1), ("dog", 80 - cats)), clip)
    dogs_in_first = 75 - cats - 1
    if moved:
        first, second = [CAT] * cats + [COMMA], [DOG] * (80 - cats)
        tokens = 75 + 80 - cats
    else:
        first, second = [CAT] * cats + [COMMA] + [DOG] * dogs_in_first, [DOG] * (80 - cats - dogs_in_first)
        tokens = 81
    assert [c.ids for c in plan.chunks] == [padded(first), padded(second)]
    assert plan.tokens == tokens


def test_comma_as_76th_token_starts_the_next_chunk(clip):
    plan = plan_prompt(words(("cat", 75), (",", 1), ("dog", 1)), clip)
    assert [c.ids for c in plan.chunks] == [padded([CAT] * 75), padded([COMMA, DOG])]


def test_break_closes_the_chunk(clip):
    plan = plan_prompt("cat BREAK dog", clip)
    assert [c.ids for c in plan.chunks] == [padded([CAT]), padded([DOG])]
    assert plan.tokens == 76  # a chunk closed by BREAK counts 75
    plan = plan_prompt("BREAK cat", clip)  # an empty first chunk, as A1111 makes it
    assert [c.ids for c in plan.chunks] == [padded([]), padded([CAT])]
    plan = plan_prompt("(cat BREAK dog)", clip)  # inside brackets BREAK is the word, weighted -1.1
    assert len(plan.chunks) == 1 and plan.chunks[0].weights[1:4] == pytest.approx([1.1, -1.1, 1.1])


def test_emphasis_weights_follow_their_tokens(clip):
    plan = plan_prompt("a (cat:1.3) [dog]", clip)
    chunk = plan.chunks[0]
    assert chunk.ids[:5] == [BOS, 320, CAT, DOG, EOS]
    assert chunk.weights[:5] == pytest.approx([1.0, 1.0, 1.3, 1 / 1.1, 1.0])
    assert chunk.weights[5:] == [1.0] * 72


def _vectors(n: int, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def test_embedding_replaces_its_name_with_its_vectors_and_takes_emphasis(clip):
    emb = {"bad-hands": _vectors(1, seed=1), "bad-hands-5": _vectors(2, seed=2)}
    plan = plan_prompt("cat (bad-hands-5:1.4) dog bad-hands", clip, emb)
    chunk = plan.chunks[0]
    assert chunk.ids[:7] == [BOS, CAT, 0, 0, DOG, 0, EOS]  # the longest name matches first
    assert chunk.weights[:7] == pytest.approx([1.0, 1.0, 1.4, 1.4, 1.0, 1.0, 1.0])
    assert sorted(chunk.vectors) == [2, 3, 5]
    np.testing.assert_array_equal(np.stack([chunk.vectors[2], chunk.vectors[3]]), emb["bad-hands-5"])
    np.testing.assert_array_equal(chunk.vectors[5], emb["bad-hands"][0])
    assert plan.embeddings == ["bad-hands-5", "bad-hands"] and plan.tokens == 5
    table = np.arange(CLIP_VOCAB_SIZE * 32, dtype=np.float32).reshape(CLIP_VOCAB_SIZE, 32)
    rows = chunk.token_embeddings(table)
    np.testing.assert_array_equal(rows[[0, 1, 4, 6]], table[[BOS, CAT, DOG, EOS]])
    np.testing.assert_array_equal(rows[[2, 3, 5]], np.concatenate([emb["bad-hands-5"], emb["bad-hands"]]))


@pytest.mark.parametrize("cats, split", [(72, False), (73, True)])
def test_embedding_never_straddles_a_chunk(clip, cats, split):
    plan = plan_prompt(words(("cat", cats), ("emb", 1)), clip, {"emb": _vectors(3)})
    if split:
        assert [c.ids for c in plan.chunks] == [padded([CAT] * cats), padded([0, 0, 0])]
        assert plan.chunks[0].vectors == {} and sorted(plan.chunks[1].vectors) == [1, 2, 3]
        assert plan.tokens == 78
    else:
        assert [c.ids for c in plan.chunks] == [padded([CAT] * cats + [0, 0, 0])]
        assert sorted(plan.chunks[0].vectors) == [73, 74, 75]


def test_comma_backtrack_leaves_embeddings_in_the_closed_chunk(clip):
    """A1111's chunker moves the tokens after the comma but not its embedding fixes: the vectors
    land on the closed chunk's padding, the moved placeholders keep token 0 (docs/prompts.md)."""
    plan = plan_prompt(words(("cat", 60), (",", 1), ("emb", 1), ("dog", 12)), clip, {"emb": _vectors(3)})
    first, second = plan.chunks
    assert first.ids == padded([CAT] * 60 + [COMMA]) and sorted(first.vectors) == [62, 63, 64]
    assert second.ids == padded([0, 0, 0] + [DOG] * 12) and second.vectors == {}


def test_embeddings_are_refused_when_they_cannot_fit_a_chunk(clip):
    with pytest.raises(LoramgrError, match=r"prompt: embedding 'huge' has shape \[76, 32\]"):
        plan_prompt("a huge cat", clip, {"huge": _vectors(76)})
    assert plan_prompt("a cat", clip, {"huge": _vectors(76)}).tokens == 2  # unused: no matter


def test_limit_names_the_field_count_and_option(clip):
    assert len(plan_prompt(words(("cat", 225)), clip).chunks) == 3
    with pytest.raises(LoramgrError) as err:
        plan_prompt(words(("cat", 226)), clip, what="negative_prompt")
    assert str(err.value) == ("negative_prompt: 226 tokens, over the limit of 225 (3 chunks of 75): shorten it, "
                              "or raise the limit with --max-prompt-tokens")
    with pytest.raises(LoramgrError, match="prompt: 151 tokens, over the limit of 150 \\(2 chunks of 75\\)"):
        plan_prompt(words(("cat", 1), ("BREAK", 1), ("cat", 76)), clip, max_tokens=150)  # BREAK pads to 75
    assert plan_prompt(words(("cat", 1), ("BREAK", 1), ("cat", 75)), clip, max_tokens=150).tokens == 150


def test_plain_syntax_is_diffusers_tokenization(clip):
    text = "a (cat:1.3), BREAK [dog] emb"
    plan = plan_prompt(text, clip, {"emb": _vectors(2)}, syntax="plain")
    expected = clip(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert [c.ids for c in plan.chunks] == [expected]
    assert plan.chunks[0].weights == [1.0] * 77 and plan.chunks[0].vectors == {} and plan.embeddings == []
    with pytest.raises(LoramgrError, match="prompt: 76 tokens; with prompt syntax 'plain' a prompt holds at most 75"):
        plan_prompt(words(("cat", 76)), clip, syntax="plain")
    with pytest.raises(LoramgrError, match="prompt: 3 tokens, over the limit of 2: shorten it"):
        plan_prompt("cat cat cat", clip, syntax="plain", max_tokens=2)
    with pytest.raises(LoramgrError, match="syntax 'compel' is not one of a1111, plain"):
        plan_prompt("cat", clip, syntax="compel")


# -- emphasis -------------------------------------------------------------------------------

def test_apply_emphasis_scales_tokens_and_restores_each_chunks_mean():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 77, 32, generator=gen) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3], weights[1, 10:12] = 1.5, 0.5
    out = apply_emphasis(hidden, weights)
    for row in range(2):
        scaled = hidden[row] * weights[row][:, None]
        expected = scaled * (hidden[row].mean() / scaled.mean())
        torch.testing.assert_close(out[row], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(out[row].mean(), hidden[row].mean())
        torch.testing.assert_close(apply_emphasis(hidden[row], weights[row]), out[row])
    assert torch.equal(apply_emphasis(hidden, torch.ones(2, 77)), hidden)


# -- the reference, on the tiny text encoder --------------------------------------------------

def _direct(model, tokenizer, text: str, clip_skip: int = 1) -> torch.Tensor:
    """CLIP's output for a prompt of at most 75 tokens, tokenized as diffusers does."""
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return model.final_layer_norm(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state


def test_reference_without_emphasis_is_plain_clip(tiny_encoder, tiny_tokenizer):
    for clip_skip in (1, 2):
        expected = _direct(tiny_encoder, tiny_tokenizer, "a photo of a cat", clip_skip)
        got = a1111.conditioning(tiny_encoder, tiny_tokenizer, "a photo of a cat", clip_skip=clip_skip)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_reference_emphasis_changes_only_what_the_rule_says(tiny_encoder, tiny_tokenizer):
    plain = _direct(tiny_encoder, tiny_tokenizer, "a cat")[0]
    cat = len(tiny_tokenizer("a", add_special_tokens=False).input_ids) + 1
    count = len(tiny_tokenizer("cat", add_special_tokens=False).input_ids)
    weights = torch.ones(77)
    weights[cat:cat + count] = 1.5
    scaled = plain * weights[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    got = a1111.conditioning(tiny_encoder, tiny_tokenizer, "a (cat:1.5)")[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_reference_concatenates_chunks(tiny_encoder, tiny_tokenizer):
    first, second = "cat " * 20, "dog " * 5  # 60 and 15 tokens of the byte-level tokenizer
    got = a1111.conditioning(tiny_encoder, tiny_tokenizer, f"{first} BREAK {second}")
    expected = torch.cat([_direct(tiny_encoder, tiny_tokenizer, first), _direct(tiny_encoder, tiny_tokenizer, second)],
                         dim=1)
    assert got.shape == (1, 154, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


class _Given(torch.nn.Module):
    """A token embedding that returns fixed rows (the plan's), whatever the ids."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows.expand(input_ids.shape[0], -1, -1)


@contextmanager
def _token_embeddings(model, rows: torch.Tensor):
    original = model.embeddings.token_embedding
    model.embeddings.token_embedding = _Given(rows)
    try:
        yield
    finally:
        model.embeddings.token_embedding = original


def _encode_plan(model, plan, clip_skip: int) -> torch.Tensor:
    """loramgr's path: the plan's token embeddings, transformers' position embeddings and
    encoder, CLIP skip, then apply_emphasis per chunk, chunks concatenated."""
    table = model.embeddings.token_embedding.weight.detach().numpy()
    outs = []
    for chunk in plan.chunks:
        with torch.no_grad(), _token_embeddings(model, torch.from_numpy(chunk.token_embeddings(table))):
            out = model(input_ids=torch.tensor([chunk.ids]), output_hidden_states=True)
            hidden = model.final_layer_norm(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state
        outs.append(apply_emphasis(hidden[0], torch.tensor(chunk.weights)))
    return torch.cat(outs)[None]


EMBEDDINGS = {"tok": _vectors(2, seed=3), "longer-name": _vectors(3, seed=4), "x": _vectors(1, seed=5),
              "long-vectors": _vectors(40, seed=6)}
PROMPTS = [
    "a photo of a cat",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "masterpiece, (tok:1.2), a [longer-name] x BREAK second chunk, x",
    ", ".join(["cat dog"] * 40),  # long, with commas: backtracking
    words(("cat", 70), ("long-vectors", 1), ("dog", 3)),  # an embedding pushed to the next chunk
    words(("cat", 60), (",", 1), ("tok", 1), ("dog", 14)),  # backtracking over an embedding
    "",
    "BREAK cat",
    "(a BREAK b) \\(literal\\) (neg:-0.5)",
]


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_plan_and_emphasis_match_the_reference(clip, clip_encoder, tiny_tokenizer, tiny_encoder, prompt, clip_skip):
    for tokenizer, model in ((clip, clip_encoder), (tiny_tokenizer, tiny_encoder)):
        plan = plan_prompt(prompt, tokenizer, EMBEDDINGS, max_tokens=10 * 75)
        expected = a1111.conditioning(model, tokenizer, prompt, EMBEDDINGS, clip_skip=clip_skip)
        chunks, count = a1111.tokenize_line(prompt, tokenizer, a1111.EmbeddingDatabase(tokenizer, EMBEDDINGS))
        assert [c.ids for c in plan.chunks] == [c.tokens for c in chunks]
        assert plan.tokens == count
        torch.testing.assert_close(_encode_plan(model, plan, clip_skip), expected, rtol=0, atol=1e-5)
