"""``verify``: loramgr's injected adapters against an independently merged reference, in phases."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..adapters import AdapterSet, load_adapter_set
from ..backends import BACKENDS, open_runner
from ..bases import OpenBase
from ..errors import LoramgrError
from ..inventory import block_of
from ..merge import BaseWeights, merge_tensors
from ..runtime import make_pipeline
from ..workspace import Workspace
from .compare import compare_images, compare_outputs, compare_tensors, untouched_mismatches
from .merged import merged_export
from .reference import AdapterReference, Step, source_of
from .report import FAILED, PASSED, SKIPPED, CheckResult, VerifyReport
from .settings import TOLERANCES, VerifySettings


def verify(
    workspace: Workspace, adapters: Sequence[str], *, base: str | None = None, control: str | None = None,
    backend: str = "ort-cpu", sources: Mapping[str, str | Path] | None = None,
    settings: VerifySettings = VerifySettings(), options=None, on_step: Step | None = None,
) -> VerifyReport:
    """Check ``adapters`` (``NAME[:WEIGHT]``) and ``control`` on ``base`` against a reference merge.

    The reference is the base's source torch model with the adapters' *source files*
    merged by diffusers or by :mod:`loramgr.verify.formulas`, exported like a base
    (cached). ``sources`` maps adapter name -> source path where the path recorded at
    conversion is not right. ``options``: the backend's options object (``OrtOptions``,
    ``TrtOptions``) for the sessions of the outputs and images checks. Returns a report; ``report.passed`` says whether every
    check passed. User errors (unknown names, a missing or changed source file) raise
    :class:`~loramgr.errors.LoramgrError`.

    Example:
        >>> report = verify(Workspace.resolve(), ["blindbox:0.8", "moxin:0.5"], control="hed")
        >>> report.passed, report.failures()
        (True, [])
    """
    # 1. Check inputs
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    if backend not in BACKENDS:
        raise LoramgrError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    opened = OpenBase.resolve(workspace, base)
    base, base_dir, manifest = opened.name, opened.dir, opened.manifest
    adapter_set = load_adapter_set(workspace, manifest, list(adapters), control)
    if not adapter_set.adapters:
        raise LoramgrError("verify needs at least one adapter: NAME[:WEIGHT] or --control NAME")
    resolved = {adapter.name: source_of(adapter, sources or {}) for adapter, _ in adapter_set.adapters}
    tolerances = TOLERANCES[manifest.dtype]

    # 2. Reference: merged by other code, exported like a base (or found in the cache)
    folder, records, cached = merged_export(workspace, base_dir, manifest, adapter_set, resolved, settings.reference,
                                            use_cache=settings.use_cache, on_step=on_step)
    timings["reference_s"], clock = time.perf_counter() - clock, time.perf_counter()
    report = VerifyReport(base, manifest.dtype, backend, settings.reference, tolerances, records,
                          merged_export=str(folder) if folder else None, cached=cached, timings=timings,
                          coverage={a.name: dict(Counter(block_of(t.param) for t in a.targets.values()))
                                    for a, _ in adapter_set.adapters})
    report.checks += [_reference_check(records), _coverage_check(records)]
    if folder is None:
        report.checks += [CheckResult(c, SKIPPED, "no complete reference to compare with") for c in settings.checks]
        return report
    merged_base = OpenBase.open(folder)
    merged = merged_base.manifest
    weights = BaseWeights(manifest, base_dir)

    # 3. Tensors: every injected weight, and every other weight bit for bit
    if "tensors" in settings.checks:
        if on_step:
            on_step("comparing weights")
        report.tensors = compare_tensors(weights, merge_tensors(weights, adapter_set), merged, folder, tolerances.tensor_rtol)
        touched = adapter_set.touched()
        report.untouched = untouched_mismatches(weights, base_dir, touched, merged, folder)
        report.untouched_total = sum(len(g.weights) for g in manifest.graphs.values()) - len(report.tensors)
        report.checks += [_tensor_check(report), _untouched_check(report)]
        timings["tensors_s"], clock = time.perf_counter() - clock, time.perf_counter()

    # 4. Graph outputs and 5. images: an injected session against a plain one on the merged export
    if {"outputs", "images"} & set(settings.checks):
        _compare_sessions(report, opened, adapter_set, merged_base, backend, options, settings, on_step)
        timings["sessions_s"] = time.perf_counter() - clock
    return report


def _compare_sessions(report: VerifyReport, opened: OpenBase, adapter_set: AdapterSet, merged: OpenBase,
                      backend: str, options, settings: VerifySettings, on_step: Step | None) -> None:
    tolerances = report.tolerances
    if on_step:
        on_step(f"opening {backend} sessions")
    if backend == "tensorrt":  # both sides in the precision and profile the base's engines were built with
        from ..backends.tensorrt import engines_dir, resolve_options

        options = resolve_options(engines_dir(opened.dir), options)
    injected = open_runner(opened, adapter_set, backend, options)
    reference = open_runner(merged, AdapterSet(), backend, options)
    try:
        if "outputs" in settings.checks:
            if on_step:
                on_step("comparing graph outputs")
            report.outputs = compare_outputs(injected, reference, opened.manifest, settings.image_size, settings.seed,
                                             tolerances.output_rtol)
            report.checks.append(_outputs_check(report))
        if "images" in settings.checks:
            if on_step:
                on_step("generating the sample image twice")
            image = compare_images(make_pipeline(opened, injected), make_pipeline(merged, reference),
                                   settings.prompt, settings.image_size, settings.steps, settings.seed,
                                   tolerances.min_psnr_db, n_prompt=settings.n_prompt)
            report.image = image
            report.checks.append(CheckResult("images", PASSED if image.passed else FAILED,
                                             f"PSNR {image.psnr_db:.1f} dB (needs >= {tolerances.min_psnr_db:g}), max "
                                             f"pixel difference {image.max_pixel_diff}, {image.size}px, {image.steps} steps"))
    finally:
        injected.close()
        reference.close()


def _reference_check(records: list[AdapterReference]) -> CheckResult:
    problems = [f"{r.name}: {r.problem}" for r in records if r.problem]
    if problems:
        return CheckResult("reference", FAILED, "; ".join(problems))
    routes = Counter(r.route for r in records)
    return CheckResult("reference", PASSED, f"{len(records)} adapters fully applied ("
                       + ", ".join(f"{n} by {route}" for route, n in routes.items()) + ")")


def _coverage_check(records: list[AdapterReference]) -> CheckResult:
    """The reference and loramgr must change the same number of weights per adapter."""
    differ = [f"{r.name}: loramgr changes {r.targets} weights, the reference applied {r.applied}"
              for r in records if not r.problem and r.applied != r.targets]
    if differ:
        return CheckResult("coverage", FAILED, "; ".join(differ))
    return CheckResult("coverage", PASSED, f"{sum(r.targets for r in records)} weights changed, as many as the "
                                           f"reference applied; {sum(len(r.ignored_keys) for r in records)} source keys unused")


def _tensor_check(report: VerifyReport) -> CheckResult:
    rtol = report.tolerances.tensor_rtol
    failed = [d for d in report.tensors if not d.passed]
    if failed:
        named = ", ".join(f"{d.param} (rel {d.rel:.2e})" for d in sorted(failed, key=lambda d: -d.rel)[:5])
        return CheckResult("tensors", FAILED, f"{len(failed)} of {len(report.tensors)} weights differ beyond {rtol:g}: {named}")
    worst = max(report.tensors, key=lambda d: d.rel)
    return CheckResult("tensors", PASSED, f"{len(report.tensors)} weights within {rtol:g} "
                                          f"(largest rel {worst.rel:.2e}, {worst.param})")


def _outputs_check(report: VerifyReport) -> CheckResult:
    rtol = report.tolerances.output_rtol
    failed = [o for o in report.outputs if not o.passed]
    if failed:
        named = ", ".join(f"{o.name} (rel {o.rel:.2e})" for o in failed)
        return CheckResult("outputs", FAILED, f"{len(failed)} of {len(report.outputs)} outputs differ beyond {rtol:g}: {named}")
    worst = max(report.outputs, key=lambda o: o.rel)
    return CheckResult("outputs", PASSED, f"{len(report.outputs)} outputs within {rtol:g} (largest rel {worst.rel:.2e}, {worst.name})")


def _untouched_check(report: VerifyReport) -> CheckResult:
    if report.untouched:
        return CheckResult("untouched", FAILED, f"{len(report.untouched)} weights loramgr leaves alone differ in the "
                                                f"reference, first: {', '.join(report.untouched[:5])}")
    return CheckResult("untouched", PASSED, f"{report.untouched_total} other weights bit-identical to the base")
