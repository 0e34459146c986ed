"""The tokenizer a base gets: CLIP ViT-L/14's real BPE for sd15 and single files, byte-level for tiny,
``--tokenizer DIR`` over both; checked against CLIP's own algorithm on the shipped BPE file."""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import regex
from transformers import CLIPTokenizer

from loramgr.cli import main
from loramgr.models.architectures import architecture
from loramgr.models.tokenizer import (
    CLIP_VOCAB_SIZE,
    MERGES_RESOURCE,
    load_tokenizer,
    write_byte_level_tokenizer,
    write_clip_tokenizer,
    write_tokenizer,
)

BOS_ID, EOS_ID = 49406, 49407


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip") / "tokenizer"
    write_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def clip(clip_folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(clip_folder, local_files_only=True)


# An independent implementation: CLIP's SimpleTokenizer (openai/CLIP, clip/simple_tokenizer.py),
# without ftfy, reading the shipped BPE file itself.


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


class SimpleTokenizer:
    def __init__(self, bpe_gz: bytes):
        self.byte_encoder = _bytes_to_unicode()
        merges = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                 r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return [token + "</w>"]
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(text)).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer(resources.files("loramgr.data").joinpath(MERGES_RESOURCE).read_bytes())


PROMPTS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, looking at viewer, (smile:1.2), [cherry blossoms]",
    "A Blindbox-style TOY of an astronaut riding a horse on Mars",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry",
    "Don't stop; it's 3:45pm -- the café's crème brûlée costs €12.50!!",
    "photo of a 🐱 and a 🐶, 8k uhd, dslr, f/1.8, ISO-100",
    "  multiple   spaces\tand\ttabs\nnewline  ",
    "Ünïcödé Ελληνικά 日本語のテキスト, pneumonoultramicroscopicsilicovolcanoconiosis",
]


def test_a_photo_of_a_cat(clip):
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip) == CLIP_VOCAB_SIZE
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert clip.model_max_length == 77


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_clips_own_algorithm(clip, reference, prompt):
    ids = reference.encode(prompt)
    assert len(ids) > 1
    assert clip(prompt).input_ids == [BOS_ID, *ids, EOS_ID]


def test_padded_batch_as_the_pipeline_asks(clip):
    """SD1.5 pads with <|endoftext|> to 77 and truncates to 77 keeping EOS last."""
    batch = clip(["a photo of a cat", "word " * 100], padding="max_length", max_length=77, truncation=True).input_ids
    assert batch[0] == [49406, 320, 1125, 539, 320, 2368] + [EOS_ID] * 71
    assert len(batch[1]) == 77 and batch[1][0] == BOS_ID and batch[1][-1] == EOS_ID


def test_shipped_file_is_the_recorded_one():
    """The package data is what loramgr/data/README.md says it is (provenance, sha256)."""
    data = gzip.decompress(resources.files("loramgr.data").joinpath(MERGES_RESOURCE).read_bytes())
    notes = resources.files("loramgr.data").joinpath("README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(data).hexdigest() in notes
    assert "MIT" in notes and "open_clip_torch" in notes
    assert len(data.decode("utf-8").split("\n")) == 1 + 48894 + 1  # header, merges, final newline


def test_vocab_json_is_clips(clip_folder):
    vocab = json.loads((clip_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == CLIP_VOCAB_SIZE and sorted(vocab.values()) == list(range(CLIP_VOCAB_SIZE))
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["cat</w>"] == 2368
    merges = (clip_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894


def test_sd15_gets_clip_and_tiny_byte_level(tmp_path):
    write_tokenizer(tmp_path / "sd15", architecture("sd15"))
    write_tokenizer(tmp_path / "tiny", architecture("tiny"))
    sd15 = CLIPTokenizer.from_pretrained(tmp_path / "sd15")
    tiny = CLIPTokenizer.from_pretrained(tmp_path / "tiny")
    assert sd15("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tiny) == architecture("tiny").vocab_size == 520
    assert max(tiny("a photo of a cat").input_ids) < 520


def test_single_file_config_folder_holds_clip_for_sd15(tmp_path):
    """The config folder diffusers' ``from_single_file`` reads the tokenizer from (no model is built)."""
    from loramgr.models.loading import _write_pipeline_configs

    _write_pipeline_configs(architecture("sd15"), tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_load_tokenizer_accepts_a_pipeline_folder_and_caps_the_length(tmp_path, clip_folder):
    config = json.loads((clip_folder / "tokenizer_config.json").read_text())
    folder = tmp_path / "pipe" / "tokenizer"
    write_clip_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 10**30}))
    tokenizer = load_tokenizer(tmp_path / "pipe", vocab_size=CLIP_VOCAB_SIZE, max_length=77)
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == CLIP_VOCAB_SIZE


def _bad_vocab(d: Path) -> Path:
    write_clip_tokenizer(d / "tok")
    (d / "tok" / "vocab.json").write_text("{not json")
    return d / "tok"


def _clip_for_tiny(d: Path) -> Path:
    write_clip_tokenizer(d / "tok")
    return d / "tok"


@pytest.mark.parametrize("make_bad, reason", [
    (lambda d: d / "missing", "no such folder"),
    (lambda d: (d / "vocab.json").write_text("{}") and d / "vocab.json", "not a folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "not a CLIPTokenizer folder"),
    (_bad_vocab, "not a readable CLIPTokenizer"),
    (_clip_for_tiny, "49408 ids but the text encoder only 520"),
])
def test_bad_tokenizer_folder_exit_2_with_one_line(tmp_path, capsys, make_bad, reason):
    src = make_bad(tmp_path)
    code = main(["--home", str(tmp_path / "ws"), "export", "--name", "bad", "--arch", "tiny", "--random",
                 "--tokenizer", str(src)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert src.name in err and reason.lower() in err.lower(), err
    base_models = tmp_path / "ws" / "base_models"
    assert not base_models.exists() or not any(base_models.iterdir())


def test_tokenizer_override_is_exported(tmp_path):
    """``--tokenizer DIR`` replaces the model's tokenizer: the exported base holds it and the manifest names it."""
    from loramgr.export import export_base
    from loramgr.manifest import Manifest
    from loramgr.workspace import Workspace

    write_byte_level_tokenizer(tmp_path / "tok", 516)  # tiny's own has 520 ids (BOS/EOS 518/519, here 514/515)
    ws = Workspace.resolve(tmp_path / "ws")
    export_base(ws, "t", arch="tiny", seed=0, tokenizer=tmp_path / "tok")
    exported = CLIPTokenizer.from_pretrained(ws.base_dir("t") / "tokenizer", local_files_only=True)
    override = CLIPTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert len(exported) == 516
    assert exported("a photo of a cat").input_ids == override("a photo of a cat").input_ids
    assert exported("a photo of a cat").input_ids[0] == 514
    assert Manifest.load(ws.base_dir("t")).source["tokenizer"] == str((tmp_path / "tok").resolve())
