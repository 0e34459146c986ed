"""The tokenizer folder of a base: CLIP ViT-L/14's real BPE, or a byte-level one for ``tiny``.

A diffusers folder brings its own ``tokenizer/``; a single-file checkpoint and a model
built here (``--arch``) do not, and no hub is reachable to fetch one. For SD1.5 the
tokenizer must be the one its text encoder was trained with: CLIP ViT-L/14's byte-level
BPE, 49408 ids. Its merges ship with loramgr (``loramgr/data/clip_bpe_merges.txt.gz``,
MIT, provenance in ``loramgr/data/README.md``); the vocabulary is built from them as
CLIP's ``SimpleTokenizer`` builds it: the 256 byte symbols, the same with ``</w>``, one
token per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

``tiny``'s text encoder has 520 embeddings, too few for CLIP's ids: it gets a synthetic
byte-level BPE of that size (about one token per character).
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from loramgr.errors import BadFileError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

    from loramgr.models.architectures import ArchitectureConfig

CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_RESOURCE = "clip_bpe_merges.txt.gz"
# Architectures whose text encoder is too small for CLIP's ids: a synthetic byte-level BPE.
BYTE_LEVEL_ARCHITECTURES = ("tiny",)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _alphabet() -> list[str]:
    return list(bytes_to_unicode().values())


@cache
def clip_merges() -> tuple[str, ...]:
    """CLIP ViT-L/14's 48894 BPE merges (``"a b"`` lines, in priority order), from the package data."""
    data = resources.files("loramgr.data").joinpath(MERGES_RESOURCE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    count = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = tuple(lines[1: 1 + count])
    if "#version" not in lines[0] or len(merges) != count or any(len(m.split(" ")) != 2 for m in merges):
        raise RuntimeError(f"loramgr/data/{MERGES_RESOURCE} is damaged: reinstall loramgr")
    return merges


def clip_vocab() -> list[str]:
    """CLIP ViT-L/14's 49408 tokens, index = id (the construction of CLIP's ``SimpleTokenizer``)."""
    alphabet = _alphabet()
    vocab = alphabet + [c + END_OF_WORD for c in alphabet]
    vocab += [m.replace(" ", "") for m in clip_merges()]
    return vocab + [BOS, EOS]


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[str]]:
    """A synthetic byte-level BPE of ``vocab_size`` ids: CLIP's byte alphabet (with and without
    ``</w>``), merges of byte pairs up to the size, and the two special tokens last."""
    alphabet = _alphabet()
    vocab = alphabet + [c + END_OF_WORD for c in alphabet]
    merges: list[str] = []
    budget = vocab_size - len(vocab) - 2
    seen = set(vocab)
    for suffix in ("", END_OF_WORD):
        for a in alphabet:
            for b in alphabet:
                if len(merges) >= budget:
                    break
                token = a + b + suffix
                if token not in seen:
                    merges.append(f"{a} {b}{suffix}")
                    vocab.append(token)
                    seen.add(token)
    if budget < 0 or len(merges) < budget:
        raise ValueError(f"vocab_size {vocab_size} is outside what this generator can fill")
    return vocab + [BOS, EOS], merges


def _write_files(folder: Path, vocab: list[str], merges: list[str] | tuple[str, ...], max_length: int) -> None:
    """``vocab.json``, ``merges.txt`` and the configs ``CLIPTokenizer.from_pretrained`` reads."""
    if len(set(vocab)) != len(vocab):
        raise ValueError("tokenizer vocabulary has duplicate tokens")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": {**special, "content": BOS}, "eos_token": special, "pad_token": special, "unk_token": special,
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
    }, indent=2))


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> None:
    """Write CLIP ViT-L/14's tokenizer (SD1.5's) into ``folder``: 49408 ids, offline."""
    _write_files(Path(folder), clip_vocab(), clip_merges(), max_length)


def write_byte_level_tokenizer(folder: Path, vocab_size: int, max_length: int = 77) -> None:
    """Write a synthetic byte-level BPE ``CLIPTokenizer`` of ``vocab_size`` ids into ``folder``."""
    vocab, merges = byte_level_vocab(vocab_size)
    _write_files(Path(folder), vocab, merges, max_length)


def write_tokenizer(folder: Path, arch: ArchitectureConfig) -> None:
    """The tokenizer of a built-in architecture: CLIP's real one, or byte-level for ``tiny``."""
    max_length = arch.text_encoder.get("max_position_embeddings", 77)
    if arch.name in BYTE_LEVEL_ARCHITECTURES:
        write_byte_level_tokenizer(folder, arch.vocab_size, max_length)
    elif arch.vocab_size == CLIP_VOCAB_SIZE:
        write_clip_tokenizer(folder, max_length)
    else:
        raise ValueError(f"{arch.name}: no tokenizer for a text encoder of {arch.vocab_size} ids")


def _tokenizer_folder(path: Path) -> Path:
    """``path`` itself, or the ``tokenizer/`` of a pipeline folder; BadFileError when neither."""
    if not path.exists():
        raise BadFileError(path, "no such folder")
    if not path.is_dir():
        raise BadFileError(path, "not a folder; --tokenizer takes a folder holding a CLIPTokenizer's "
                                 "vocab.json and merges.txt (or tokenizer.json)")
    for folder in (path, path / "tokenizer"):
        if ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or \
                (folder / "tokenizer.json").is_file():
            return folder
    raise BadFileError(path, "no vocab.json + merges.txt (nor tokenizer.json): not a CLIPTokenizer folder")


def load_tokenizer(path: str | Path, vocab_size: int | None = None, max_length: int = 77) -> CLIPTokenizer:
    """A user's ``CLIPTokenizer`` folder (``--tokenizer DIR``), checked before use.

    Refused with :class:`BadFileError`: no such folder, no tokenizer files, files the
    tokenizer cannot read, a tokenizer that does not frame prompts with BOS/EOS, and one
    with more ids than the text encoder has embeddings (``vocab_size``). A missing or
    larger ``model_max_length`` is set to the text encoder's ``max_length``.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    folder = _tokenizer_folder(path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        ids = tokenizer("a photo of a cat").input_ids
    except Exception as exc:  # noqa: BLE001 - any reader error is a bad file here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadFileError(path, f"not a readable CLIPTokenizer folder ({type(exc).__name__}: {reason})") from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None or len(ids) < 3 or \
            ids[0] != tokenizer.bos_token_id or ids[-1] != tokenizer.eos_token_id:
        raise BadFileError(path, f"tokenizer does not frame a prompt with {BOS} and {EOS} (got ids {ids[:8]})")
    return fit_tokenizer(tokenizer, path, vocab_size, max_length)


def fit_tokenizer(tokenizer: CLIPTokenizer, path: str | Path, vocab_size: int | None,
                  max_length: int = 77) -> CLIPTokenizer:
    """Refuse a tokenizer with more ids than the text encoder's ``vocab_size`` embeddings; cap
    its ``model_max_length`` at the text encoder's ``max_length`` positions. Returns it."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise BadFileError(path, f"tokenizer has {len(tokenizer)} ids but the text encoder only {vocab_size} "
                                 "embeddings: it belongs to another model")
    if not tokenizer.model_max_length or tokenizer.model_max_length > max_length:
        tokenizer.model_max_length = max_length
    return tokenizer
