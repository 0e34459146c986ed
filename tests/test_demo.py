"""``loramgr demo``: the contact sheet, and a summary a newcomer can read in 80 columns."""

from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from loramgr.demo import CONTROL_MAP_LABEL, PANEL, RANDOM_NOTE, SHEET_NAME, render_demo, run_demo
from loramgr.workspace import Workspace


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def demo(tiny_workspace, tmp_path_factory):
    """The demo run once on a workspace holding a copy of the session's tiny base (no second export)."""
    home = tmp_path_factory.mktemp("demo")
    shutil.copytree(tiny_workspace.base_dir("tiny"), home / "base_models" / "tiny")
    records = _Records()
    logging.getLogger("loramgr").addHandler(records)
    try:
        report = run_demo(Workspace.resolve(home), home / "out")
    finally:
        logging.getLogger("loramgr").removeHandler(records)
    return report, records.messages


def _render(report, verbose: bool = False) -> str:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    render_demo(report, console, verbose=verbose)
    return console.file.getvalue()


def test_contact_sheet_shows_every_run_the_control_map_and_the_differences(demo):
    report, _ = demo
    sheet = report["sheet"]
    assert sheet.path.name == SHEET_NAME and sheet.path.is_file()
    image = np.asarray(Image.open(sheet.path).convert("RGB"))
    runs = len(report["runs"])
    assert runs == 3
    assert image.shape[1] == sheet.size[0] > (2 + runs) * PANEL and image.shape[0] == sheet.size[1] > 2 * PANEL
    # input and control map, each run, and under each run its difference (the base: a note)
    assert len(sheet.labels) == 2 + 2 * runs
    # the map is canny edges for every run, the hed ControlNet's too: the label says so
    assert sheet.labels[:2] == ["input image", CONTROL_MAP_LABEL]
    assert "canny edges" in CONTROL_MAP_LABEL and "hed" in CONTROL_MAP_LABEL
    assert sum(label.startswith("run ") for label in sheet.labels) == runs + 1
    assert list(sheet.diffs) == [c.label() for c in report["choices"]]
    assert sheet.diffs["base"] is None
    assert all(d > 0.5 for label, d in sheet.diffs.items() if label != "base"), sheet.diffs
    # the diff panels (bottom row, run columns 1..) are not black in the PNG itself
    pad, title_h, label_h = 12, 30, 40
    top = title_h + label_h + PANEL + pad + label_h
    for column in (3, 4):
        x = pad + column * (PANEL + pad)
        assert image[top: top + PANEL, x: x + PANEL].mean() > 5


def test_no_truncation_warning_for_its_own_prompts(demo):
    _, warnings = demo
    assert not [m for m in warnings if "truncated" in m], warnings


def test_summary_is_short_and_fits_80_columns(demo):
    report, _ = demo
    text = _render(report)
    lines = text.splitlines()
    assert lines[0] == RANDOM_NOTE
    assert sum("random weights" in line for line in lines) == 1
    # the output paths are the user's (a temporary folder here, longer under pytest-xdist): the rest fits 80 columns
    out = str(report["sheet"].path.parent)
    assert all(len(line.rstrip().replace(out, "outputs/demo")) <= 80 for line in lines), text
    assert "…" not in text, text  # no cell cut short
    assert len(lines) <= 20, text
    assert str(report["sheet"].path) in text
    assert "verify blindbox:0.8 + moxin:0.5 + hed: PASSED, 6/6 checks vs a merge in torch" in text
    assert "  worst: weight " in text  # the worst figures, as `loramgr verify` prints them
    assert "largest errors" not in text and "--verbose" in text


def test_verbose_adds_the_verify_tables(demo):
    report, _ = demo
    text = _render(report, verbose=True)
    assert "largest errors" in text and "weights changed per block" in text
