"""The project's performance goals for sd15 on CPU, next to the measured figures.

docs/benchmarks.md has the goals table; on tiny the figures are shown, not judged.
"""

from __future__ import annotations

from .fixtures import RANKS, SMALL

HOT_SWAP_MAX_S = 1.0

HOT_SWAP_MIN_SPEEDUP = 20.0

STEP_MIN_SPEEDUP = 2.5

MEMORY_MAX_RATIO = 1.2


def goals(result: dict) -> list[dict]:
    """The goals next to the measured figures; judged for sd15 only (``applies``)."""
    swap, step, memory = result["swap"], result["step"], result["memory"]
    hot = swap["times"][f"hot_swap_r{SMALL}"]["median_s"]
    rows = [
        (f"hot swap < {HOT_SWAP_MAX_S:g} s", f"{hot:.3f} s", hot < HOT_SWAP_MAX_S),
        (f"hot swap > {HOT_SWAP_MIN_SPEEDUP:g}x faster than new sessions on a merged export (ORT level all)",
         f"{swap['speedup_vs_merged_all']:.1f}x", swap["speedup_vs_merged_all"] > HOT_SWAP_MIN_SPEEDUP),
        (f"ORT step >= {STEP_MIN_SPEEDUP:g}x faster than diffusers torch (loramgr defaults)",
         f"{step['vs_torch']['speedup']:.2f}x", step["vs_torch"]["speedup"] >= STEP_MIN_SPEEDUP),
        (f"peak RSS of a run with {len(RANKS)} LoRAs <= {MEMORY_MAX_RATIO:g}x base weights",
         f"{memory['ratio']:.2f}x", memory["ratio"] <= MEMORY_MAX_RATIO),
    ]
    return [{"goal": g, "measured": m, "passed": bool(p), "applies": result["arch"] == "sd15"} for g, m, p in rows]
