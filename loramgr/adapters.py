"""Adapter sets: which adapters run together, with which weights, and what they touch.

An :class:`AdapterSet` is what a runner applies (``OrtRunner.set_adapters``,
``TrtRunner.set_adapters``); an :class:`AdapterChoice` is what a user asks for
(``--lora``, ``--control``, ``--sweep``, an HTTP request) before the files are loaded;
:func:`load_adapter_set` turns one into the other, checked against the base.
docs/design.md has a glossary of every ``Adapter*`` type.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .adapter_file import AdapterFile, load_adapter
from .errors import LoramgrError, check_finite, parse_weight
from .manifest import CONTROLNET, Manifest
from .workspace import Workspace

Names = dict[str, set[str]]  # graph -> initializer names


BASE_CONTROLNET = "canny"  # how users name the base's own ControlNet (the demo bases are canny ones)


def is_controlnet(adapter: AdapterFile) -> bool:
    """Whether ``adapter`` replaces a whole ControlNet (a converted one, or a baked ControlNet graph)."""
    return adapter.kind == "controlnet" or (
        adapter.kind == "baked" and all(t.graph == CONTROLNET for t in adapter.targets.values()))


@dataclass(frozen=True)
class AdapterSet:
    """Adapters with their weights, in the order they are applied, and the ControlNets units may use.

    ``adapters`` holds LoRAs (UNet and text encoder) and converted ControlNets (weight 1).
    Each ControlNet sits in a slot of its own when units use it (docs/design.md, "ControlNet
    units"); ``base_controlnet`` says whether the base's own ControlNet is one of them
    (``None``: yes unless a converted ControlNet replaces it, the one-unit case).
    """

    adapters: tuple[tuple[AdapterFile, float], ...] = ()
    base_controlnet: bool | None = None

    def __post_init__(self):
        names = [a.name for a, _ in self.adapters if is_controlnet(a)]
        if len(set(names)) != len(names):
            raise LoramgrError(f"a ControlNet is listed twice in one adapter set: {', '.join(names)}")
        for adapter, weight in self.adapters:
            check_finite(weight, f"{adapter.name} weight")  # a NaN weight renders a black image
            if adapter.kind != "lora" and weight != 1.0:
                raise LoramgrError(f"{adapter.name}: a {adapter.kind} adapter replaces weights; its weight must be 1, got {weight}")

    @property
    def uses_base_controlnet(self) -> bool:
        if self.base_controlnet is None:
            return not any(is_controlnet(a) for a, _ in self.adapters)
        return self.base_controlnet

    def controlnets(self) -> tuple[AdapterFile | None, ...]:
        """The ControlNets units may use: ``None`` for the base's own, then the converted ones."""
        return (None,) * self.uses_base_controlnet + tuple(a for a, _ in self.adapters if is_controlnet(a))

    def controlnet(self, name: str | None) -> AdapterFile | None:
        """The ControlNet a unit names (``canny``: the base's own; ``None``: the set's only one), or LoramgrError."""
        if name in (None, BASE_CONTROLNET) and self.uses_base_controlnet:
            return None
        converted = [a for a in self.controlnets() if a is not None]
        found = next((a for a in converted if a.name == name), converted[0] if name is None and len(converted) == 1
                     else None)
        if found is None:
            available = ", ".join(BASE_CONTROLNET if a is None else a.name for a in self.controlnets()) or "none"
            raise LoramgrError(f"ControlNet {name or BASE_CONTROLNET!r} is not in this adapter set (it has: {available})")
        return found

    def loras(self) -> "AdapterSet":
        """This set without its ControlNets: what the UNet and the text encoder carry."""
        return AdapterSet(tuple((a, w) for a, w in self.adapters if not is_controlnet(a)), base_controlnet=False)

    def touched(self) -> Names:
        """Graph -> initializer names this set changes (ControlNet weights under ``controlnet``, any slot)."""
        out: Names = defaultdict(set)
        for adapter, _ in self.adapters:
            for t in adapter.targets.values():
                out[t.graph].add(t.initializer)
        return dict(out)

    def describe(self) -> list[dict]:
        """Name, kind, weight and source (name, sha256) of every adapter: what a sidecar records."""
        return [{"name": a.name, "kind": a.kind, "weight": w, "source": a.metadata.get("loramgr.source_name", ""),
                 "source_sha256": a.metadata.get("loramgr.source_sha256", "")} for a, w in self.adapters]


def touched_names(*parts: AdapterSet | Names | None) -> Names:
    """Graph -> initializer names touched by any of ``parts`` (adapter sets or name maps), a new dict.

    The one helper for "which weights may differ from the base": a runner's swappable
    buffers, a refit plan (old set + new set), the union over a sweep.
    """
    out: Names = defaultdict(set)
    for part in parts:
        if part is None:
            continue
        names = part.touched() if isinstance(part, AdapterSet) else part
        for graph, initializers in names.items():
            out[graph] |= set(initializers)
    return dict(out)


def union_touched(sets: Iterable[AdapterSet]) -> Names:
    """:func:`touched_names` over an iterable of sets."""
    return touched_names(*sets)


def parse_adapter_spec(spec: str) -> tuple[str, float | None]:
    """``NAME[:WEIGHT]`` -> (name, weight or None for the adapter's default)."""
    name, sep, weight = spec.partition(":")
    if not sep:
        return name, None
    return name, parse_weight(weight, f"adapter {spec!r}", " (use NAME:0.8)")


def load_adapter_set(workspace: Workspace, manifest: Manifest, loras: Iterable[str],
                     control: str | Iterable[str | None] | None = None) -> AdapterSet:
    """Load ``NAME[:WEIGHT]`` LoRAs and the ControlNets units use, checked against ``manifest``.

    ``control``: one ControlNet name or several (the units' ControlNets, repeats allowed);
    ``None`` or ``"canny"`` is the base's own. An empty list: no ControlNet at all.
    """
    chosen: list[tuple[AdapterFile, float]] = []
    for spec in loras:
        name, weight = parse_adapter_spec(spec)
        adapter = load_named(workspace, name)
        if is_controlnet(adapter):
            raise LoramgrError(f"{name} is a ControlNet adapter: pass it with --control {name}")
        chosen.append((adapter, adapter.default_weight if weight is None else weight))
    names = [control] if control is None or isinstance(control, str) else list(control)
    wanted = list(dict.fromkeys(BASE_CONTROLNET if n is None else n for n in names))  # distinct, in order
    controlnets = []
    for name in wanted:
        if name == BASE_CONTROLNET:
            continue
        adapter = load_named(workspace, name)
        if not is_controlnet(adapter):
            raise LoramgrError(f"--control {name}: {adapter.path} is a {adapter.kind} adapter, not a ControlNet")
        controlnets.append((adapter, 1.0))
    for adapter, _ in (*controlnets, *chosen):
        adapter.check_base(manifest)
    return AdapterSet(tuple(controlnets + chosen), base_controlnet=BASE_CONTROLNET in wanted)


def load_named(workspace: Workspace, name: str) -> AdapterFile:
    """``adapters/NAME.lora`` (or a path ending in ``.lora``), with the adapters there named when missing."""
    path = Path(name) if name.endswith(".lora") else workspace.adapter_path(name)
    if not path.is_file():
        available = ", ".join(workspace.adapter_names()) or "none; run loramgr convert first"
        raise LoramgrError(f"unknown adapter {name!r}: no {path} (adapters: {available})")
    return load_adapter(path)


@dataclass(frozen=True)
class AdapterChoice:
    """One adapter set to run, by name: LoRAs as ``NAME[:WEIGHT]`` and the ControlNets its units use.

    ``control``: the ControlNet of a one-unit run (``None``/``canny``: the base's);
    ``controls``, when given, the ControlNets of several units instead (``()``: none at all).
    """

    loras: tuple[str, ...] = ()
    control: str | None = None
    controls: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, spec: str, workspace: Workspace) -> "AdapterChoice":
        """``blindbox:0.8,moxin:0.5,hed`` (a ControlNet name switches the ControlNet); ``none``: the plain base."""
        from .adapter_file import read_metadata

        loras, control = [], None
        for item in filter(None, (i.strip() for i in spec.split(","))):
            if item in ("none", BASE_CONTROLNET):
                continue
            name = item.partition(":")[0]
            path = workspace.adapter_path(name)
            if path.is_file() and read_metadata(path).get("loramgr.kind") == "controlnet":
                control = name
            else:
                loras.append(item)
        return cls(tuple(loras), control)

    def controlnet_names(self) -> tuple[str, ...]:
        """The distinct ControlNets this choice uses (``canny``: the base's own), in order."""
        names = (self.control,) if self.controls is None else self.controls
        return tuple(dict.fromkeys(BASE_CONTROLNET if n is None else n for n in names))

    def key(self) -> tuple:
        """What identifies the loaded set: the LoRAs as written and the ControlNets in use."""
        return tuple(self.loras), self.controlnet_names()

    def load(self, workspace: Workspace, manifest: Manifest) -> AdapterSet:
        return load_adapter_set(workspace, manifest, self.loras, self.controlnet_names())

    def label(self) -> str:
        controls = ([self.control] if self.control else []) if self.controls is None else list(self.controls)
        return "+".join([*self.loras, *controls]) or "base"
