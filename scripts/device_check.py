#!/usr/bin/env python
"""Device check: ONNX Runtime on CUDA with IO binding, hot swap on the device, step against torch.

On a CUDA machine with only the project's own installs (``pip install -e .`` and then
``onnxruntime-gpu`` in place of ``onnxruntime``), one command, under 8 minutes with the
sd15 export (docs/benchmarks.md, "GPU"):

    python scripts/device_check.py --home /tmp/device-ws --json device.json

It exports a random sd15 base once (cached in ``--home``), converts kohya LoRAs of rank
4 (A) and 128 (B), then on the device:

1. opens a hot-swap runner on A (merge on the device into owned device buffers that
   ONNX Runtime reads through DLPack; inputs and outputs bound with IO binding);
2. swaps A -> B -> A, timing each swap, against a device copy of the bytes a swap
   rewrites (the floor);
3. compares noise_pred and text embeddings after each swap with fresh sessions: a fresh
   hot-swap runner (same device merge: must be bit-identical) and injection (host
   merge, ``add_external_initializers``: within ``INJECTION_TOLERANCE``);
4. times one denoising step with one ControlNet unit (the pipeline's, CFG batch of 2,
   512 px) in ORT and diffusers torch, and ORT again with attention as exported (no
   MultiHeadAttention fusion);
5. times the step with 0 to 3 units, at CFG 1, and on the fused UNet+ControlNet graph of
   base format 1 (``loramgr.bench.units``), and checks the split and fused graphs agree.

It prints one table; exit status 0 when every check passes, 1 when one fails, 2 when
the machine cannot run it (no CUDA for torch or onnxruntime), with one line saying why.
``--arch tiny --provider cpu`` runs every part on the CPU in seconds (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

INJECTION_TOLERANCE = 1e-3  # max |noise_pred diff| between the device merge and the host merge
SWAPS = 3  # A -> B -> A round trips timed


def _max_diff(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check(home: Path, arch: str, provider: str, repeats: int, say=print) -> dict:
    """Run the check on ``arch`` with ``provider``; a JSON-able dict (``passed`` says the verdict)."""
    import torch  # first: onnxruntime-gpu finds the CUDA libraries torch brought

    from loramgr.adapters import load_adapter_set, touched_names, union_touched
    from loramgr.backends.onnxruntime import OrtOptions, OrtRunner, providers
    from loramgr.bench.fixtures import (
        CHECK_IMAGE, LARGE, LORA_WEIGHT, SMALL, STEP_IMAGE, StepInputs, _adapter_name, _ensure_base, _sample_loras,
    )
    from loramgr.bench.harness import _synced, interleaved, machine_info, versions
    from loramgr.bench.measurements import _copy_floor, bench_step
    from loramgr.bench.units import bench_units
    from loramgr.convert import convert_adapter
    from loramgr.errors import LoramgrError
    from loramgr.manifest import Manifest
    from loramgr.workspace import Workspace

    start = time.perf_counter()
    options = OrtOptions(provider=provider)
    providers(options)  # refuses early, in one line, when onnxruntime has no such provider
    if provider == "cuda" and not torch.cuda.is_available():
        raise LoramgrError("torch sees no CUDA device: install a CUDA build of torch on a GPU machine")
    workspace = Workspace.resolve(home)
    base, export_s = _ensure_base(workspace, arch, say)
    base_dir = workspace.base_dir(base)
    manifest = Manifest.load(base_dir)
    for rank, source in _sample_loras(workspace, arch, manifest).items():
        if not workspace.adapter_path(_adapter_name(base, rank)).is_file():
            convert_adapter(workspace, source, base=base, name=_adapter_name(base, rank))
    sets = {rank: load_adapter_set(workspace, manifest, [f"{_adapter_name(base, rank)}:{LORA_WEIGHT}"])
            for rank in (SMALL, LARGE)}
    inputs = StepInputs.random(base_dir, manifest, CHECK_IMAGE, seed=1)
    ids = torch.arange(77, dtype=torch.int64).reshape(1, 77) % 3

    def outputs(runner) -> tuple:
        return inputs.noise(runner).cpu().numpy(), runner.encode_text(ids).cpu().numpy()

    say(f"hot-swap runner on {provider}: A (rank {SMALL}), swappable for B (rank {LARGE})")
    hot = OrtRunner.open(base_dir, sets[SMALL], options, swappable=union_touched(sets.values()))
    try:
        seen = {"A0": outputs(hot)}
        swaps: dict[str, list[float]] = {"A->B": [], "B->A": []}
        for _ in range(SWAPS):
            swaps["A->B"].append(hot.set_adapters(sets[LARGE]))
            seen["B"] = outputs(hot)
            swaps["B->A"].append(hot.set_adapters(sets[SMALL]))
            seen["A"] = outputs(hot)
        buffers = {g: s.buffers for g, s in hot._graphs.items()}
        floor = interleaved({"floor": _synced(_copy_floor(buffers, touched_names(*sets.values())), provider)},
                            SWAPS)["floor"]
        device_buffers = sorted({str(t.device) for named in buffers.values() for t in named.values()})
    finally:
        hot.close()
    fresh: dict[str, dict] = {}
    for key, rank in (("A", SMALL), ("B", LARGE)):
        say(f"fresh sessions for {key}: hot-swap runner and injection")
        for route, hot_swap in (("device merge", True), ("injection", False)):
            with OrtRunner.open(base_dir, sets[rank], OrtOptions(provider=provider, hot_swap=hot_swap)) as runner:
                fresh.setdefault(key, {})[route] = outputs(runner)
    agreement = {
        key: {"vs_fresh_device_merge": max(_max_diff(x, y) for x, y in zip(seen[key], fresh[key]["device merge"])),
              "vs_injection": max(_max_diff(x, y) for x, y in zip(seen[key], fresh[key]["injection"]))}
        for key in ("A", "B")}
    a_vs_b = _max_diff(seen["A"][0], seen["B"][0])
    say(f"step at {STEP_IMAGE[arch]} px: ORT against diffusers torch, {repeats}x")
    unfused = {"attention as exported (--no-fuse-attention)": lambda: OrtRunner.open(
        base_dir, options=OrtOptions(provider=provider, fuse_attention=False))}
    step_inputs = StepInputs.random(base_dir, manifest, STEP_IMAGE[arch])
    step = bench_step(base_dir, manifest, step_inputs, repeats, provider, say, unfused)
    units = bench_units(workspace, base_dir, manifest, step_inputs, repeats, provider, say)
    checks = {
        "A -> B -> A equals a fresh session, bit for bit": agreement["A"]["vs_fresh_device_merge"] == 0.0,
        "B equals a fresh session, bit for bit": agreement["B"]["vs_fresh_device_merge"] == 0.0,
        f"injection (host merge) within {INJECTION_TOLERANCE:g}": max(
            a["vs_injection"] for a in agreement.values()) <= INJECTION_TOLERANCE,
        "the first A equals the last A, bit for bit": max(_max_diff(x, y) for x, y in zip(seen["A0"], seen["A"])) == 0,
        f"A and B differ (by more than {INJECTION_TOLERANCE:g})": a_vs_b > INJECTION_TOLERANCE,
        f"swappable buffers live on {provider}": device_buffers == [("cuda:0" if provider == "cuda" else "cpu")],
        f"split and fused graphs agree (within {INJECTION_TOLERANCE:g})":
            units["max_abs_diff_vs_fused"] <= INJECTION_TOLERANCE,
    }
    return {
        "arch": arch, "provider": provider, "machine": machine_info(), "versions": versions(),
        "device": torch.cuda.get_device_name() if provider == "cuda" else machine_info()["cpu"],
        "export_s": export_s,
        "swaps_s": swaps, "swap_median_s": {k: statistics.median(v) for k, v in swaps.items()},
        "floor": floor, "agreement": agreement, "a_vs_b": a_vs_b, "step": step, "units": units, "checks": checks,
        "passed": all(checks.values()), "seconds": time.perf_counter() - start,
    }


def render(result: dict, console) -> None:
    from loramgr.console import table

    swap, floor, step, units = result["swap_median_s"], result["floor"]["median_s"], result["step"], result["units"]
    unit_times = {name: t["median_s"] for name, t in units["times"].items()}
    vs = step["vs_torch"]
    rows = [
        ["device", result["device"]],
        *[[f"hot swap {key} (rank {ranks}), median of {SWAPS}", f"{swap[key]:.4f} s ({swap[key] / floor:.1f}x floor)"]
          for key, ranks in (("A->B", "4 -> 128"), ("B->A", "128 -> 4"))],
        ["floor: device copy of the bytes a swap rewrites", f"{floor:.4f} s"],
        *[[f"{key} after swaps vs fresh: device merge / injection (max |diff|)",
           f"{a['vs_fresh_device_merge']:.1e} / {a['vs_injection']:.1e}"] for key, a in result["agreement"].items()],
        ["A vs B (max |diff| of noise_pred)", f"{result['a_vs_b']:.1e}"],
        [f"step {step['image']} px, batch 2: diffusers torch / ORT",
         f"{vs['torch']['median_s']:.4f} / {vs['ort']['median_s']:.4f} s ({vs['speedup']:.2f}x)"],
        *[[f"step, ORT {label}", f"{row['median_s']:.4f} s (fused is {1 / row['speedup_vs_default']:.2f}x faster)"]
          for label, row in step["ort_settings"].items()],
        *[[f"step, {k} ControlNet units", f"{unit_times[f'units_{k}']:.4f} s"] for k in range(4)],
        ["step, 1 unit at CFG 1 / on the fused graph",
         f"{units['cfg_1_vs_cfg_7']:.2f}x / split is {units['one_unit_vs_fused']:.3f}x fused"],
        *[[check, "pass" if ok else "FAIL"] for check, ok in result["checks"].items()],
        ["wall time (export included)" if result["export_s"] else "wall time", f"{result['seconds']:.0f} s"],
    ]
    console.print(table(f"device check: {result['arch']}, ORT {result['provider']}", ["what", "measured"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="workspace (base and LoRAs are cached there); default: a temp dir")
    parser.add_argument("--arch", default="sd15", choices=("sd15", "tiny"))
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=5, help="step repeats (default 5)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    from rich.console import Console

    from loramgr.errors import LoramgrError

    console = Console(width=100)
    home = args.home or Path(tempfile.mkdtemp(prefix="loramgr-device-"))
    try:
        result = check(home, args.arch, args.provider, args.repeats, lambda m: console.print(f"[dim]{m}[/]"))
    except LoramgrError as exc:
        print(f"device check: {exc}", file=sys.stderr)
        return 2
    render(result, console)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
