"""cloneofsimo/lora files (``unet:<n>:up``): modules named only by their position.

cloneofsimo's ``save_safeloras`` numbers the ``nn.Linear`` modules below its target
classes (stored as JSON in the metadata, e.g. ``unet: ["CrossAttention", "Attention",
"GEGLU"]``) in ``model.modules()`` order. That order is rebuilt here from the base's
names and the tables in :mod:`.names`. Where diffusers changed it between versions
(``ff`` before or after ``attn2``), every candidate is tried and exactly one must fit
every tensor's shape; otherwise the file is refused rather than guessed.
"""

from __future__ import annotations

import json
import re

from loramgr.errors import BadFileError

from .files import WeightFile
from .names import (
    CLONEOFSIMO_ATTENTION,
    CLONEOFSIMO_BLOCK_ORDERS,
    CLONEOFSIMO_FF,
    CLONEOFSIMO_TEXT_TARGETS,
    CLONEOFSIMO_UNET_TARGETS,
    UNET_BLOCK_ORDER,
    ModuleIndex,
    Resolved,
    other_width_hint,
)

KEY = re.compile(r"^(?P<component>unet|text_encoder):(?P<index>\d+):(?P<part>up|down)$")
_TRANSFORMER_BLOCK = re.compile(
    r"^(?P<kind>down_blocks|up_blocks|mid_block)(?:\.(?P<block>\d+))?\.attentions\.(?P<attention>\d+)"
    r"\.transformer_blocks\.(?P<index>\d+)$"
)
_TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.(?P<index>\d+)$")


def is_cloneofsimo(keys: list[str]) -> bool:
    """Any ``unet:<n>:up`` key (the pivotal-tuning embeddings of such files are :mod:`.embeddings`' part)."""
    return any(KEY.match(key) for key in keys)


def cloneofsimo_modules(source: WeightFile, index: ModuleIndex) -> dict[str, tuple[Resolved, str]]:
    """key -> (base module, part) for every LoRA key of a cloneofsimo file."""
    matches = [m for key in source.tensors if (m := KEY.match(key))]
    placed: dict[str, tuple[Resolved, str]] = {}
    for component in sorted({m["component"] for m in matches}):
        count = 1 + max(int(m["index"]) for m in matches if m["component"] == component)
        order = _fitting_order(source, index, component, count)
        for i, module in enumerate(order):
            local = module.removeprefix("unet.") if component == "unet" else module
            for part in ("up", "down"):
                placed[f"{component}:{i}:{part}"] = (Resolved(module, component, local, "cloneofsimo"), part)
    return placed


def _fitting_order(source: WeightFile, index: ModuleIndex, component: str, count: int) -> list[str]:
    """The one candidate module order whose shapes fit every tensor of ``component``."""
    raw = source.metadata.get(component)
    if raw is None:
        raise BadFileError(source.path, f"cloneofsimo file without the {component!r} metadata (its target classes)")
    targets = json.loads(raw)
    candidates = _candidate_orders(source, index, component, targets)
    misfits = [_misfit(source, index, component, order, count) for order in candidates]
    fitting = [order for order, misfit in zip(candidates, misfits) if misfit is None]
    if len(fitting) != 1:
        detail = misfits[0] if len(fitting) == 0 else "more than one module order fits"
        raise BadFileError(source.path, f"cloneofsimo {component} LoRA ({count} modules, targets {targets}) "
                                        f"does not fit this base: {detail}")
    return fitting[0]


def _candidate_orders(source: WeightFile, index: ModuleIndex, component: str, targets: list[str]) -> list[list[str]]:
    table = CLONEOFSIMO_UNET_TARGETS if component == "unet" else CLONEOFSIMO_TEXT_TARGETS
    unknown = [t for t in targets if t not in table]
    if unknown:
        raise BadFileError(source.path, f"cloneofsimo {component} targets {unknown[0]!r}, a class whose module "
                                        f"order loramgr does not know (known: {sorted(table)})")
    modules = index.components[component]
    if component == "text_encoder":
        layers = sorted((m.removesuffix(".self_attn.q_proj") for m in modules if m.endswith(".self_attn.q_proj")),
                        key=lambda p: int(_TEXT_LAYER.match(p)["index"]))
        names = [name for target in CLONEOFSIMO_TEXT_TARGETS if target in targets for name in CLONEOFSIMO_TEXT_TARGETS[target]]
        return [[modules[f"{layer}.{name}"] for layer in layers for name in names]]
    blocks = sorted((m.removesuffix(".attn1.to_q") for m in modules if m.endswith(".attn1.to_q")), key=_block_key)
    groups = {CLONEOFSIMO_UNET_TARGETS[t] for t in targets}
    parts = {
        "attn1": [f"attn1.{n}" for n in CLONEOFSIMO_ATTENTION] if "attention" in groups else [],
        "attn2": [f"attn2.{n}" for n in CLONEOFSIMO_ATTENTION] if "attention" in groups else [],
        "ff": list(CLONEOFSIMO_FF) if "ff" in groups else [],
    }
    orders = []
    for block_order in CLONEOFSIMO_BLOCK_ORDERS:
        order = [modules[f"{block}.{name}"] for block in blocks for child in block_order for name in parts[child]]
        if order not in orders:
            orders.append(order)
    return orders


def _block_key(path: str) -> tuple[int, int, int, int]:
    m = _TRANSFORMER_BLOCK.match(path)
    return UNET_BLOCK_ORDER.index(m["kind"]), int(m["block"] or 0), int(m["attention"]), int(m["index"])


def _misfit(source: WeightFile, index: ModuleIndex, component: str, order: list[str], count: int) -> str | None:
    """Why ``order`` cannot be the file's module order, or None if every shape fits."""
    if len(order) != count:
        return f"the base has {len(order)} such modules"
    for i, module in enumerate(order):
        out, fan_in = index.shapes[module + ".weight"]
        up, down = source.tensors.get(f"{component}:{i}:up"), source.tensors.get(f"{component}:{i}:down")
        if up is None or down is None:
            return f"the file lacks {component}:{i}:{'up' if up is None else 'down'}"
        expected = ((out, down.shape[0]), (down.shape[0], fan_in))
        if (tuple(up.shape), tuple(down.shape)) != expected:
            hint = other_width_hint((out, fan_in), tuple(down.shape) + tuple(up.shape))
            return (f"{component}:{i} is up {list(up.shape)} / down {list(down.shape)}, but module {i} of the base "
                    f"({module}) is [{out}, {fan_in}]" + (f"; it looks like {hint}" if hint else ""))
    return None
