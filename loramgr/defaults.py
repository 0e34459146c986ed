"""Generation defaults that fit a base: what ``loramgr run`` and ``loramgr serve`` use where the user gives none.

:class:`~loramgr.pipeline.settings.GenerationSettings` keeps ControlNet's ``process()``
defaults, made for SD1.5: 512 px and a negative prompt of 30 CLIP tokens. On a base with
another native size or a smaller tokenizer they cost time and cut text: the tiny base
makes 128 px images, and in its byte-level tokenizer that negative prompt is 107 tokens,
cut mid-word at CLIP's 77 (with a warning on every run). So two fields are resolved per
base, here and nowhere else (the CLI and the service both call :func:`base_defaults`):

- ``resolution``: the UNet's ``sample_size`` times the VAE's downscaling (tiny 128, sd15 512);
- ``n_prompt``: ControlNet's negative prompt up to its last comma-separated item that
  keeps it within one CLIP window (77 tokens) of the base's tokenizer (sd15: all of it).

Every other default is the dataclass's own, for every base. docs/design.md, "Defaults".
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from .bases import OpenBase
from .errors import BadFileError
from .pipeline.settings import GenerationSettings

PER_BASE = ("resolution", "n_prompt")
_STANDARD = {f.name: f.default for f in fields(GenerationSettings) if f.default is not MISSING}


@dataclass(frozen=True)
class BaseDefaults:
    """The defaults of one base; :meth:`settings` fills them in where a caller gives ``None``."""

    resolution: int
    n_prompt: str

    def as_dict(self) -> dict:
        """Every default generation setting (all but ``prompt``), with this base's values."""
        return {**_STANDARD, **asdict(self)}

    def settings(self, **given) -> GenerationSettings:
        """``GenerationSettings(**given)``, where a per-base field missing or ``None`` takes this base's value."""
        for name in PER_BASE:
            if given.get(name) is None:
                given[name] = getattr(self, name)
        return GenerationSettings(**given)


def native_resolution(configs: dict) -> int:
    """The image size a base's UNet was built for: its latent ``sample_size`` times the VAE's 2**(blocks-1)."""
    try:
        latent = int(configs["unet"]["sample_size"])
        downscale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError):  # a config without them: ControlNet's own default
        return _STANDARD["resolution"]
    return max(64, latent * downscale)


def fitting_prompt(text: str, count, limit: int) -> str:
    """``text`` up to its last comma-separated item with ``count(prefix) <= limit`` ("" if none fits)."""
    items = [item.strip() for item in text.split(",")]
    fitted = ""
    for k in range(1, len(items) + 1):
        candidate = ", ".join(items[:k])
        if count(candidate) > limit:
            break
        fitted = candidate
    return fitted


def base_defaults(base: OpenBase) -> BaseDefaults:
    """The defaults of ``base`` (reads its tokenizer)."""
    from transformers import CLIPTokenizer

    folder = base.dir / "tokenizer"
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:  # a damaged base: one line, not a traceback
        raise BadFileError(folder, f"not a readable tokenizer ({type(exc).__name__}); export the base again") from None
    return defaults_for(base.manifest.configs, tokenizer)


def defaults_for(configs: dict, tokenizer) -> BaseDefaults:
    """The defaults of a base with these diffusers ``configs`` and this ``CLIPTokenizer``."""
    # tokenize() counts without the BOS/EOS pair (and without transformers' over-length warning)
    n_prompt = fitting_prompt(_STANDARD["n_prompt"], lambda t: len(tokenizer.tokenize(t)) + 2,
                              tokenizer.model_max_length)
    return BaseDefaults(native_resolution(configs), n_prompt)
