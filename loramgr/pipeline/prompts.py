"""Prompts as A1111 users write them: emphasis, ``BREAK``, any length, textual-inversion embeddings.

:func:`plan_prompt` turns a prompt into chunks of 77 token ids, each token with its emphasis
weight, and the embedding vectors that replace token embeddings; the pipeline encodes every
chunk on its own, applies :func:`apply_emphasis` and concatenates the chunks along the token
axis. The rules are AUTOMATIC1111's (``modules/prompt_parser.py`` ``parse_prompt_attention``,
``modules/sd_hijack_clip.py`` ``tokenize_line``, ``modules/sd_emphasis.py`` "Original"),
including their quirks; docs/prompts.md lists them. Written here because no library
reproduces them (compel and its kin parse another syntax and weight differently).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from loramgr.errors import LoramgrError

CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make it CLIP's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
ROUND, SQUARE = 1.1, 1 / 1.1
SYNTAXES = ("a1111", "plain")
BREAK = ("BREAK", -1.0)  # the parser's marker for a chunk break (A1111 spells it so)

# One match per syntactic element, tried in this order: an escape (\( \) \[ \] \\, or a lone
# backslash, which stands for nothing), an opening bracket, ":1.3)" closing with a weight, a
# closing bracket, plain text, and a colon that closes nothing.
_ELEMENT = re.compile(r"""
    \\[()\[\]\\]?
  | \( | \[
  | :([+-]?[.\d]+)\)
  | \) | \]
  | [^\\()\[\]:]+
  | :
""", re.X)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Chunk:
    """One text-encoder pass: 77 token ids (BOS, 75 tokens or padding, EOS), a weight per
    token (1.0 at BOS, EOS and padding), and textual-inversion vectors by position."""

    ids: list[int]
    weights: list[float]
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # position -> [D]

    def token_embeddings(self, table: np.ndarray) -> np.ndarray:
        """The ``[77, D]`` text-encoder input: rows of the token embedding ``table`` for the ids,
        replaced by the embedding vectors where they stand (A1111's ``EmbeddingsWithFixes``)."""
        rows = table[np.asarray(self.ids)]
        for position, vector in self.vectors.items():
            rows[position] = vector
        return rows


@dataclass(frozen=True)
class PromptPlan:
    chunks: list[Chunk]
    embeddings: list[str]  # the embeddings used, in order of first use
    tokens: int  # tokens as A1111's counter counts them (what --max-prompt-tokens limits)


def parse_attention(text: str, what: str = "prompt") -> list[tuple[str, float]]:
    """Pieces of ``text`` with their emphasis weight, as A1111's ``parse_prompt_attention``.

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.3)`` multiplies by 1.3; nesting
    multiplies; an unclosed bracket acts to the end; neighbours of equal weight merge. A
    ``BREAK`` word becomes :data:`BREAK` (which brackets around it scale, as in A1111, turning
    it into the literal word).

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []
    opened_round: list[int] = []
    opened_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ELEMENT.finditer(text):
        element, weight = match.group(0), match.group(1)
        if element.startswith("\\"):
            pieces.append([element[1:], 1.0])
        elif element == "(":
            opened_round.append(len(pieces))
        elif element == "[":
            opened_square.append(len(pieces))
        elif weight is not None and opened_round:
            scale(opened_round.pop(), _number(weight, element, what))
        elif element == ")" and opened_round:
            scale(opened_round.pop(), ROUND)
        elif element == "]" and opened_square:
            scale(opened_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK_WORD.split(element)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in opened_round:
        scale(start, ROUND)
    for start in opened_square:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    for piece_text, weight in merged:
        if not math.isfinite(weight):
            raise LoramgrError(f"{what}: the emphasis weight of {piece_text!r} is not a finite number ({weight})")
    return [(piece_text, weight) for piece_text, weight in merged]


def _number(weight: str, element: str, what: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise LoramgrError(f"{what}: {element!r}: emphasis weight {weight!r} is not a number") from None


class _Chunker:
    """A1111's ``tokenize_line`` loop: fills chunks of 75, backtracks to a recent comma when a
    chunk is full, closes a chunk before an embedding that would not fit in it."""

    def __init__(self, eos: int, comma: int | None):
        self.eos, self.comma = eos, comma
        self.done: list[tuple[list[int], list[float], list[tuple[int, str]]]] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, str]] = []  # (offset in the chunk's tokens, embedding name)
        self.count = 0
        self.last_comma = -1

    def close(self, last: bool = False) -> None:
        """Pad the open chunk to 75 and start a new one; a closed chunk counts 75 tokens, the
        last one only what it holds (A1111's counter)."""
        self.count += len(self.tokens) if last else CHUNK_TOKENS
        padding = max(0, CHUNK_TOKENS - len(self.tokens))
        self.done.append((self.tokens + [self.eos] * padding, self.weights + [1.0] * padding, self.fixes))
        self.tokens, self.weights, self.fixes = [], [], []
        self.last_comma = -1

    def add(self, token: int, weight: float, embedding: tuple[str, int] | None) -> None:
        """Add one prompt token, or the ``(name, vectors)`` embedding that starts at it."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif len(self.tokens) == CHUNK_TOKENS and self.last_comma != -1 \
                and len(self.tokens) - self.last_comma <= COMMA_BACKTRACK:
            # What follows the comma moves to the next chunk; embeddings among it keep their
            # place in the closed chunk, as A1111's chunker leaves its fixes (docs/prompts.md).
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:]
            del self.tokens[cut:], self.weights[cut:]
            self.close()
            self.tokens, self.weights = list(moved[0]), list(moved[1])
        if len(self.tokens) == CHUNK_TOKENS:
            self.close()
        if embedding is None:
            self.tokens.append(token)
            self.weights.append(weight)
            return
        name, count = embedding
        if len(self.tokens) + count > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.tokens), name))
        self.tokens += [0] * count
        self.weights += [weight] * count


class _EmbeddingIndex:
    """Embeddings by the token ids of their names, longest first (A1111's ``EmbeddingDatabase``)."""

    def __init__(self, tokenizer, embeddings: Mapping[str, np.ndarray], what: str):
        self.vectors = embeddings
        self.what = what
        names = sorted(embeddings)  # ties between names that tokenize alike go to the first
        self.by_first: dict[int, list[tuple[list[int], str]]] = {}
        for name, ids in zip(names, _tokenize(tokenizer, names) if names else []):
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)

    def match(self, tokens: list[int], position: int) -> tuple[str, int] | None:
        """(name, length of the name in tokens) of the embedding whose name starts at ``position``."""
        for ids, name in self.by_first.get(tokens[position], ()):
            if tokens[position: position + len(ids)] == ids:
                return name, len(ids)
        return None

    def count(self, name: str) -> int:
        """Vectors of embedding ``name``; refused when they cannot fit one chunk."""
        vectors = self.vectors[name]
        if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= CHUNK_TOKENS:
            raise LoramgrError(f"{self.what}: embedding {name!r} has shape {list(vectors.shape)}; "
                               f"an embedding is [n, width] with 1 <= n <= {CHUNK_TOKENS}")
        return vectors.shape[0]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids


def plan_prompt(text: str, tokenizer, embeddings: Mapping[str, np.ndarray] | None = None, *,
                syntax: str = "a1111", max_tokens: int = 3 * CHUNK_TOKENS, what: str = "prompt") -> PromptPlan:
    """Chunks of token ids, emphasis weights and embedding vectors for ``text``.

    Args:
        text: the prompt.
        tokenizer: the base's ``CLIPTokenizer``.
        embeddings: textual-inversion vectors ``[n, D]`` by trigger name (``syntax="a1111"`` only).
        syntax: ``"a1111"`` (emphasis, ``BREAK``, chunks of 75, embeddings) or ``"plain"`` (the
            text as it is, one chunk as diffusers tokenizes it; more than 75 tokens is refused).
        max_tokens: the most tokens a prompt may have (A1111's count: a chunk closed early by
            ``BREAK`` or comma backtracking counts 75).
        what: the request field, named in errors.

    Raises:
        LoramgrError: a prompt over the limit, a weight that is not a number, an embedding
            that cannot fit a chunk; one line naming ``what``.

    Example::

        plan = plan_prompt("a (red:1.2) house BREAK at night", tokenizer)
        len(plan.chunks), plan.chunks[0].weights[2]   # 2, 1.2
    """
    if syntax not in SYNTAXES:
        raise LoramgrError(f"{what}: prompt syntax {syntax!r} is not one of {', '.join(SYNTAXES)}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if syntax == "plain":
        tokens = _tokenize(tokenizer, [text])[0]
        limit = min(max_tokens, CHUNK_TOKENS)
        if len(tokens) > limit:
            raise _too_long(what, len(tokens), max_tokens) if len(tokens) > max_tokens else LoramgrError(
                f"{what}: {len(tokens)} tokens; with prompt syntax 'plain' a prompt holds at most {CHUNK_TOKENS} "
                "(one CLIP chunk): shorten it or use the a1111 syntax")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = [bos, *tokens, eos] + [pad] * (CHUNK_TOKENS - len(tokens))
        return PromptPlan([Chunk(ids, [1.0] * len(ids))], [], len(tokens))

    pieces = parse_attention(text, what)
    index = _EmbeddingIndex(tokenizer, embeddings or {}, what)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunker = _Chunker(eos, None if comma == tokenizer.unk_token_id else comma)
    for tokens, (piece, weight) in zip(_tokenize(tokenizer, [p for p, _ in pieces]), pieces):
        if (piece, weight) == BREAK:
            chunker.close()
            continue
        position = 0
        while position < len(tokens):
            found = index.match(tokens, position)
            chunker.add(tokens[position], weight, None if found is None else (found[0], index.count(found[0])))
            position += 1 if found is None else found[1]
    if chunker.tokens or not chunker.done:
        chunker.close(last=True)
    if chunker.count > max_tokens:
        raise _too_long(what, chunker.count, max_tokens)
    chunks, used = [], []
    for ids, weights, fixes in chunker.done:
        vectors = {}
        for offset, name in fixes:
            rows = index.vectors[name][: CHUNK_TOKENS + 1 - offset]
            vectors.update({offset + 1 + i: np.asarray(row, dtype=np.float32) for i, row in enumerate(rows)})
            used += [name] if name not in used else []
        chunks.append(Chunk([bos, *ids, eos], [1.0, *weights, 1.0], vectors))
    return PromptPlan(chunks, used, chunker.count)


def _too_long(what: str, tokens: int, limit: int) -> LoramgrError:
    chunks = limit // CHUNK_TOKENS
    size = f" ({chunks} chunk{'s' * (chunks > 1)} of {CHUNK_TOKENS})" if chunks and not limit % CHUNK_TOKENS else ""
    return LoramgrError(f"{what}: {tokens} tokens, over the limit of {limit}{size}: shorten it, or raise the limit "
                        "with --max-prompt-tokens")


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on encoder output ``[77, D]`` or ``[B, 77, D]`` (``weights``
    ``[77]`` or ``[B, 77]``): scale each token by its weight, then rescale each chunk so its
    mean is what it was. Each batch row is a chunk of its own (A1111 encodes one prompt's
    chunk at a time)."""
    weights = torch.as_tensor(weights, dtype=hidden.dtype, device=hidden.device)
    original = hidden.mean(dim=(-2, -1), keepdim=True)
    weighted = hidden * weights.unsqueeze(-1)
    return weighted * (original / weighted.mean(dim=(-2, -1), keepdim=True))
