"""A reference for A1111's conditioning, written from AUTOMATIC1111's sources and independent of
``loramgr.pipeline.prompts``: the tests compare loramgr's prompt plan with it.

Each part follows the A1111 function it names, step for step, with A1111's default options
(emphasis "Original", ``comma_padding_backtrack`` 20, SD1's padding with the end token):
``modules/prompt_parser.py`` ``parse_prompt_attention``, ``modules/sd_hijack_clip.py``
``tokenize_line`` / ``process_tokens`` / ``encode_with_transformers`` / ``forward``,
``modules/sd_emphasis.py`` ``EmphasisOriginal``, ``modules/sd_hijack.py``
``EmbeddingsWithFixes`` and ``modules/textual_inversion/textual_inversion.py``
``EmbeddingDatabase`` (``register_embedding_by_name``, ``find_embedding_at_position``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager

import torch

re_attention = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:([+-]?[.\d]+)\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]``, BREAK as ``["BREAK", -1]`` (prompt_parser.parse_prompt_attention)."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        token = m.group(0)
        weight = m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(re_break, token)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


class PromptChunk:
    def __init__(self):
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[tuple[int, str]] = []  # PromptChunkFix(offset, embedding name)


class EmbeddingDatabase:
    """Embeddings registered by the token ids of their names, longest first per first id."""

    def __init__(self, tokenizer, embeddings: Mapping[str, torch.Tensor]):
        self.vectors = dict(embeddings)
        self.ids_lookup: dict[int, list] = {}
        for name in sorted(embeddings):
            ids = tokenizer([name], add_special_tokens=False)["input_ids"][0]
            first_id = ids[0]
            lookup = self.ids_lookup.get(first_id, []) + [(ids, name)]
            self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)

    def find_embedding_at_position(self, tokens: list[int], offset: int):
        for ids, name in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return name, len(ids)
        return None, None


def tokenize_line(line: str, tokenizer, db: EmbeddingDatabase) -> tuple[list[PromptChunk], int]:
    """sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line, A1111's default options."""
    chunk_length, comma_padding_backtrack = 75, 20
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma_token = tokenizer.get_vocab().get(",</w>", None)
    parsed = parse_prompt_attention(line)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal token_count, last_comma, chunk
        if is_last:
            token_count += len(chunk.tokens)
        else:
            token_count += chunk_length
        to_add = chunk_length - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [id_end] * to_add
            chunk.multipliers += [1.0] * to_add
        chunk.tokens = [id_start] + chunk.tokens + [id_end]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = PromptChunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk.tokens)
            elif comma_padding_backtrack != 0 and len(chunk.tokens) == chunk_length and last_comma != -1 \
                    and len(chunk.tokens) - last_comma <= comma_padding_backtrack:
                break_location = last_comma + 1
                reloc_tokens = chunk.tokens[break_location:]
                reloc_mults = chunk.multipliers[break_location:]
                chunk.tokens = chunk.tokens[:break_location]
                chunk.multipliers = chunk.multipliers[:break_location]
                next_chunk()
                chunk.tokens = reloc_tokens
                chunk.multipliers = reloc_mults
            if len(chunk.tokens) == chunk_length:
                next_chunk()
            name, embedding_length_in_tokens = db.find_embedding_at_position(tokens, position)
            if name is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            emb_len = int(db.vectors[name].shape[0])
            if len(chunk.tokens) + emb_len > chunk_length:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), name))
            chunk.tokens += [0] * emb_len
            chunk.multipliers += [weight] * emb_len
            position += embedding_length_in_tokens
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


class EmbeddingsWithFixes(torch.nn.Module):
    """sd_hijack.EmbeddingsWithFixes: the token embedding, with embedding vectors put at each fix's offset + 1."""

    def __init__(self, wrapped: torch.nn.Module, vectors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.wrapped = wrapped
        self.vectors = vectors
        self.fixes: list[list[tuple[int, str]]] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch_fixes = self.fixes
        self.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if batch_fixes is None or len(batch_fixes) == 0 or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, name in fixes:
                emb = self.vectors[name].to(tensor.device, dtype=tensor.dtype)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]])
            vecs.append(tensor)
        return torch.stack(vecs)


@contextmanager
def hijacked(model, vectors: Mapping[str, torch.Tensor]):
    """The text model with its token embedding wrapped by :class:`EmbeddingsWithFixes` (sd_hijack.hijack)."""
    original = model.embeddings.token_embedding
    model.embeddings.token_embedding = EmbeddingsWithFixes(original, vectors)
    try:
        yield model.embeddings.token_embedding
    finally:
        model.embeddings.token_embedding = original


def conditioning(model, tokenizer, prompt: str, embeddings: Mapping[str, torch.Tensor] | None = None,
                 clip_skip: int = 1) -> torch.Tensor:
    """``[1, 77 * chunks, D]``: A1111's ``FrozenCLIPEmbedderWithCustomWords.forward([prompt])``.

    ``model`` is a transformers ``CLIPTextModel``; ``embeddings`` maps trigger names to
    ``[n, D]`` vectors; ``clip_skip`` is A1111's ``CLIP_stop_at_last_layers``.
    """
    vectors = {name: torch.as_tensor(v, dtype=torch.float32) for name, v in (embeddings or {}).items()}
    db = EmbeddingDatabase(tokenizer, vectors)
    chunks, _ = tokenize_line(prompt, tokenizer, db)
    zs = []
    with torch.no_grad(), hijacked(model, vectors) as fixes_holder:
        for chunk in chunks:
            fixes_holder.fixes = [chunk.fixes]
            zs.append(process_tokens(model, [chunk.tokens], [chunk.multipliers], clip_skip))
    return torch.hstack(zs)


def process_tokens(model, remade_batch_tokens: list[list[int]], batch_multipliers: list[list[float]],
                   clip_skip: int) -> torch.Tensor:
    """sd_hijack_clip.process_tokens: encode_with_transformers, then EmphasisOriginal.after_transformers."""
    tokens = torch.asarray(remade_batch_tokens)
    outputs = model(input_ids=tokens, output_hidden_states=True)
    if clip_skip > 1:
        z = outputs.hidden_states[-clip_skip]
        z = model.final_layer_norm(z)
    else:
        z = outputs.last_hidden_state
    multipliers = torch.asarray(batch_multipliers)
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)
