"""``loramgr bench`` on the tiny base: structure and internal consistency, never speed.

Timings on a shared machine prove nothing about which route is faster, so no test
compares two of them; what is checked is that every figure exists, is positive, and
that ratios are the ratios of the medians reported next to them.
"""

from __future__ import annotations

import io
import json
import operator
import os
import shutil
import subprocess
import sys
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from loramgr import bench
from loramgr.backends.onnxruntime import OrtOptions, OrtRunner, plain_session
from loramgr.bench import LARGE, RANKS, SMALL, StepInputs, interleaved, render_bench, run_bench
from loramgr.bench.fused import fused_feeds, fused_graph
from loramgr.bench.harness import competing_process, paired
from loramgr.errors import LoramgrError
from loramgr.manifest import Manifest
from loramgr.models.loading import load_components
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
        assert row["modules"]["unet"] > 0 and row["modules"]["text_encoder"] > 0
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


def test_units_rows_come_from_one_interleaving(result):
    units = result["units"]
    assert units["image"] == 128 and units["guidance_scale"] == 7.0
    times = units["times"]
    assert set(times) == {"units_0", "units_1", "units_2", "units_3", "cfg_1", "fused"}
    for timing in times.values():
        _positive_timing(timing)
    run = {name: t["runs_s"][0] for name, t in times.items()}  # one repeat: each ratio is that repeat's
    assert units["no_unit_vs_one"] == pytest.approx(run["units_0"] / run["units_1"])
    assert units["added_unit_vs_one"] == pytest.approx(
        {str(k): (run[f"units_{k}"] - run[f"units_{k - 1}"]) / run["units_1"] for k in (2, 3)})
    assert units["cfg_1_vs_cfg_7"] == pytest.approx(run["cfg_1"] / run["units_1"])
    assert units["one_unit_vs_fused"] == pytest.approx(run["units_1"] / run["fused"])
    # The fused graph holds the same weights and nodes: the same noise (tests below check it against torch).
    assert units["max_abs_diff_vs_fused"] < 1e-5


def test_memory_is_measured_in_a_child(result):
    memory = result["memory"]
    assert memory["base_weights_bytes"] > 0
    assert memory["peak_rss_bytes"] > memory["imports_rss_bytes"] > 0
    assert memory["ratio"] == pytest.approx(memory["peak_rss_bytes"] / memory["base_weights_bytes"])


def test_slot_rows_grow_with_each_controlnet(result, bench_workspace):
    slots = result["slots"]
    manifest = Manifest.load(bench_workspace.base_dir("bench-tiny"))
    assert slots["controlnet_weights_bytes"] == (bench_workspace.base_dir("bench-tiny")
                                                 / manifest.graphs["controlnet"].data).stat().st_size
    rows = slots["rows"]
    assert [r["slots"] for r in rows] == [0, 1, 2, 3]
    assert all(r["rss_bytes"] == r["at_end"]["VmRSS"] > 0 for r in rows)
    for k in (1, 2, 3):
        added = rows[k]["rss_bytes"] - rows[k - 1]["rss_bytes"]
        assert slots["added_bytes"][str(k)] == added
        assert slots["added_vs_weights"][str(k)] == pytest.approx(added / slots["controlnet_weights_bytes"])
        # a converted ControlNet's share: its loaded file, then the slot on top (the base's own has no file)
        before = rows[k]["file_loaded_rss_bytes"] if k > 1 else rows[k - 1]["rss_bytes"]
        assert (rows[k]["file_loaded_rss_bytes"] is None) == (k == 1)
        assert slots["slot_bytes"][str(k)] == rows[k]["rss_bytes"] - before
        assert slots["file_bytes"][str(k)] + slots["slot_bytes"][str(k)] == added
        assert slots["slot_vs_weights"][str(k)] == pytest.approx(slots["slot_bytes"][str(k)]
                                                                 / slots["controlnet_weights_bytes"])
    # the converted ControlNets the rows load: converted once, the base's own first
    assert [a for a in bench_workspace.adapter_names() if "-cn" in a] == ["bench-tiny-cn1", "bench-tiny-cn2"]


def test_gpu_and_goals(result):
    gpu = result["gpu"]
    assert gpu["measured"] or gpu["reason"].startswith("not measured: no GPU")
    assert len(result["goals"]) == 14
    assert all(not g["applies"] and isinstance(g["passed"], bool) for g in result["goals"])  # sd15 goals
    units = result["units"]
    judged = {g["goal"]: g for g in result["goals"]}
    assert judged["step at CFG 1 <= 0.6x a step at CFG 7"]["passed"] == (units["cfg_1_vs_cfg_7"] <= 0.6)
    assert judged["unit 3 adds <= 0.45x a one-unit step"]["measured"] == f"{units['added_unit_vs_one']['3']:.2f}x"


def test_render_prints_every_table_with_the_machine(result):
    buffer = io.StringIO()
    render_bench(result, Console(file=buffer, width=200))
    text = buffer.getvalue()
    for title in ("convert", "swap to a rank-4 LoRA", "step", "step by ControlNet units", "memory",
                  "ControlNets in slots", "GPU", "goals"):
        assert title in text
    assert text.count(result["machine"]["cpu"]) == 8 and "onnxruntime" in text


def test_tables_fit_80_columns_with_their_rows_whole(result):
    buffer = io.StringIO()
    render_bench(result, Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    rows = ("no unit: the UNet alone", "1 unit, CFG 1 (batch 1)", "1 unit, fused graph (format 1)", "3 units",
            "1: the base's own", "3: + 2 converted", "(c) hot swap r128 -> r4", "loramgr ORT defaults (basic)")
    for row in rows:  # on one line: not wrapped
        assert any(row in line for line in lines), row


class _Counting:
    """A runner that records each graph call of a step: which graph, on how many rows."""

    def __init__(self, runner):
        self.runner, self.device, self.calls = runner, runner.device, []

    def control_residuals(self, controlnet, sample, *rest):
        self.calls.append(("controlnet", sample.shape[0]))
        return self.runner.control_residuals(controlnet, sample, *rest)

    def predict_noise(self, sample, *rest):
        self.calls.append(("unet", sample.shape[0]))
        return self.runner.predict_noise(sample, *rest)


def test_step_rows_make_the_graph_calls_they_are_named_for(bench_workspace):
    """0-3 units: as many ControlNet calls, then the UNet, on the CFG batch of 2; CFG 1: one of each on 1 row."""
    base_dir = bench_workspace.base_dir("bench-tiny")
    inputs = StepInputs.random(base_dir, Manifest.load(base_dir), 64)
    with OrtRunner.open(base_dir) as runner:
        counting = _Counting(runner)
        for k in range(4):
            counting.calls.clear()
            assert inputs.stepper(counting, (None,) * k)().shape == (1, 4, 8, 8)
            assert counting.calls == [("controlnet", 2)] * k + [("unet", 2)]
        counting.calls.clear()
        inputs.step(counting, scale=1.0)
        assert counting.calls == [("controlnet", 1), ("unet", 1)]


def test_fused_graph_is_the_format_1_graph_of_the_same_weights(bench_workspace):
    """The joined graph against diffusers' modules in the format-1 wrapper's arithmetic, scales per sample and residual."""
    base_dir = bench_workspace.base_dir("bench-tiny")
    manifest = Manifest.load(base_dir)
    path = fused_graph(bench_workspace, base_dir, manifest, lambda _: None)
    assert fused_graph(bench_workspace, base_dir, manifest, pytest.fail) == path  # cached: not joined again
    for graph in ("unet", "controlnet"):  # the base's weights, not a copy
        assert (path.parent / graph / "model.onnx_data").stat().st_ino == (base_dir / graph / "model.onnx_data").stat().st_ino
    inputs = StepInputs.random(base_dir, manifest, 64, seed=3)
    feeds = fused_feeds(inputs)
    feeds["control_scales"] = np.random.default_rng(0).uniform(0.0, 2.0, (2, 13)).astype(np.float32)
    got = plain_session(path, OrtOptions()).run(None, feeds)[0]
    components = load_components(base_dir / manifest.source["model"])
    sample, t, context, cond = (torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states",
                                                                         "controlnet_cond"))
    scales = torch.from_numpy(feeds["control_scales"])[:, :, None, None, None]
    with torch.inference_mode():
        down, mid = components["controlnet"](sample, t, encoder_hidden_states=context, controlnet_cond=cond,
                                             conditioning_scale=1.0, return_dict=False)
        expected = components["unet"](sample, t, encoder_hidden_states=context,
                                      down_block_additional_residuals=[r * scales[:, i] for i, r in enumerate(down)],
                                      mid_block_additional_residual=mid * scales[:, 12], return_dict=False)[0].numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    unscaled = plain_session(path, OrtOptions()).run(None, fused_feeds(inputs))[0]
    assert np.abs(unscaled - got).max() > 1e-2 * np.abs(expected).max()  # the scales reach the residuals


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


def test_paired_ratios_are_taken_within_each_repeat():
    """The load starting halfway through a repeat: the ratio of medians is off, the median of the repeats' is not."""
    a = {"runs_s": [1.0, 1.0, 1.0, 3.0, 3.0]}  # A: 1 s quiet, 3 s under load
    b = {"runs_s": [2.0, 2.0, 6.0, 6.0, 6.0]}  # B takes twice A; in repeat 3 the load starts between A and B
    assert statistics.median(a["runs_s"]) / statistics.median(b["runs_s"]) == pytest.approx(1 / 6)
    assert paired(operator.truediv, a, b) == 0.5
    assert paired(lambda x, y, z: (x - y) / z, b, a, b) == 0.5


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
    assert checked["passed"] and len(checked["checks"]) == 7 and all(checked["checks"].values())
    assert all(len(runs) == 3 and min(runs) > 0 for runs in checked["swaps_s"].values())
    assert checked["agreement"]["A"]["vs_fresh_device_merge"] == 0.0 and checked["a_vs_b"] > 1e-3
    assert checked["step"]["vs_torch"]["speedup"] > 0 and checked["floor"]["median_s"] > 0
    assert set(checked["units"]["times"]) == {"units_0", "units_1", "units_2", "units_3", "cfg_1", "fused"}
    assert "device check: tiny, ORT cpu" in done.stdout and "FAIL" not in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_check_without_a_gpu_says_why_in_one_line(tmp_path):
    done = _device_check("--home", str(tmp_path), "--arch", "tiny")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "CUDA" in done.stderr and "Traceback" not in done.stderr
