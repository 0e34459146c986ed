"""The reference, exported: a full base folder of the merged model, cached by content hash.

Exporting the merged torch model through the same exporter as the base gives the
reference every graph and weight map a base has, so tensors, graph outputs and images
can be compared with the injected session one to one. The export is the slow part
(seconds on the tiny model, minutes on SD1.5), so it is kept under
``<workspace>/.cache/merged/<key>/``, where the key hashes everything the reference
depends on: the base fingerprint, each adapter's source content and weight, the route
asked for, the versions of the libraries that merge and :data:`REFERENCE_VERSION`. ``reference.json`` beside the manifest keeps
the reference's counts, so a cached run still reports how the reference was built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib.metadata import version
from dataclasses import asdict
from pathlib import Path

from ..manifest import Manifest
from ..adapters import AdapterSet
from ..workspace import Workspace, atomic_dir
from .reference import AdapterReference, Step, build_reference, load_source_model

REFERENCE_VERSION = 2  # bump when the reference's reading or merging changes: old caches no longer apply
RECORDS = "reference.json"


def cache_key(manifest: Manifest, adapter_set: AdapterSet, sources: Mapping[str, tuple[Path, str]], route: str) -> str:
    recipe = {
        "version": REFERENCE_VERSION, "base": manifest.fingerprint, "route": route,
        "libraries": {name: version(name) for name in ("torch", "diffusers", "peft", "transformers")},
        "adapters": [{"kind": a.kind, "source": sources[a.name][1], "weight": w} for a, w in adapter_set.adapters],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def merged_export(workspace: Workspace, base_dir: Path, manifest: Manifest, adapter_set: AdapterSet,
                  sources: Mapping[str, tuple[Path, str]], route: str, *, use_cache: bool = True,
                  on_step: Step | None = None) -> tuple[Path | None, list[AdapterReference], bool]:
    """(merged base folder, reference records, whether it came from the cache).

    The folder is None when a reference is incomplete: nothing is exported or cached then.
    """
    from ..export import export_components

    folder = workspace.cache / "merged" / cache_key(manifest, adapter_set, sources, route)
    if use_cache and (folder / RECORDS).is_file() and (folder / "manifest.json").is_file():
        records = [AdapterReference(**r) for r in json.loads((folder / RECORDS).read_text())]
        for record, (adapter, _) in zip(records, adapter_set.adapters):  # this run's .lora files, same sources
            record.name, record.source, record.targets = adapter.name, str(sources[adapter.name][0]), len(adapter.targets)
        return folder, records, True
    if on_step:
        on_step("loading the base's source model")
    components = load_source_model(base_dir, manifest)
    records, _ = build_reference(components, adapter_set, sources, route, on_step)
    if any(r.problem for r in records):
        return None, records, False
    with atomic_dir(folder) as tmp:
        source = {"kind": "verify-reference", "base": manifest.name, "base_fingerprint": manifest.fingerprint,
                  "adapters": [{"name": r.name, "weight": r.weight, "route": r.route, "sha256": r.sha256} for r in records]}
        export_components(components, tmp, name=f"{manifest.name}-reference", source=source, dtype=manifest.dtype,
                          opset=manifest.opset, on_step=on_step)
        (tmp / RECORDS).write_text(json.dumps([asdict(r) for r in records], indent=1))
    return folder, records, False
