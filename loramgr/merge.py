"""Turn adapters into injectable tensors: base + sum(weight * delta), in the base's layout.

This is the one place where adapters meet base weights, and every route that needs a
merged weight goes through :func:`merge_into`: injection, ``bake``, ``verify``, TensorRT
refit and the hot swap, which writes straight into the buffers ONNX Runtime reads.

Per weight, one pass over its bytes: the base value is copied into the destination
(one ``read`` from the external data file, or a copy from a device-resident base), then
each LoRA is added in place in the initializer's own layout with one ``addmm_``
(``W^T += a * down^T @ up^T`` for a transposed Linear weight), so no full-size
temporary exists. Other adapter kinds (LoHa, LoKr, DoRA, full replacements) go through
:func:`loramgr.formats.merge_weight` in fp32 and are written back once. Weights are
merged in parallel across tensors, each on one torch thread: no OpenMP barrier inside
a weight, so a core taken by another process slows the merge down in proportion
instead of stalling it (docs/benchmarks.md has the figures). The arithmetic is the
same whatever the destination or the number of workers, so injection and hot swap stay
bit-identical.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .adapter_file import AdapterTarget
from .adapters import AdapterSet, Names
from .errors import LoramgrError
from .formats import WeightDelta, merge_weight
from .manifest import Manifest, WeightEntry

Tensors = dict[str, dict[str, torch.Tensor]]  # graph -> initializer -> tensor (ONNX layout and dtype)


class BaseWeights:
    """A base's external data files, read by offset: ``read_into`` (copies) and ``read`` (memory-map views)."""

    def __init__(self, manifest: Manifest, base_dir: Path):
        self.manifest = manifest
        self.base_dir = Path(base_dir)
        self._maps: dict[str, np.memmap] = {}
        self._params = {name: g.by_initializer() for name, g in manifest.graphs.items()}

    def entry(self, graph: str, initializer: str) -> WeightEntry:
        param = self._params[graph].get(initializer)
        if param is None:
            raise LoramgrError(f"initializer {initializer!r} is not a weight of graph {graph!r}")
        return self.manifest.graphs[graph].weights[param]

    def read(self, graph: str, entry: WeightEntry) -> np.ndarray:
        """The base value of one initializer, without copying (a view of a copy-on-write memory map)."""
        if graph not in self._maps:
            self._maps[graph] = np.memmap(self.base_dir / self.manifest.graphs[graph].data, dtype=np.uint8, mode="c")
        return entry.read(self._maps[graph])

    def read_into(self, graph: str, entry: WeightEntry, out: np.ndarray) -> None:
        """Copy one initializer's bytes into ``out`` (C-contiguous, its shape and dtype) with one read.

        One copy from the page cache, no mapping: the pages are not counted again in this
        process's RSS next to ONNX Runtime's own mapping of the same file, and the GIL is
        released while the kernel copies (one file object per call: threads never share a
        file position).
        """
        if out.nbytes != entry.length or not out.flags.c_contiguous:
            raise LoramgrError(f"{entry.initializer}: a {out.nbytes:,}-byte destination for {entry.length:,} bytes")
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        with open(self.base_dir / self.manifest.graphs[graph].data, "rb", buffering=0) as data:
            data.seek(entry.offset)
            while done < entry.length:
                got = data.readinto(view[done:])
                if not got:
                    raise LoramgrError(f"{entry.initializer}: its data file ends before byte "
                                       f"{entry.offset + entry.length:,}; the base is damaged, re-export it")
                done += got

    def close(self) -> None:
        """Release the memory maps (the pages ``read`` touched leave this process's RSS)."""
        self._maps.clear()

    def __enter__(self) -> BaseWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class MergeJob:
    """One initializer to write: its graph, weight entry and the adapter targets applied to it, in order."""

    graph: str
    entry: WeightEntry
    parts: tuple[tuple[AdapterTarget, float], ...]


def plan_merge(base: BaseWeights, adapter_set: AdapterSet, only: Names | None = None,
               graphs: Collection[str] | None = None) -> list[MergeJob]:
    """The initializers ``adapter_set`` touches, plus those of ``only`` (at base value), largest first.

    A hot swap from set A to set B passes A's names as ``only``: they must go back to the base.
    ``graphs``: plan these graphs only.
    """
    for adapter, _ in adapter_set.adapters:
        adapter.check_base(base.manifest)
    contributions: dict[tuple[str, str], list[tuple[AdapterTarget, float]]] = defaultdict(list)
    for adapter, weight in adapter_set.adapters:
        for t in adapter.targets.values():
            contributions[(t.graph, t.initializer)].append((t, weight))
    for graph, names in (only or {}).items():
        for name in names:
            contributions.setdefault((graph, name), [])
    jobs = []
    for (graph, initializer), parts in contributions.items():
        if graphs is not None and graph not in graphs:
            continue
        parts.sort(key=lambda p: p[0].kind != "full")  # a replacement first, deltas on top of it
        jobs.append(MergeJob(graph, base.entry(graph, initializer), tuple(parts)))
    jobs.sort(key=lambda j: -j.entry.length)  # big tensors first: the workers finish together
    return jobs


def _factor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A factor as a fresh fp32 2-D tensor on ``device`` (torch's allocator: same alignment on every route)."""
    tensor = torch.tensor(np.asarray(array), dtype=torch.float32)
    return tensor.reshape(tensor.shape[0], -1).to(device)


def _as_delta(target: AdapterTarget, entry: WeightEntry, device: torch.device) -> WeightDelta:
    def load(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array)).to(device)

    tensors = {k: load(v) for k, v in target.tensors.items() if k != "dora_scale"}
    if target.kind == "full":
        tensors = {"weight": load(entry.to_torch_layout(target.tensors["weight"]))}
    dora = target.tensors.get("dora_scale")
    return WeightDelta(target.param, target.kind, tensors, target.scale,
                       load(dora) if dora is not None else None, target.dora_rule)


def apply_merge(job: MergeJob, out: torch.Tensor) -> None:
    """Turn ``out``, holding ``job``'s base value (ONNX layout and dtype), into the merged value, in place.

    Plain LoRAs: one ``addmm_`` each in the ONNX layout (fp32; an fp16 weight goes
    through one fp32 copy of itself). Anything else: :func:`merge_weight` in the torch
    layout, written back once.
    """
    if not job.parts:
        return
    entry = job.entry
    work = out if out.dtype == torch.float32 else out.float()
    if all(t.kind == "lora" and "dora_scale" not in t.tensors for t, _ in job.parts):
        for target, weight in job.parts:
            up, down = _factor(target.tensors["up"], out.device), _factor(target.tensors["down"], out.device)
            alpha = weight * target.scale
            if entry.layout == "transpose":  # ONNX holds W^T [in, out]: W^T += a * down^T @ up^T
                work.addmm_(down.T, up.T, alpha=alpha)
            else:
                work.view(entry.torch_shape).view(entry.torch_shape[0], -1).addmm_(up, down, alpha=alpha)
    else:
        torch_base = work.T if entry.layout == "transpose" else work.view(entry.torch_shape)
        result = merge_weight(torch_base, [(_as_delta(t, entry, out.device), w) for t, w in job.parts])
        (work.T if entry.layout == "transpose" else work.view(entry.torch_shape)).copy_(result)
    if work is not out:
        out.copy_(work)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread in this thread and in threads started meanwhile (their first torch op reads it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def merge_workers() -> int:
    """Threads for a CPU merge: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def merge_into(base: BaseWeights, adapter_set: AdapterSet, out: Tensors, *, only: Names | None = None,
               base_values: Tensors | None = None, workers: int | None = None,
               graphs: Collection[str] | None = None) -> None:
    """Write the merged value of every initializer the set touches (and of ``only``) into ``out``.

    ``graphs``: merge into these graphs only (a runner with a graph released, docs/design.md).

    ``out[graph][name]``: a contiguous tensor in the initializer's layout and dtype, on
    the CPU or a CUDA device; it is overwritten. The base value comes from
    ``base_values`` when given (a device-resident copy: only the factors cross to the
    device) and from the data files otherwise. CPU merges run on ``workers`` threads
    (default: one per core), parallel across tensors; the result does not depend on it.
    """
    _run_jobs(base, plan_merge(base, adapter_set, only, graphs), out, base_values, workers)


def _run_jobs(base: BaseWeights, jobs: list[MergeJob], out: Tensors, base_values: Tensors | None,
              workers: int | None) -> None:
    missing = [j.entry.initializer for j in jobs if j.entry.initializer not in out.get(j.graph, {})]
    if missing:
        raise LoramgrError(f"{len(missing)} merged weights have no destination (first: {missing[0]})")

    def run(job: MergeJob) -> None:
        target = out[job.graph][job.entry.initializer]
        if tuple(target.shape) != job.entry.shape or not target.is_contiguous():
            raise LoramgrError(f"{job.entry.initializer}: destination {list(target.shape)} does not match "
                               f"the base initializer {list(job.entry.shape)}")
        if base_values is not None:
            target.copy_(base_values[job.graph][job.entry.initializer])
        elif target.device.type == "cpu":
            base.read_into(job.graph, job.entry, target.numpy())
        else:  # a device merge without a resident base: this tensor's base crosses once
            staging = empty_like_entry(job.entry)
            base.read_into(job.graph, job.entry, staging.numpy())
            target.copy_(staging)
        apply_merge(job, target)

    on_cpu = all(t.device.type == "cpu" for named in out.values() for t in named.values())
    count = min(workers or merge_workers(), len(jobs)) if on_cpu else 1
    with one_torch_thread():
        if count <= 1:
            for job in jobs:
                run(job)
        else:
            with ThreadPoolExecutor(count, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                list(pool.map(run, jobs))
    if not on_cpu:
        torch.cuda.synchronize()  # ONNX Runtime reads these buffers from its own stream


def empty_like_entry(entry: WeightEntry, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized tensor shaped and typed as ``entry``'s initializer."""
    return torch.empty(entry.shape, dtype=getattr(torch, np.dtype(entry.dtype).name), device=device)


def merge_tensors(base: BaseWeights, adapter_set: AdapterSet, only: Names | None = None, *,
                  workers: int | None = None, graphs: Collection[str] | None = None
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Graph -> {initializer: merged array} for every initializer the set touches (:func:`merge_into`).

    ``only`` extends the result to initializers the set does not touch (they come back
    at their base value): a hot swap from set A to set B must rewrite A's tensors too.
    Each array is allocated from its initializer's entry, so it has its shape and dtype.
    ``graphs``: merge for these graphs only.
    """
    jobs = plan_merge(base, adapter_set, only, graphs)
    out: Tensors = defaultdict(dict)
    for job in jobs:
        out[job.graph][job.entry.initializer] = empty_like_entry(job.entry)
    _run_jobs(base, jobs, out, None, workers)
    return {graph: {name: t.numpy() for name, t in named.items()} for graph, named in out.items()}
