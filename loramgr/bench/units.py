"""Step time by ControlNet units and guidance, and the split graphs against the fused graph of base format 1.

All variants run on one ORT runner (loramgr's defaults, plain base), interleaved repeat by
repeat: the pipeline's step (:meth:`~loramgr.bench.fixtures.StepInputs.stepper`) with
0, 1, 2 and 3 units at CFG scale 7, the one-unit step at CFG scale 1 (no unconditional
half: a batch of 1), and base format 1's step on the fused graph (:mod:`.fused`).

The units of the 2- and 3-unit rows repeat the base's ControlNet: a unit costs one
ControlNet call whichever ControlNet it names (every SD1.5 ControlNet has the same
graph). What distinct ControlNets cost in memory is :func:`loramgr.bench.memory.bench_slots`.
"""

from __future__ import annotations

from operator import truediv
from pathlib import Path

import numpy as np

from ..backends.onnxruntime import OrtOptions, OrtRunner, plain_session
from ..manifest import Manifest
from ..workspace import Workspace
from .fixtures import GUIDED_SCALE, StepInputs
from .fused import fused_feeds, fused_graph, fused_stepper
from .harness import Step, _synced, interleaved, paired

UNIT_COUNTS = (0, 1, 2, 3)

NO_GUIDANCE_SCALE = 1.0


def bench_units(workspace: Workspace, base_dir: Path, manifest: Manifest, inputs: StepInputs, repeats: int,
                provider: str, step: Step) -> dict:
    """Seconds per step by units (0-3), CFG 1 against 7, and one unit against the fused graph; their ratios.

    Ratios are taken within each repeat and their median reported (:func:`~.harness.paired`):
    a step takes seconds to tens of seconds, long enough for the load to change within a run.

    ``max_abs_diff_vs_fused``: the split graphs' and the fused graph's noise on one input (same
    weights, same nodes: they agree to rounding, or the two routes timed hold different models).
    """
    path = fused_graph(workspace, base_dir, manifest, step)
    options = OrtOptions(provider=provider)
    step(f"units ({provider}): opening the runner and the fused graph's session")
    with OrtRunner.open(base_dir, options=options) as runner:
        fused = plain_session(path, options)
        variants = {f"units_{k}": inputs.stepper(runner, (None,) * k) for k in UNIT_COUNTS}
        variants["cfg_1"] = inputs.stepper(runner, (None,), NO_GUIDANCE_SCALE)
        variants["fused"] = fused_stepper(fused, inputs, runner.device)
        timed = {name: _synced(fn, provider) for name, fn in variants.items()}
        for fn in timed.values():
            fn()  # warm-up
        diff = float(np.abs(inputs.noise(runner).cpu().numpy() - fused.run(None, fused_feeds(inputs))[0]).max())
        step(f"units ({provider}): {', '.join(map(str, UNIT_COUNTS))} units, CFG 1, fused graph; {repeats}x")
        times = interleaved(timed, repeats)
        del fused
    one = times["units_1"]

    def added(more: float, fewer: float, one_unit: float) -> float:
        return (more - fewer) / one_unit

    return {
        **inputs.describe(), "guidance_scale": GUIDED_SCALE, "times": times,
        "no_unit_vs_one": paired(truediv, times["units_0"], one),
        "added_unit_vs_one": {str(k): paired(added, times[f"units_{k}"], times[f"units_{k - 1}"], one)
                              for k in UNIT_COUNTS[2:]},  # unit k: what it adds
        "cfg_1_vs_cfg_7": paired(truediv, times["cfg_1"], one),
        "one_unit_vs_fused": paired(truediv, one, times["fused"]),
        "max_abs_diff_vs_fused": diff,
    }
