"""What a new user reads: every command's output at 80 columns, the files it says it wrote, --help and --version.

Output is captured from ``main()`` with the CLI's console swapped for an 80-column one. A
line may pass 80 columns only by the file path it ends with (kept whole, so it can be copied).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from cli_support import cli, one_error_line
from loramgr import __version__, console
from loramgr.cli import _parser, main
from loramgr.convert import convert_adapter
from loramgr.manifest import Manifest
from loramgr.samples import write_controlnet, write_kohya_lora
from loramgr.workspace import Workspace

WIDTH = 80


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory) -> Workspace:
    """A copy of the session's tiny base with a kohya LoRA ``lo`` (trigger ``blindbox``) and a ControlNet ``hed``."""
    home = tmp_path_factory.mktemp("cli-out")
    shutil.copytree(tiny_workspace.base_dir("tiny"), home / "base_models" / "tiny")
    ws = Workspace.resolve(home)
    manifest = Manifest.load(ws.base_dir("tiny"))
    src = tmp_path_factory.mktemp("cli-out-src")
    convert_adapter(ws, write_kohya_lora(src / "lo.safetensors", manifest.param_shapes(), seed=3, trigger="blindbox"))
    convert_adapter(ws, write_controlnet(src / "hed", manifest.configs["controlnet"], seed=4), name="hed")
    return ws


@pytest.fixture
def screen(monkeypatch) -> io.StringIO:
    """What the CLI prints on stdout, on an 80-column console without colours."""
    buffer = io.StringIO()
    monkeypatch.setattr(console, "out", Console(file=buffer, width=WIDTH, color_system=None))
    return buffer


def readable(text: str) -> list[str]:
    """``text``'s lines, checked: no cell cut to ``…``, none wider than 80 columns unless it is one path."""
    lines = text.splitlines()
    assert "…" not in text, text
    wide = [line for line in lines if len(line.rstrip()) > WIDTH and not _ends_in_a_path(line.rstrip())]
    assert not wide, "\n".join(wide)
    return lines


def _ends_in_a_path(line: str) -> bool:
    """Wide only by the path it ends with (kept whole, so it can be copied): the rest is a short label."""
    head, _, last = line.rpartition(" ")
    return "/" in last and len(head) <= 40


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"loramgr {__version__}"


def _commands() -> dict:
    return _parser()._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", ["", *_commands()])
def test_help_fits_80_columns_and_shows_every_default(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    with pytest.raises(SystemExit):
        main([*filter(None, [command]), "--help"])
    readable(capsys.readouterr().out)
    parser = _commands()[command] if command else _parser()
    for action in parser._actions:
        default = action.default
        if action.option_strings and action.help is not None and action.help != "==SUPPRESS==" and not (
                default is None or default is False or default == [] or default == "==SUPPRESS=="):
            assert "default" in action.help, (command, action.option_strings, action.help)
    if command == "run":  # the defaults that depend on the base say so
        resolution = next(a for a in parser._actions if a.dest == "resolution")
        assert resolution.default is None and "tiny: 128, sd15: 512" in resolution.help


def test_run_uses_the_bases_defaults_and_lists_every_file(ws, input_png, tmp_path, screen, caplog):
    out = tmp_path / "out"
    assert cli(ws, "run", "--prompt", "a red box", "--image", str(input_png), "--steps", "2", "--out", str(out),
               "--lora", "lo", "--sweep", "none") == 0
    lines = readable(screen.getvalue())
    assert lines[0].startswith("runs on tiny (resolution 128, 2 steps)")
    listed = [Path(line.strip()) for line in lines[lines.index("wrote:") + 1:]]
    assert sorted(listed) == sorted(out.iterdir()) and len(listed) == 6  # 2 runs: image, edge map, sidecar
    images = [p for p in listed if p.suffix == ".png" and not p.name.endswith("-edges.png")]
    assert [Image.open(p).size for p in images] == [(128, 128)] * 2  # tiny's native size from a 64 px input
    assert not [m for m in caplog.messages if "truncated" in m], caplog.messages  # its negative prompt fits
    sidecar = json.loads(next(p for p in listed if p.suffix == ".json").read_text())
    assert sidecar["settings"]["resolution"] == 128


def test_verify_prints_one_verdict_and_its_worst_figures(ws, screen):
    assert cli(ws, "verify", "lo:0.8", "--control", "hed") == 0
    lines = readable(screen.getvalue())
    assert lines[0] == "verify lo:0.8 + hed: PASSED, 6/6 checks vs a merge in torch"
    worst = re.fullmatch(r"  worst: weight (\S+) <= 1e-06, output (\S+) <= 1e-04, image ([\d.]+) dB >= 40", lines[1])
    assert worst and float(worst[1]) <= 1e-6 and float(worst[2]) <= 1e-4 and float(worst[3]) >= 40, lines[1]
    assert lines[2:] == ["  every table: --verbose; every number: --json"]

    screen.truncate(0)
    screen.seek(0)
    assert cli(ws, "verify", "lo:0.8", "--control", "hed", "--verbose") == 0  # the cached reference: quick
    text = screen.getvalue()
    lines = readable(text)
    for title in ("reference", "checks", "largest errors", "largest changes", "graph outputs", "weights changed"):
        assert any(line.startswith(title) for line in lines), title
    assert lines[-2].startswith("verify lo:0.8 + hed: PASSED")  # the verdict comes last
    blocks = [m[1] for m in re.finditer(r"controlnet\.controlnet_down_blocks\.(\d+)", text)]
    assert blocks == [str(i) for i in range(12)]  # natural order: 9 before 10


def test_bake_writes_exactly_the_files_it_names(ws, tmp_path, screen, capsys):
    # the set changes three graphs: one file named is refused before anything is written
    assert cli(ws, "bake", "--lora", "lo", "--control", "hed", "-o", str(tmp_path / "mix.lora")) == 2
    one_error_line(capsys, "text_encoder", "-o text_encoder=")
    assert not any(tmp_path.iterdir())
    assert cli(ws, "bake", "--control", "hed", "-o", f"controlnet={tmp_path / 'a.lora'}",
               "-o", f"text_encoder={tmp_path / 'b.lora'}") == 2
    one_error_line(capsys, "does not change the text_encoder graph")
    assert not any(tmp_path.iterdir())

    unet, controlnet, text_encoder = tmp_path / "mix.lora", tmp_path / "mix-cn.lora", tmp_path / "mix-te.lora"
    assert cli(ws, "bake", "--lora", "lo", "--control", "hed", "-o", str(unet), "-o", f"controlnet={controlnet}",
               "-o", f"text_encoder={text_encoder}") == 0
    lines = readable(screen.getvalue())
    named = {line.split()[0]: Path(line.split()[-1]) for line in lines if line.endswith(".lora")}
    assert named == {"unet": unet, "controlnet": controlnet, "text_encoder": text_encoder}
    assert sorted(tmp_path.iterdir()) == sorted(named.values())


def test_list_of_an_empty_workspace_says_where_it_looked_and_how_to_make_a_base(tmp_path, screen):
    empty = Workspace.resolve(tmp_path / "empty")
    assert cli(empty, "list") == 0
    text = screen.getvalue()
    lines = readable(text)
    assert lines[0].startswith(f"workspace {empty.home}")
    assert "loramgr export --arch tiny --random --name tiny" in text and "loramgr demo" in text
    assert "loramgr convert" in text
    assert "┏" not in text  # no empty tables


def test_list_and_inspect_fit_80_columns_in_natural_order(ws, screen):
    assert cli(ws, "list") == 0
    text = screen.getvalue()
    readable(text)
    assert "blindbox" in text and "hed" in text
    for args in (("inspect", "hed"), ("inspect", "lo"), ("inspect", "tiny"), ("inspect", "tiny", "--verbose")):
        screen.truncate(0)
        screen.seek(0)
        assert cli(ws, *args) == 0
        text = screen.getvalue()
        readable(text)
        if args[1] == "hed" or "--verbose" in args:
            blocks = [m[1] for m in re.finditer(r"controlnet\.controlnet_down_blocks\.(\d+)", text)]
            assert blocks == [str(i) for i in range(12)], blocks  # 2 before 10, not text order
    assert "shape" in text and "weights per block" in text  # --verbose: inputs, outputs and blocks


def test_a_wide_table_wraps_instead_of_cutting():
    buffer = io.StringIO()
    long = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    Console(file=buffer, width=WIDTH, color_system=None).print(
        console.table("t", ("weight", "a", "b", "c", "d"), [(long, *np.arange(4) * 1e-7)]))
    text = buffer.getvalue()
    readable(text)
    first_column = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert len(first_column) > 1 and "".join(first_column) == long  # folded over lines, every character kept
