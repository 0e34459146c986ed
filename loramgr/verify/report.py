"""The verification report: per-check results, the numbers behind them, JSON and rich tables."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .compare import ImageDiff, OutputDiff, TensorDiff
from .reference import AdapterReference
from .settings import Tolerances

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class CheckResult:
    name: str  # reference | coverage | tensors | untouched | vectors | outputs | conditioning | images | units
    status: str  # passed | failed | skipped
    summary: str


@dataclass
class VerifyReport:
    base: str
    dtype: str
    backend: str
    reference: str  # the route asked for: auto | diffusers | formulas
    tolerances: Tolerances
    adapters: list[AdapterReference]
    checks: list[CheckResult] = field(default_factory=list)
    merged_export: str | None = None
    cached: bool = False
    tensors: list[TensorDiff] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)  # parameters left alone by loramgr that differ in the reference
    untouched_total: int = 0
    outputs: list[OutputDiff] = field(default_factory=list)
    image: ImageDiff | None = None
    vectors: list[OutputDiff] = field(default_factory=list)  # embeddings: the .lora's vectors vs diffusers' rows
    conditioning: list[OutputDiff] = field(default_factory=list)  # the triggers' prompt vs diffusers' encode_prompt
    units: ImageDiff | None = None  # loramgr's pipeline with units vs diffusers' (Multi)ControlNet pipeline
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)  # adapter -> block -> weights (blocks in natural order)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no check failed and at least one comparison ran."""
        compared = any(c.status == PASSED for c in self.checks if c.name not in ("reference", "coverage"))
        return compared and all(c.status != FAILED for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.summary}" for c in self.checks if c.status == FAILED]

    def not_checked(self) -> list[str]:
        """Bundled embeddings the reference could not load, with the reason: ``"NAME (bundled in X): why"``."""
        return [f"{a.name} ({a.note}): {a.unchecked}" for a in self.adapters if a.unchecked]

    def largest_errors(self, n: int) -> list[TensorDiff]:
        return sorted(self.tensors, key=lambda d: -d.rel)[:n]

    def largest_changes(self, n: int) -> list[TensorDiff]:
        return sorted(self.tensors, key=lambda d: -d.change)[:n]

    def to_dict(self) -> dict:
        """Plain JSON values; infinities and NaNs become the strings ``"inf"`` / ``"nan"``."""
        return _plain({**asdict(self), "passed": self.passed})


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def weight_label(diff: TensorDiff) -> str:
    """A weight as the report names it: ``SLOT/param`` where a ControlNet was compared in its slot
    (no brackets: rich would read them as markup)."""
    return f"{diff.slot}/{diff.param}" if diff.slot else diff.param


def _e(value: float) -> str:
    return f"{value:.2e}" if math.isfinite(value) else str(value)


def adapters_label(report: VerifyReport) -> str:
    """The set as ``verify`` was given it: ``blindbox:0.8 + moxin:0.5 + easyneg + hed`` (LoRAs, embeddings,
    then the ControlNets)."""
    loras = [f"{a.name}:{a.weight:g}" for a in report.adapters if a.kind == "lora"]
    named = [a.name for kind in ("embedding", "controlnet") for a in report.adapters if a.kind == kind]
    return " + ".join([*loras, *named])


def worst_figures(report: VerifyReport) -> str:
    """The worst figure of each comparison that ran (relative errors, PSNR) next to its tolerance: one short line."""
    t = report.tolerances
    parts = []
    if report.tensors:
        parts.append(f"weight {report.largest_errors(1)[0].rel:.1e} <= {t.tensor_rtol:.0e}")
    if report.outputs:
        parts.append(f"output {max(o.rel for o in report.outputs):.1e} <= {t.output_rtol:.0e}")
    if report.vectors:
        parts.append(f"vector {max(v.rel for v in report.vectors):.1e} <= {t.tensor_rtol:.0e}")
    if report.conditioning:
        parts.append(f"conditioning {max(c.rel for c in report.conditioning):.1e} <= {t.output_rtol:.0e}")
    for label, image in (("image", report.image), ("units", report.units)):
        if image is not None:
            psnr = image.psnr_db
            parts.append(f"{label} {'identical' if math.isinf(psnr) else f'{psnr:.1f} dB'} >= {t.min_psnr_db:g}")
    return "worst: " + ", ".join(parts) if parts else "no comparison ran"


def render_summary(report: VerifyReport, console) -> None:
    """The verdict in one line (what passed of what), the worst figures, and one line per failed check."""
    passed = sum(c.status == PASSED for c in report.checks)
    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    console.print(f"verify {adapters_label(report)}: {verdict}, {passed}/{len(report.checks)} checks "
                  "vs a merge in torch", highlight=False)
    console.print(f"  {worst_figures(report)}", highlight=False)
    for failure in report.failures():
        console.print(f"  [red]x[/] {failure}", highlight=False)
    for unchecked in report.not_checked():
        console.print(f"  [yellow]![/] not checked: {unchecked}", highlight=False)


def _reference_tables(report: VerifyReport, width: int = 3) -> list:
    """One column per adapter (``width`` adapters per table), one row per figure: readable in 80 columns."""
    from ..console import table

    fields = [("kind", "kind"), ("weight", "weight"), ("merged by", "route"), ("spelling", "spelling"),
              ("modules in file", "file_modules"), ("applied", "applied"), ("weights changed", "changed"),
              ("loramgr targets", "targets")]
    tables = []
    for start in range(0, len(report.adapters), width):
        chunk = report.adapters[start: start + width]
        rows = [(label, *(getattr(a, name) for a in chunk)) for label, name in fields]
        rows.append(("ignored keys", *(len(a.ignored_keys) for a in chunk)))
        if any(a.problem or a.note or a.unchecked for a in chunk):
            rows.append(("note", *("; ".join(filter(None, (a.problem, a.note, a.unchecked and f"not checked: {a.unchecked}")))
                                   for a in chunk)))
        tables.append(table("reference: how diffusers / PEFT / the formulas applied each adapter",
                            ("", *(a.name for a in chunk)), rows))
    return tables


def render_report(report: VerifyReport, console, top: int = 10) -> None:
    """Print ``report`` as rich tables on ``console`` (a ``rich.console.Console``); ``top`` rows per ranking.

    Every table keeps each character at 80 columns (long weight names wrap); the verdict
    line of :func:`render_summary` comes last.
    """
    from ..console import table

    console.print(f"verify {report.base} ({report.dtype}, {report.backend}, reference {report.reference})",
                  highlight=False)
    for reference in _reference_tables(report):
        console.print(reference)
    t = report.tolerances
    console.print(table(
        f"checks ({report.dtype} tolerances: weights {t.tensor_rtol:g}, outputs {t.output_rtol:g}, images >= {t.min_psnr_db:g} dB)",
        ("check", "result", "summary"),
        [(c.name, {PASSED: "[green]passed[/]", FAILED: "[red]FAILED[/]"}.get(c.status, c.status), c.summary)
         for c in report.checks]))
    if report.tensors:
        console.print(table("largest errors (relative to the weight's largest value)",
                            ("weight", "max abs", "rel", "change", ""),
                            [(weight_label(d), _e(d.max_abs), _e(d.rel), _e(d.change), "" if d.passed else "[red]x[/]")
                             for d in report.largest_errors(top)]))
        console.print(table("largest changes made by the adapters", ("weight", "change", "rel error"),
                            [(weight_label(d), _e(d.change), _e(d.rel)) for d in report.largest_changes(top)]))
    for title, diffs in (("graph outputs", report.outputs), ("embeddings' vectors (trigger)", report.vectors),
                         ("text conditioning against diffusers' encode_prompt", report.conditioning)):
        if diffs:
            console.print(table(title, ("compared", "max abs", "rel", ""),
                                [(o.name, _e(o.max_abs), _e(o.rel), "" if o.passed else "[red]x[/]") for o in diffs]))
    coverage = [(adapter, block, n) for adapter, blocks in report.coverage.items() for block, n in blocks.items()]
    console.print(table("weights changed per block", ("adapter", "block", "weights"), coverage))
    ignored = [(a.name, key) for a in report.adapters for key in a.ignored_keys[:top]]
    if ignored:
        console.print(table(f"source keys the reference did not apply (first {top} per adapter)", ("adapter", "key"), ignored))
    render_summary(report, console)
