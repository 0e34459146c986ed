"""``loramgr bake``: an adapter set merged into full tensors for ``AddExternalInitializers``.

The output holds plain replacement tensors named as the base's initializers, which an
ONNX Runtime user passes to ``AddExternalInitializers`` from any language.
"""

from __future__ import annotations

import json
from pathlib import Path

from .adapter_file import AdapterTarget, save_adapter
from .adapters import load_adapter_set
from .bases import OpenBase
from .errors import LoramgrError
from .manifest import UNET
from .merge import BaseWeights, merge_tensors
from .workspace import Workspace


def bake(workspace: Workspace, output: Path, loras: list[str], *, base: str | None = None,
         control: str | None = None) -> dict[str, Path]:
    """Merge adapters into full replacement tensors named as the base's initializers.

    Writes ``output`` for the UNet graph and, when the set changes the ControlNet or the text
    encoder, ``<output stem>.<graph>.lora`` beside it (ONNX Runtime refuses
    initializers a graph does not have, so each graph gets its own file). Returns
    graph -> path.
    """
    opened = OpenBase.resolve(workspace, base)
    base, base_dir, manifest = opened.name, opened.dir, opened.manifest
    adapter_set = load_adapter_set(workspace, manifest, loras, control)
    if not adapter_set.adapters:
        raise LoramgrError("bake needs at least one --lora or --control adapter")
    output = Path(output)
    if output.suffix != ".lora":
        raise LoramgrError(f"-o {output}: the output file must end in .lora")
    tensors = merge_tensors(BaseWeights(manifest, base_dir), adapter_set)
    recipe = json.dumps([{"name": a.name, "weight": w, "sha256": a.metadata.get("loramgr.source_sha256", "")}
                         for a, w in adapter_set.adapters])
    written = {}
    for graph, named in tensors.items():
        path = output if graph == UNET else output.with_name(f"{output.stem}.{graph}.lora")
        by_init = manifest.graphs[graph].by_initializer()
        targets = [AdapterTarget(n, graph, by_init[n], "full", 1.0, {"weight": a}) for n, a in named.items()]
        metadata = {"loramgr.base_name": base, "loramgr.base_fingerprint": manifest.fingerprint,
                    "loramgr.graph": graph, "loramgr.baked_from": recipe}
        save_adapter(path, "baked", metadata, targets)
        written[graph] = path
    return written

