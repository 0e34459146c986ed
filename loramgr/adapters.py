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
from .manifest import Manifest
from .workspace import Workspace

Names = dict[str, set[str]]  # graph -> initializer names


@dataclass(frozen=True)
class AdapterSet:
    """Adapters with their weights, in the order they are applied; at most one ControlNet."""

    adapters: tuple[tuple[AdapterFile, float], ...] = ()

    def __post_init__(self):
        controlnets = [a.name for a, _ in self.adapters if a.kind == "controlnet"]
        if len(controlnets) > 1:
            raise LoramgrError(f"only one ControlNet can be active, got {', '.join(controlnets)}")
        for adapter, weight in self.adapters:
            check_finite(weight, f"{adapter.name} weight")  # a NaN weight renders a black image
            if adapter.kind != "lora" and weight != 1.0:
                raise LoramgrError(f"{adapter.name}: a {adapter.kind} adapter replaces weights; its weight must be 1, got {weight}")

    def touched(self) -> Names:
        """Graph -> initializer names this set changes."""
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


def load_adapter_set(workspace: Workspace, manifest: Manifest, loras: Iterable[str], control: str | None = None
                     ) -> AdapterSet:
    """Load ``NAME[:WEIGHT]`` LoRAs and an optional ControlNet adapter, checked against ``manifest``.

    ``control`` of ``None`` or ``"canny"`` keeps the base's own ControlNet.
    """
    chosen: list[tuple[AdapterFile, float]] = []
    for spec in loras:
        name, weight = parse_adapter_spec(spec)
        adapter = load_named(workspace, name)
        if adapter.kind == "controlnet":
            raise LoramgrError(f"{name} is a ControlNet adapter: pass it with --control {name}")
        chosen.append((adapter, adapter.default_weight if weight is None else weight))
    if control not in (None, "canny"):
        adapter = load_named(workspace, control)
        if adapter.kind != "controlnet":
            raise LoramgrError(f"--control {control}: {adapter.path} is a {adapter.kind} adapter, not a ControlNet")
        chosen.insert(0, (adapter, 1.0))
    for adapter, _ in chosen:
        adapter.check_base(manifest)
    return AdapterSet(tuple(chosen))


def load_named(workspace: Workspace, name: str) -> AdapterFile:
    """``adapters/NAME.lora`` (or a path ending in ``.lora``), with the adapters there named when missing."""
    path = Path(name) if name.endswith(".lora") else workspace.adapter_path(name)
    if not path.is_file():
        available = ", ".join(workspace.adapter_names()) or "none; run loramgr convert first"
        raise LoramgrError(f"unknown adapter {name!r}: no {path} (adapters: {available})")
    return load_adapter(path)


@dataclass(frozen=True)
class AdapterChoice:
    """One adapter set to run, by name: LoRAs as ``NAME[:WEIGHT]`` and a ControlNet (``None``/``canny``: the base's)."""

    loras: tuple[str, ...] = ()
    control: str | None = None

    @classmethod
    def parse(cls, spec: str, workspace: Workspace) -> "AdapterChoice":
        """``blindbox:0.8,moxin:0.5,hed`` (a ControlNet name switches the ControlNet); ``none``: the plain base."""
        from .adapter_file import read_metadata

        loras, control = [], None
        for item in filter(None, (i.strip() for i in spec.split(","))):
            if item in ("none", "canny"):
                continue
            name = item.partition(":")[0]
            path = workspace.adapter_path(name)
            if path.is_file() and read_metadata(path).get("loramgr.kind") == "controlnet":
                control = name
            else:
                loras.append(item)
        return cls(tuple(loras), control)

    def load(self, workspace: Workspace, manifest: Manifest) -> AdapterSet:
        return load_adapter_set(workspace, manifest, self.loras, self.control)

    def label(self) -> str:
        return "+".join([*self.loras, *([self.control] if self.control else [])]) or "base"
