"""The reference model: the base's source torch model with the adapters merged by other code than loramgr's.

LoRAs are merged by diffusers (``load_lora_weights`` + ``fuse_lora(lora_scale=weight)``,
which runs PEFT's merge) where diffusers reads the file's spelling correctly, else by
:mod:`.formulas` over :mod:`.sources`' own reading of the file; each ControlNet is loaded by
diffusers, and the first converted one replaces the model's own (the export holds one
ControlNet; docs/verify.md, "Several ControlNets"). Adapters are applied one at a time in the
set's order (the ControlNets first), as loramgr merges them, so order-dependent DoRA rescales
compare like with like.

Libraries can silently do nothing (docs/verify.md, "Counting": diffusers registers 0 modules for the
old processor format without ``unet.``), so every step is counted: the modules the
reference applied against the modules its reading of the file found, and the weights
that actually changed, by content digest, across the whole model.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter_file import AdapterFile
from ..adapters import BASE_CONTROLNET, AdapterSet
from ..errors import LoramgrError
from ..manifest import Manifest
from ..workspace import sha256_tree
from . import formulas
from .names import TEXT, UNET, Namespace
from .sources import SourceAdapter, SourceError, read_source, read_tensors, without_embeddings

COMPONENT_PREFIXES = {"unet": UNET, "text_encoder": TEXT, "controlnet": "controlnet."}
# Spellings diffusers' ``load_lora_weights`` reads into the right modules (measured with diffusers
# 0.42): not LDM block names, not the old processor format without ``unet.``, not cloneofsimo.
DIFFUSERS_SPELLINGS = ("kohya", "peft", "diffusers", "old-processor")
Step = Callable[[str], None]


@dataclass
class AdapterReference:
    """How the reference applied one adapter, with the counts that prove it did."""

    name: str
    kind: str  # "lora" | "controlnet" | "embedding" | "bundled embedding"
    weight: float
    source: str
    sha256: str  # of the source file (a folder: of its files); checked against the .lora's record
    route: str = ""  # "diffusers" | "formulas" | "diffusers ControlNetModel" | "diffusers load_textual_inversion"
    spelling: str = ""  # the file's key spelling, as the reference read it
    note: str = ""  # why the route differs from the one asked for
    file_modules: int = 0  # modules the reference's reading of the file found (embeddings: vectors)
    applied: int = 0  # modules (ControlNet: weights; embedding: token rows) the reference merged
    changed: int = 0  # weights of the model that differ afterwards (ControlNet: from the base's own)
    targets: int = 0  # weights loramgr's .lora changes (embedding: its vectors)
    ignored_keys: list[str] = field(default_factory=list)
    problem: str = ""  # why this reference cannot be trusted ("" when complete)
    unchecked: str = ""  # why a bundled embedding could not be checked ("" when it was)


def source_of(adapter: AdapterFile, sources: Mapping[str, str | Path]) -> tuple[Path, str]:
    """The adapter's source file and its content digest, refusing a file other than the one converted."""
    if adapter.kind == "baked":
        raise LoramgrError(f"{adapter.path}: a baked set has no source of its own: verify the adapters it was baked from")
    given = sources.get(adapter.name) or adapter.metadata.get("loramgr.source_path")
    if not given:
        raise LoramgrError(f"{adapter.path}: the .lora does not record its source file: pass --source "
                           f"{adapter.name}=PATH (the {adapter.metadata.get('loramgr.source_name', 'original')} file)")
    path = Path(given)
    if not path.exists():
        raise LoramgrError(f"{adapter.name}: source {path} does not exist: pass --source {adapter.name}=PATH")
    digest = sha256_tree(path)
    recorded = adapter.metadata.get("loramgr.source_sha256", "")
    if recorded and digest != recorded:
        raise LoramgrError(f"{adapter.name}: {path} has sha256 {digest[:12]}, but {adapter.path.name} was converted "
                           f"from a source with sha256 {recorded[:12]}: convert it again or pass the original")
    return path, digest


def load_source_model(base_dir: Path, manifest: Manifest) -> dict:
    """The torch components the base was exported from (``manifest.source``)."""
    from ..models.loading import load_components, load_controlnet

    source = manifest.source
    if source.get("kind") == "random":
        model, controlnet = Path(base_dir) / source["model"], None
    elif source.get("kind") == "files":
        model, controlnet = Path(source["model"]), source.get("controlnet")
    else:
        raise LoramgrError(f"base {manifest.name}: unknown source {source!r} in its manifest: re-export it")
    if not model.exists():
        raise LoramgrError(f"base {manifest.name} was exported from {model}, which is gone: verify merges into "
                           f"that model, so restore it or re-export the base")
    components = load_components(model)
    if controlnet:
        components["controlnet"] = load_controlnet(Path(controlnet))
    return components


def build_reference(components: dict, adapter_set: AdapterSet, sources: Mapping[str, tuple[Path, str]],
                    route: str = "auto", on_step: Step | None = None
                    ) -> tuple[list[AdapterReference], dict[str, torch.nn.Module]]:
    """Merge every adapter of ``adapter_set`` into ``components`` (in place); one record per adapter,
    and every ControlNet by the name units give it (``canny``: the base's own).

    ``sources`` maps adapter name -> (source path, digest) from :func:`source_of`. The first
    converted ControlNet replaces ``components["controlnet"]``; a ControlNet's changed weights
    are counted against the base's own.
    """
    namespace = Namespace.of(components["unet"], components["text_encoder"])
    controlnets = {BASE_CONTROLNET: components["controlnet"]}
    base_controlnet = _digests({"controlnet": components["controlnet"]})
    records = []
    before = _digests(components)
    with quiet_libraries():
        for index, (adapter, weight) in enumerate(adapter_set.adapters):
            path, digest = sources[adapter.name]
            record = AdapterReference(adapter.name, adapter.kind, weight, str(path), digest, targets=len(adapter.targets))
            if on_step:
                on_step(f"reference: {adapter.name}")
            try:
                if adapter.kind == "controlnet":
                    controlnets[adapter.name] = _load_controlnet(components, path, record)
                    if len(controlnets) == 2:  # the first converted one: the model's (the export's)
                        components["controlnet"] = controlnets[adapter.name]
                    record.changed = _count_changed(base_controlnet, _digests({"controlnet": controlnets[adapter.name]}))
                else:
                    _apply_lora(components, namespace, path, weight, route, f"verify_{index}", record)
            except SourceError as exc:
                record.problem = str(exc)
            after = _digests(components)
            if adapter.kind != "controlnet":
                record.changed = _count_changed(before, after)
            before = after
            _check_counts(record)
            records.append(record)
    return records, controlnets


def _count_changed(before: Mapping[str, str], after: Mapping[str, str]) -> int:
    return sum(1 for name, value in after.items() if before.get(name) != value)


def _check_counts(record: AdapterReference) -> None:
    """Refuse a reference that applied less than the file holds, or changed nothing or too much."""
    if record.problem:
        return
    if record.applied < record.file_modules:
        record.problem = (f"{record.route} applied {record.applied} of the {record.file_modules} modules in "
                          f"{Path(record.source).name}: it silently skipped the rest")
    elif record.changed == 0:
        record.problem = f"{record.route} changed no weight of the model: nothing would be verified"
    elif record.changed > record.applied:
        record.problem = f"{record.route} changed {record.changed} weights for {record.applied} modules"


def _load_controlnet(components: dict, path: Path, record: AdapterReference) -> torch.nn.Module:
    """The ControlNet at ``path`` loaded by diffusers, in the architecture of the model's own."""
    from ..models.loading import load_controlnet

    config = dict(components["controlnet"].config)
    controlnet = load_controlnet(path, {k: v for k, v in config.items() if not k.startswith("_")})
    record.route, record.spelling = "diffusers ControlNetModel", "controlnet"
    record.file_modules = record.applied = sum(1 for _ in controlnet.parameters())
    return controlnet


def _apply_lora(components: dict, namespace: Namespace, path: Path, weight: float, route: str,
                adapter_name: str, record: AdapterReference) -> None:
    source = read_source(path, namespace)
    record.spelling, record.file_modules, record.ignored_keys = source.spelling, len(source.modules), source.ignored
    chosen, record.note = _route(source, route)
    if chosen == "diffusers":
        try:
            # a file that bundles embeddings goes without their keys: diffusers' LoRA loader
            # refuses them (they are loaded as embeddings, docs/verify.md "Embeddings")
            lora = without_embeddings(read_tensors(path)[0], source.embeddings) if source.embeddings else path
            record.applied = _apply_with_diffusers(components, lora, weight, adapter_name)
            record.route = "diffusers"
            return
        except Exception as exc:  # noqa: BLE001 - any loader failure: fall back only when the route was chosen for us
            if route == "diffusers":
                raise SourceError(f"diffusers could not load {path.name}: {type(exc).__name__}: {exc}") from None
            record.note = f"diffusers could not load it ({type(exc).__name__}: {first_line(exc)})"
    record.route = "formulas"
    record.applied = _apply_with_formulas(components, source, weight)


def first_line(exc: Exception, limit: int = 120) -> str:
    """The first line of an exception's message, cut at ``limit`` characters: a report line."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def _route(source: SourceAdapter, route: str) -> tuple[str, str]:
    """(route, note): diffusers where it reads the file right, else the formulas."""
    if route != "auto":
        return route, ""
    if not source.path.is_file():
        return "formulas", "an adapter folder: diffusers' pipeline loader reads weight files"
    if source.spelling not in DIFFUSERS_SPELLINGS:
        return "formulas", f"diffusers does not read the {source.spelling} spelling"
    modules = source.modules.values()
    if any(m.kind != "lora" or "mid" in m.factors or m.dora == "lycoris" for m in modules):
        return "formulas", "diffusers loads no LoHa, LoKr, Tucker LoCon or LyCORIS DoRA (it drops dora_scale)"
    if len({m.alpha for m in modules}) > 1:
        return "formulas", "per-module alphas differ (diffusers 0.42 gives attention modules the most common one)"
    return "diffusers", ""


def diffusers_pipeline(components: dict, controlnet=None, scheduler=None):
    """diffusers' ``StableDiffusionControlNetPipeline`` over ``components`` (shared, not copied).

    ``controlnet``: a ControlNet or ``MultiControlNetModel`` (default: the components' own);
    ``scheduler``: default the components' own.
    """
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], controlnet=components["controlnet"] if controlnet is None else controlnet,
        scheduler=components["scheduler"] if scheduler is None else scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _apply_with_diffusers(components: dict, lora: Path | dict, weight: float, adapter_name: str) -> int:
    """Load (a file, or its state dict), fuse at ``weight`` and unload one LoRA with diffusers;
    returns the modules it registered."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = diffusers_pipeline(components)
    try:
        pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora), adapter_name=adapter_name)
        layers = {name: [m for m in components[name].modules()
                         if isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_A", {})]
                  for name in ("unet", "text_encoder")}
        loaded = [name for name, found in layers.items() if found]
        if loaded:
            pipe.fuse_lora(components=loaded, lora_scale=weight, adapter_names=[adapter_name])
        return sum(len(found) for found in layers.values())
    finally:
        pipe.unload_lora_weights()


def _apply_with_formulas(components: dict, source: SourceAdapter, weight: float) -> int:
    with torch.no_grad():
        for module in source.modules.values():
            param = _parameter(components, module.param)
            param.copy_(formulas.merged(param, module, weight).to(param.dtype))
    return len(source.modules)


def _parameter(components: dict, name: str) -> torch.nn.Parameter:
    for component, prefix in COMPONENT_PREFIXES.items():
        if name.startswith(prefix):
            return components[component].get_parameter(name.removeprefix(prefix))
    raise KeyError(name)


def _digests(components: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """Base-namespace parameter name -> sha1 of its bytes: which weights a step changed, without a copy."""
    digests = {}
    for component, prefix in COMPONENT_PREFIXES.items():
        if component not in components:
            continue
        for name, param in components[component].named_parameters():
            data = param.detach().contiguous().view(-1).view(torch.uint8).numpy()
            digests[prefix + name] = hashlib.sha1(data).hexdigest()
    return digests


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers and transformers log load reports while loading LoRAs; verify prints its own counts."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
