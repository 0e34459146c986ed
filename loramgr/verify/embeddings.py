"""The reference's textual-inversion embeddings: loaded into the reference model by diffusers'
``load_textual_inversion``, never through ``loramgr.formats``.

An embedding adapter is loaded from its source file with ``token=`` its trigger (the adapter's
name). The embeddings a LoRA bundles come from the reference's own reading of the LoRA's source
(:func:`.sources.bundled_embeddings`), each handed to diffusers as the state dict of the file
layout it stands for. A bundled embedding diffusers cannot load is recorded as not checked
(``AdapterReference.unchecked``), never dropped silently; a bundled embedding of the source the
``.lora`` lacks is a coverage failure. docs/verify.md, "Embeddings".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..adapter_file import AdapterFile
from ..adapters import AdapterSet
from .reference import AdapterReference, Step, diffusers_pipeline, first_line, quiet_libraries
from .sources import bundled_embeddings, read_tensors

ROUTE = "diffusers load_textual_inversion"


def load_embeddings(components: dict, adapter_set: AdapterSet, embeddings: Sequence[AdapterFile],
                    sources: Mapping[str, tuple[Path, str]], on_step: Step | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[AdapterReference]]:
    """Load every embedding of ``embeddings`` and those the LoRAs of ``adapter_set`` bundle into
    ``components``' tokenizer and text encoder (in place).

    Returns the ``[n, D]`` rows diffusers put into the token table, by trigger (the embeddings
    it loaded), and one record per embedding, in order: the embedding adapters, then each
    LoRA's bundled ones. A trigger two of them share is loaded once, from the one loramgr's
    prompts use (an embedding adapter, else the later LoRA's); the others are not checked.
    """
    pending: list[tuple[AdapterReference, object]] = []  # (record, what diffusers loads)
    records, taken = [], {}  # trigger -> who holds it in prompts
    for adapter in embeddings:
        path, digest = sources[adapter.name]
        record = AdapterReference(adapter.name, "embedding", 1.0, str(path), digest, spelling="embedding file",
                                  targets=len(adapter.embeddings[adapter.name]))
        pending.append((record, str(path)))
        records.append(record)
        taken[adapter.name] = f"the embedding {adapter.name}"
    bundled_records = []
    for adapter, _ in reversed(adapter_set.loras().adapters):  # a later LoRA's bundled embedding wins a tie
        if not adapter.embeddings:
            continue
        path, digest = sources[adapter.name]
        found = bundled_embeddings(*read_tensors(path)[:2])
        for trigger in sorted(set(adapter.embeddings) | set(found), reverse=True):
            bundled = found.get(trigger)
            record = AdapterReference(trigger, "bundled embedding", 1.0, str(path), digest,
                                      spelling=bundled.spelling if bundled else "", note=f"bundled in {adapter.name}",
                                      targets=len(adapter.embeddings.get(trigger, ())))
            bundled_records.append(record)
            if bundled is None:
                record.unchecked = f"the reference finds no embedding {trigger!r} in {path.name}"
            elif trigger not in adapter.embeddings:  # loramgr dropped it: coverage fails on the counts
                record.route, record.file_modules = ROUTE, _vectors(bundled.state_dict)
                record.applied = record.changed = record.file_modules
            elif trigger in taken:
                record.unchecked = f"prompts use {taken[trigger]}'s vectors for {trigger!r} (docs/prompts.md)"
            else:
                pending.append((record, bundled.state_dict))
                taken[trigger] = f"{adapter.name}'s bundled embedding"
    records += reversed(bundled_records)
    pipe = diffusers_pipeline(components)
    rows = {}
    with quiet_libraries():
        for record, what in pending:
            if on_step:
                on_step(f"reference: {record.name}")
            trigger = record.name
            try:
                added = _load(pipe, what, trigger)
            except Exception as exc:  # noqa: BLE001 - any loader failure is reported, per embedding
                reason = f"diffusers could not load it ({type(exc).__name__}: {first_line(exc)})"
                if record.kind == "embedding":
                    record.problem = reason
                else:
                    record.unchecked = reason
                continue
            table = components["text_encoder"].get_input_embeddings().weight
            rows[trigger] = table[components["tokenizer"].convert_tokens_to_ids(added)].detach().clone()
            record.route = ROUTE
            record.file_modules = record.applied = record.changed = len(added)
            if not added:
                record.problem = f"{ROUTE} added no token for {trigger!r}"
    return {r.name: rows[r.name] for r in records if r.name in rows}, records  # in the records' order


def _load(pipe, what, trigger: str) -> list[str]:
    """Load one embedding; the tokens diffusers added for it, in order (``T``, ``T_1``, ...)."""
    before = set(pipe.tokenizer.get_added_vocab())
    pipe.load_textual_inversion(what, token=trigger)
    added = set(pipe.tokenizer.get_added_vocab()) - before
    return sorted(added, key=lambda t: 0 if t == trigger else int(t.rsplit("_", 1)[1]))


def _vectors(state_dict: dict) -> int:
    """Vectors of a bundled embedding's state dict, as diffusers would read them."""
    tensor = state_dict["string_to_param"]["*"] if "string_to_param" in state_dict else next(iter(state_dict.values()))
    return 1 if tensor.ndim == 1 else tensor.shape[0]
