"""``loramgr bake``: an adapter set merged into full tensors for ``AddExternalInitializers``.

The output holds plain replacement tensors named as the base's initializers, which an
ONNX Runtime user passes to ``AddExternalInitializers`` from any language.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .adapter_file import AdapterTarget, save_adapter
from .adapters import load_adapter_set, touched_names
from .bases import OpenBase
from .errors import LoramgrError
from .manifest import UNET
from .merge import BaseWeights, merge_tensors
from .workspace import Workspace


def parse_outputs(items: Sequence[str]) -> dict[str, Path]:
    """``-o`` values, ``GRAPH=FILE`` or a plain ``FILE`` (the UNet graph's), as graph -> path."""
    outputs: dict[str, Path] = {}
    for item in items:
        graph, sep, path = item.partition("=") if "=" in item else (UNET, "", item)
        if graph in outputs:
            raise LoramgrError(f"-o {item}: the {graph} graph already has a file ({outputs[graph]}; "
                               "a plain FILE is the UNet graph's)")
        outputs[graph] = Path(path)
    return outputs


def bake(workspace: Workspace, outputs: str | Path | Mapping[str, str | Path], loras: list[str], *,
         base: str | None = None, control: str | None = None) -> dict[str, Path]:
    """Merge adapters into full replacement tensors named as the base's initializers.

    ``outputs`` names one ``.lora`` file per graph the set changes (ONNX Runtime refuses
    initializers a graph does not have, so each graph gets its own file): graph -> path,
    or a single path for a set that changes the UNet graph only. Exactly these
    files are written, or none: a graph the set changes without a file, or a file for a
    graph it does not change, is refused before anything is merged. Returns graph -> path.
    """
    opened = OpenBase.resolve(workspace, base)
    base, base_dir, manifest = opened.name, opened.dir, opened.manifest
    adapter_set = load_adapter_set(workspace, manifest, loras, control)
    if not adapter_set.adapters:
        raise LoramgrError("bake needs at least one --lora or --control adapter")
    paths = {graph: Path(path) for graph, path in (outputs.items() if isinstance(outputs, Mapping)
                                                   else [(UNET, outputs)])}
    changed = sorted(touched_names(adapter_set), key=list(manifest.graphs).index)
    _check_outputs(paths, changed, list(manifest.graphs))
    tensors = merge_tensors(BaseWeights(manifest, base_dir), adapter_set)
    recipe = json.dumps([{"name": a.name, "weight": w, "sha256": a.metadata.get("loramgr.source_sha256", "")}
                         for a, w in adapter_set.adapters])
    written: dict[str, Path] = {}
    try:
        for graph in changed:
            by_init = manifest.graphs[graph].by_initializer()
            targets = [AdapterTarget(n, graph, by_init[n], "full", 1.0, {"weight": a})
                       for n, a in tensors[graph].items()]
            metadata = {"loramgr.base_name": base, "loramgr.base_fingerprint": manifest.fingerprint,
                        "loramgr.graph": graph, "loramgr.baked_from": recipe}
            save_adapter(paths[graph], "baked", metadata, targets)
            written[graph] = paths[graph]
    except BaseException:
        for path in written.values():  # all files or none
            path.unlink(missing_ok=True)
        raise
    return written


def _check_outputs(paths: dict[str, Path], changed: list[str], graphs: list[str]) -> None:
    """Refuse outputs that are not exactly one ``.lora`` file per graph the set changes."""
    for graph, path in paths.items():
        if graph not in graphs:
            raise LoramgrError(f"-o {graph}={path}: the base has no graph {graph!r} (graphs: {', '.join(graphs)})")
        if path.suffix != ".lora":
            raise LoramgrError(f"-o {path}: the output file must end in .lora")
        if graph not in changed:
            raise LoramgrError(f"-o {graph}={path}: the set does not change the {graph} graph "
                               f"(it changes {', '.join(changed)})")
    missing = [g for g in changed if g not in paths]
    if missing:
        example = " ".join(f"-o {g}={paths[UNET].stem if UNET in paths else 'mix'}-{g}.lora" for g in missing)
        raise LoramgrError(f"the set also changes the {', '.join(missing)} graph: name its file too, e.g. {example} "
                           "(one .lora per graph: ONNX Runtime refuses initializers a graph does not have)")
    if len(set(paths.values())) < len(paths):
        raise LoramgrError(f"-o: two graphs are given the same file ({', '.join(map(str, paths.values()))})")
