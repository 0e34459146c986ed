"""What a file's safetensors metadata says about using it: trigger words and dtype.

Trigger words come from the SAI model spec (``modelspec.trigger_phrase``) and from
kohya's training record: a tag found in every training caption (``ss_tag_frequency``
counted against the image counts of ``ss_dataset_dirs``) is what the trainer put in
each caption on purpose. Without image counts, the most frequent tag(s) stand in.
Tags are returned as written in the captions (booru escapes such as ``\\(`` kept).
Malformed training metadata (wrong types, JSON nested too deep or over 8 MiB) names no
trigger words: it is a convenience, never a reason to refuse a file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

import torch

MAX_JSON_CHARS = 8 << 20  # a training record larger than this is not parsed (a real one is kilobytes)


def trigger_words(metadata: Mapping[str, str]) -> list[str]:
    """Trigger words named by the metadata, most certain first; [] when it names none."""
    words = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    return words + [tag for tag in _tags_in_every_caption(metadata) if tag not in words]


def _tags_in_every_caption(metadata: Mapping[str, str]) -> list[str]:
    if max(len(metadata.get(k, "")) for k in ("ss_tag_frequency", "ss_dataset_dirs")) > MAX_JSON_CHARS:
        return []
    try:
        frequency = json.loads(metadata["ss_tag_frequency"])
        totals: Counter[str] = Counter()
        for tags in frequency.values():
            totals.update({tag: int(n) for tag, n in tags.items()})
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
        return []  # absent or malformed: trigger words are a convenience, never a reason to refuse
    if not totals:
        return []
    try:
        dirs = json.loads(metadata["ss_dataset_dirs"])
        threshold = sum(int(dirs[name]["img_count"]) for name in frequency)
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
        threshold = 0
    threshold = threshold if threshold > 0 else max(totals.values())
    return [tag for tag, n in totals.most_common() if n >= threshold]


def dominant_dtype(tensors: Mapping[str, torch.Tensor]) -> str:
    """The floating dtype most tensors have (``float16`` / ``float32`` / ``bfloat16``)."""
    counts = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else "float32"
