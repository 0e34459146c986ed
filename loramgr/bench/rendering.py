"""``loramgr bench``'s tables: one rich table per measurement, captioned with the machine and versions."""

from __future__ import annotations

from ..console import human_size, table
from .fixtures import LARGE, SMALL


def _caption(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    load = (f", load {m['load_average'][0]:.1f} -> {result['load_average_end'][0]:.1f}"
            if m["load_average"] and result["load_average_end"] else "")
    return (f"{m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical), "
            f"{m['ram_bytes'] / 2**30:.0f} GiB RAM{load}; torch {v['torch']} ({v['torch_threads']} threads), "
            f"onnxruntime {v['onnxruntime']}, diffusers {v['diffusers']}; "
            f"{result['arch']}, medians of {result['repeats']}")

def _s(timing: dict) -> str:
    return f"{timing['median_s']:.3f}"

def _convert_table(result: dict):
    return table("convert: kohya LoRA (UNet + text encoder) -> .lora",
                 ["rank", "seconds", "weights", "source", ".lora"],
                 [[c["rank"], _s(c), sum(c["modules"].values()), human_size(c["source_bytes"]),
                   human_size(c["lora_bytes"])] for c in result["convert"].values()])

def _swap_table(swap: dict, where: str = "CPU"):
    t, small, large = swap["times"], f"hot_swap_r{SMALL}", f"hot_swap_r{LARGE}"
    load, diff = swap["under_load"], swap["max_abs_diff"]
    lt = load["times"]
    return table(
        f"swap to a rank-{SMALL} LoRA, UNet and text encoder ({where}); (a), (b): new sessions",
        ["route", "seconds", "ratio"],
        [["(a) merged export, level all", _s(t["merged_export_all"]),
          f"(c) is {swap['speedup_vs_merged_all']:.1f}x faster"],
         ["(a) merged export, level basic", _s(t["merged_export_basic"]),
          f"(c) is {swap['speedup_vs_merged_basic']:.1f}x faster"],
         ["(b) injection (merge + sessions)", _s(t["injection"]),
          f"(c) is {swap['speedup_vs_injection']:.1f}x faster"],
         [f"(c) hot swap r{LARGE} -> r{SMALL}", _s(t[small]), f"{swap['vs_floor'][f'r{SMALL}']:.2f}x the floor"],
         [f"(c) hot swap r{SMALL} -> r{LARGE}", _s(t[large]), f"{swap['vs_floor'][f'r{LARGE}']:.2f}x the floor"],
         [f"floor: copy of the {human_size(swap['buffers']['rewritten_bytes'])} rewritten",
          _s(t["copy_floor"]), "1.00x"],
         [f"busy core: hot swap r{LARGE} -> r{SMALL}", _s(lt[small]),
          f"{load['vs_quiet'][small]:.2f}x quiet, {load['vs_floor'][f'r{SMALL}']:.2f}x floor"],
         [f"busy core: hot swap r{SMALL} -> r{LARGE}", _s(lt[large]),
          f"{load['vs_quiet'][large]:.2f}x quiet, {load['vs_floor'][f'r{LARGE}']:.2f}x floor"],
         ["busy core: floor", _s(lt["copy_floor"]), f"{load['vs_quiet']['copy_floor']:.2f}x quiet"],
         [f"hot-swap buffers: {swap['buffers']['count']} ({human_size(swap['buffers']['bytes'])})", "", ""],
         ["max |diff| of outputs vs (b)", "",
          f"(a) {diff['merged_export_vs_injection']:.1e}, (c) {diff['hot_swap_vs_injection']:.1e}"]])

def _step_table(step: dict, where: str = "CPU"):
    vs_torch = step["vs_torch"]
    rows = [["diffusers torch (inference_mode)", _s(vs_torch["torch"]), "1.00x", ""],
            ["loramgr ORT defaults (basic)", _s(vs_torch["ort"]), f"{vs_torch['speedup']:.2f}x", "1.00x"]]
    rows += [[f"ORT {label}", _s(row), f"{row['speedup_vs_torch']:.2f}x", f"{row['speedup_vs_default']:.2f}x"]
             for label, row in step.get("ort_settings", {}).items()]
    return table(f"step: one ControlNet unit, batch 2 (CFG), {step['image']}x{step['image']} "
                 f"(latents {step['latent'][2]}x{step['latent'][3]}) ({where})",
                 ["runner", "seconds", "faster than torch", "vs defaults"], rows)

def _units_table(units: dict, where: str = "CPU"):
    t, added = units["times"], units["added_unit_vs_one"]
    rows = [["no unit: the UNet alone", _s(t["units_0"]), f"{units['no_unit_vs_one']:.2f}x"],
            ["1 unit", _s(t["units_1"]), "1.00x"],
            *[[f"{k} units", _s(t[f"units_{k}"]), f"+{x:.2f}x"] for k, x in added.items()],
            ["1 unit, CFG 1 (batch 1)", _s(t["cfg_1"]), f"{units['cfg_1_vs_cfg_7']:.2f}x"],
            ["1 unit, fused graph (format 1)", _s(t["fused"]), f"split: {units['one_unit_vs_fused']:.3f}x fused"],
            ["max |diff| of noise, split vs fused", "", f"{units['max_abs_diff_vs_fused']:.1e}"]]
    return table(f"step by ControlNet units, {units['image']} px, CFG {units['guidance_scale']:g} ({where})",
                 ["step", "seconds", "x 1 unit"], rows)

def _slots_table(slots: dict):
    weights, added = slots["controlnet_weights_bytes"], slots["added_bytes"]
    what = ["none", "the base's own", "+ 1 converted", "+ 2 converted"]
    rows = []
    for row in slots["rows"]:
        k = str(row["slots"])
        rows.append([f"{row['slots']}: {what[row['slots']] if row['slots'] < len(what) else ''}",
                     human_size(row["rss_bytes"])]
                    + (["", "", ""] if not row["slots"] else
                       [f"+{human_size(added[k])}", f"{slots['added_vs_weights'][k]:.2f}x",
                        f"{slots['slot_vs_weights'][k]:.2f}x"]))
    return table(f"memory: ControlNets in slots, RSS after a {slots['image']} px step (child process); "
                 f"one ControlNet's weights: {human_size(weights)}; slot: what the swap and a step add "
                 f"after the ControlNet's file is loaded",
                 ["ControlNets", "RSS", "added", "x weights", "slot"], rows)

def _memory_table(mem: dict):
    weights = mem["base_weights_bytes"]
    return table("memory: peak RSS of a run with 2 LoRAs (child process)", ["what", "size", "x base weights"],
                 [["base weights (external data files)", human_size(weights), "1.00x"],
                  [f"peak RSS, run at {mem['run']['resolution']}px, {mem['run']['steps']} steps",
                   human_size(mem["peak_rss_bytes"]), f"{mem['ratio']:.2f}x"],
                  *[[f"  at the sampled peak: {label}", human_size(mem["at_peak"][key]),
                     f"{mem['at_peak'][key] / weights:.2f}x"]
                    for label, key in (("anonymous", "RssAnon"), ("mapped files", "RssFile")) if key in mem["at_peak"]],
                  ["peak RSS of the imports alone", human_size(mem["imports_rss_bytes"]),
                   f"{mem['imports_rss_bytes'] / weights:.2f}x"]])

def _goals_table(result: dict):
    def verdict(goal: dict) -> str:
        if not goal["applies"]:
            return "not judged"
        return "pass" if goal["passed"] else "FAIL"

    return table("goals (judged on sd15, CPU)", ["goal", "measured", "result"],
                 [[g["goal"], g["measured"], verdict(g)] for g in result["goals"]])

def _tables(result: dict) -> list:
    tables = [_convert_table(result), _swap_table(result["swap"]), _step_table(result["step"]),
              *map(_step_table, result["step_other_sizes"]), _units_table(result["units"]),
              _memory_table(result["memory"]), _slots_table(result["slots"])]
    gpu = result["gpu"]
    if gpu["measured"]:
        tables += [_swap_table(gpu["swap"], gpu["device"]), _step_table(gpu["step"], gpu["device"]),
                   _units_table(gpu["units"], gpu["device"])]
    else:
        tables.append(table("GPU", ["what", "measured"], [["swap, step", gpu["reason"]]]))
    return tables + [_goals_table(result)]

def render_bench(result: dict, console) -> None:
    """Print the result of :func:`run_bench` as rich tables, each captioned with the machine and versions."""
    caption = _caption(result)
    for t in _tables(result):
        t.caption = caption
        t.caption_justify = "left"
        console.print(t)


def _goals_line(result: dict) -> str:
    goals = result["goals"]
    judged = [g for g in goals if g["applies"]]
    if not judged:
        return f"{len(goals)} sd15 goals, not judged on {result['arch']} (loramgr bench --arch sd15)"
    missed = [g for g in judged if not g["passed"]]
    met = f"{len(judged) - len(missed)} of {len(judged)} met"
    return met + "".join(f"; missed: {g['goal']} (measured {g['measured']})" for g in missed)


def render_summary(result: dict, console) -> None:
    """One line per measurement (the figure each is about), readable in 80 columns; the tables are
    :func:`render_bench` (``loramgr bench --verbose``)."""
    from rich.table import Table

    swap, step, mem = result["swap"], result["step"], result["memory"]
    small = swap["times"][f"hot_swap_r{SMALL}"]["median_s"]
    rows = [
        ("convert", ", ".join(f"rank {c['rank']}: {_s(c)} s" for c in result["convert"].values())),
        ("swap", f"hot swap to rank {SMALL}: {small:.3f} s, {swap['speedup_vs_merged_all']:.1f}x faster than new "
                 f"sessions on a merged export, {swap['vs_floor'][f'r{SMALL}']:.1f}x a plain copy"),
        ("step", f"{step['image']} px, batch 2: ORT {_s(step['vs_torch']['ort'])} s, "
                 f"{step['vs_torch']['speedup']:.2f}x faster than diffusers torch"),
        ("memory", f"peak RSS of a run with 2 LoRAs: {human_size(mem['peak_rss_bytes'])}, "
                   f"{mem['ratio']:.2f}x the base weights"),
        ("GPU", f"{result['gpu']['device']}: swap and step measured (--verbose)" if result["gpu"]["measured"]
         else result["gpu"]["reason"]),
        ("goals", _goals_line(result)),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for row in rows:
        grid.add_row(*row)
    console.print(f"bench on {_caption(result)}", highlight=False)
    console.print(grid, highlight=False)
    console.print("every table: loramgr bench --verbose; every number: --json", highlight=False)
