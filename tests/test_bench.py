"""``loramgr bench`` on the tiny base: structure and internal consistency, never speed.

Timings on a shared machine prove nothing about which route is faster, so no test
compares two of them; what is checked is that every figure exists, is positive, and
that ratios are the ratios of the medians reported next to them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import statistics
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from loramgr import bench
from loramgr.bench import LARGE, RANKS, SMALL, interleaved, render_bench, run_bench
from loramgr.bench.harness import competing_process
from loramgr.errors import LoramgrError
from loramgr.manifest import Manifest
from loramgr.workspace import Workspace


@pytest.fixture(scope="module")
def bench_workspace(tiny_workspace, tmp_path_factory) -> Workspace:
    """A workspace whose ``bench-tiny`` is the session's tiny base (same arch and seed) copied: no export."""
    workspace = Workspace.resolve(tmp_path_factory.mktemp("bench"))
    target = workspace.base_dir("bench-tiny")
    shutil.copytree(tiny_workspace.base_dir("tiny"), target)
    manifest = Manifest.load(target)
    manifest.name = "bench-tiny"
    manifest.save(target)
    return workspace


@pytest.fixture(scope="module")
def result(bench_workspace) -> dict:
    """One bench run, kept under a minute.

    Only the first ORT setting row is measured (the others take the same path), and
    torch runs on one thread, since two OpenMP threads on a shared 2-core machine make
    the run several times slower (docs/benchmarks.md).
    """
    all_settings = bench._ort_settings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bench, "_ort_settings", lambda *args: dict(list(all_settings(*args).items())[:1]))
            return run_bench(bench_workspace, "tiny", repeats=1)
    finally:
        torch.set_num_threads(threads)


def _positive_timing(timing: dict, repeats: int = 1) -> None:
    assert len(timing["runs_s"]) == repeats and all(t > 0 for t in timing["runs_s"])
    assert timing["median_s"] == statistics.median(timing["runs_s"])


def test_result_is_json_and_describes_the_machine(result):
    assert json.loads(json.dumps(result))["arch"] == "tiny"
    machine, versions = result["machine"], result["versions"]
    assert machine["physical_cores"] >= 1 and machine["ram_bytes"] > 0 and machine["cpu"]
    assert {"torch", "onnxruntime", "diffusers"} <= set(versions)
    assert result["base"]["name"] == "bench-tiny" and result["base"]["export_s"] is None  # the copied base


def test_convert_covers_both_ranks(result):
    for rank in RANKS:
        row = result["convert"][f"r{rank}"]
        _positive_timing(row)
        assert row["rank"] == rank
        assert row["modules"]["unet_controlnet"] > 0 and row["modules"]["text_encoder"] > 0
        assert row["source_bytes"] > 0 and row["lora_bytes"] > 0
    assert result["convert"][f"r{LARGE}"]["source_bytes"] > result["convert"][f"r{SMALL}"]["source_bytes"]


def test_swap_routes_are_measured_and_agree(result):
    swap = result["swap"]
    times = swap["times"]
    for timing in times.values():
        _positive_timing(timing)
    hot = times[f"hot_swap_r{SMALL}"]["median_s"]
    assert swap["speedup_vs_merged_all"] == pytest.approx(times["merged_export_all"]["median_s"] / hot)
    assert swap["speedup_vs_merged_basic"] == pytest.approx(times["merged_export_basic"]["median_s"] / hot)
    assert swap["speedup_vs_injection"] == pytest.approx(times["injection"]["median_s"] / hot)
    floor = times["copy_floor"]["median_s"]
    for rank in RANKS:
        assert swap["vs_floor"][f"r{rank}"] == pytest.approx(times[f"hot_swap_r{rank}"]["median_s"] / floor)
    load = swap["under_load"]
    for name, timing in load["times"].items():
        _positive_timing(timing)
        assert load["vs_quiet"][name] == pytest.approx(timing["median_s"] / times[name]["median_s"])
    assert set(load["times"]) == {f"hot_swap_r{SMALL}", f"hot_swap_r{LARGE}", "copy_floor"}
    assert swap["buffers"]["count"] == sum(swap["lora"]["targets"].values()) and swap["buffers"]["bytes"] > 0
    # Both sample LoRAs cover the same modules: a swap rewrites every buffer.
    assert swap["buffers"]["rewritten_bytes"] == swap["buffers"]["bytes"]
    # The three routes hold the same weights at the same optimization level.
    assert swap["max_abs_diff"]["merged_export_vs_injection"] < 1e-4
    assert swap["max_abs_diff"]["hot_swap_vs_injection"] < 1e-4


def test_step_ratios_come_from_the_medians(result):
    step = result["step"]
    assert step["image"] == 128 and step["latent"] == [2, 4, 16, 16]
    vs_torch = step["vs_torch"]
    _positive_timing(vs_torch["torch"])
    _positive_timing(vs_torch["ort"])
    assert vs_torch["speedup"] == pytest.approx(vs_torch["torch"]["median_s"] / vs_torch["ort"]["median_s"])
    assert len(step["ort_settings"]) == 1
    for row in step["ort_settings"].values():
        _positive_timing(row)
        assert row["speedup_vs_default"] == pytest.approx(row["default_median_s"] / row["median_s"])
        assert row["speedup_vs_torch"] == pytest.approx(vs_torch["speedup"] * row["speedup_vs_default"])


def test_memory_is_measured_in_a_child(result):
    memory = result["memory"]
    assert memory["base_weights_bytes"] > 0
    assert memory["peak_rss_bytes"] > memory["imports_rss_bytes"] > 0
    assert memory["ratio"] == pytest.approx(memory["peak_rss_bytes"] / memory["base_weights_bytes"])


def test_gpu_and_goals(result):
    gpu = result["gpu"]
    assert gpu["measured"] or gpu["reason"].startswith("not measured: no GPU")
    assert len(result["goals"]) == 7
    assert all(not g["applies"] and isinstance(g["passed"], bool) for g in result["goals"])  # sd15 goals


def test_render_prints_every_table_with_the_machine(result):
    buffer = io.StringIO()
    render_bench(result, Console(file=buffer, width=200))
    text = buffer.getvalue()
    for title in ("convert", "swap to a rank-4 LoRA", "step", "memory", "GPU", "goals"):
        assert title in text
    assert text.count(result["machine"]["cpu"]) == 6 and "onnxruntime" in text


def test_summary_is_one_line_per_measurement_in_80_columns(result):
    from loramgr.bench.rendering import render_summary

    buffer = io.StringIO()
    render_summary(result, Console(file=buffer, width=80, color_system=None))
    text = buffer.getvalue()
    lines = text.splitlines()
    assert "…" not in text and all(len(line.rstrip()) <= 80 for line in lines), text
    for label in ("convert", "swap", "step", "memory", "GPU", "goals"):
        assert sum(line.startswith(label + " ") for line in lines) == 1, label
    assert f"hot swap to rank {SMALL}: {result['swap']['times'][f'hot_swap_r{SMALL}']['median_s']:.3f} s" in text
    assert f"{result['step']['vs_torch']['speedup']:.2f}x faster than diffusers torch" in text
    assert "not judged on tiny" in text and result["machine"]["cpu"] in text and "--verbose" in text
    assert len(lines) < 16


def test_interleaved_runs_variants_in_turn():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 3
    assert all(len(t["runs_s"]) == 3 for t in times.values())


def test_competing_process_spins_and_is_gone_after():
    """While the block runs the process spins on a CPU (state R, CPU time growing), then it is killed and reaped."""
    with competing_process(limit_s=120) as pid:
        stat = Path(f"/proc/{pid}/stat")
        if stat.is_file():  # Linux
            def fields() -> list[str]:  # after "pid (comm)": state, ..., utime at index 11
                return stat.read_text().rsplit(")", 1)[1].split()

            ticks = os.sysconf("SC_CLK_TCK")
            deadline = time.monotonic() + 60
            while int(fields()[11]) < 0.3 * ticks:  # 0.3 s of CPU: past start-up, in its loop
                assert time.monotonic() < deadline, f"not spinning: {fields()[:1] + fields()[11:13]}"
            states = [fields()[0] for _ in range(200)]
            assert set(states) == {"R"}, states  # running or runnable, never asleep
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(LoramgrError, match="--arch"):
        run_bench(Workspace.resolve(tmp_path), "sdxl")
    with pytest.raises(LoramgrError, match="--repeats"):
        run_bench(Workspace.resolve(tmp_path), "tiny", repeats=0)


DEVICE_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"


def _device_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(DEVICE_CHECK.parents[1])}
    return subprocess.run([sys.executable, str(DEVICE_CHECK), *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def test_device_check_runs_every_part_on_the_cpu(bench_workspace, result, tmp_path):
    """The GPU script's every step on tiny/CPU: swaps, fresh-session equality, floor, step, table and JSON."""
    out = tmp_path / "device.json"
    done = _device_check("--home", str(bench_workspace.home), "--arch", "tiny", "--provider", "cpu",
                         "--repeats", "1", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    checked = json.loads(out.read_text())
    assert checked["passed"] and len(checked["checks"]) == 6 and all(checked["checks"].values())
    assert all(len(runs) == 3 and min(runs) > 0 for runs in checked["swaps_s"].values())
    assert checked["agreement"]["A"]["vs_fresh_device_merge"] == 0.0 and checked["a_vs_b"] > 1e-3
    assert checked["step"]["vs_torch"]["speedup"] > 0 and checked["floor"]["median_s"] > 0
    assert "device check: tiny, ORT cpu" in done.stdout and "FAIL" not in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_check_without_a_gpu_says_why_in_one_line(tmp_path):
    done = _device_check("--home", str(tmp_path), "--arch", "tiny")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "CUDA" in done.stderr and "Traceback" not in done.stderr
