"""The CLI as tests call it: ``main()`` in this process, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

from loramgr.cli import main
from loramgr.workspace import Workspace


def cli(ws: Workspace, *args: str) -> int:
    """``loramgr --home WS ARGS...``; returns the exit code."""
    return main(["--home", str(ws.home), *args])


def one_error_line(capsys, *needles: str) -> str:
    """The single ``error: ...`` line on stderr, checked to contain every needle."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def run_args(image: Path, out: Path, *extra: str) -> list[str]:
    """A fast ``run`` (64 px, one step) of ``image`` into ``out``."""
    return ["run", "--prompt", "x", "--image", str(image), "--resolution", "64", "--steps", "1",
            "--out", str(out), *extra]
