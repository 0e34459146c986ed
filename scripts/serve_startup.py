#!/usr/bin/env python3
"""Start-up cost of `loramgr serve`'s swappable set: open time and memory for one budget.

One ``Engine.start()`` in this process (the runner `loramgr serve` opens), then prints JSON:
open seconds, RSS after the open and peak RSS, which adapters were declared swappable and
the bytes of their buffers. Run once per budget (docs/serving.md's table):

    python scripts/serve_startup.py --home WS --swap-budget-mb 0
    python scripts/serve_startup.py --home WS --swap-budget-mb 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", required=True)
    p.add_argument("--base")
    p.add_argument("--swap-budget-mb", type=int, default=4096)
    args = p.parse_args(argv)
    from loramgr.serve import ServeConfig
    from loramgr.serve.engine import Engine
    from loramgr.workspace import Workspace

    engine = Engine(Workspace.resolve(args.home), ServeConfig(base=args.base, swap_budget_mb=args.swap_budget_mb))
    start = time.perf_counter()
    engine.start()
    print(json.dumps({
        "base": engine.base, "budget_mb": args.swap_budget_mb, "open_s": round(time.perf_counter() - start, 2),
        "rss_mib": round(rss_mib()), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "swappable": engine.startup["swappable_adapters"], "left_out": engine.startup["not_swappable_at_start"],
        "swappable_mib": round(engine.startup["swappable_bytes"] / 2**20, 1)}))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
