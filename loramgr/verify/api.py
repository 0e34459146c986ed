"""``verify``: loramgr's injected adapters against an independently merged reference, in phases."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..adapter_file import AdapterFile, read_metadata
from ..adapters import BASE_CONTROLNET, AdapterSet, is_controlnet, load_adapter_set, load_named, parse_adapter_spec
from ..backends import BACKENDS, open_runner
from ..backends.base import slot_set
from ..bases import OpenBase
from ..errors import LoramgrError
from ..inventory import block_counts
from ..merge import BaseWeights, merge_tensors
from ..runtime import make_pipeline
from ..workspace import Workspace
from .compare import compare_images, compare_outputs, compare_slot, compare_tensors, compare_vectors, untouched_mismatches
from .merged import merged_export
from .pipelines import (TorchReference, build_torch_reference, check_prompts, compare_conditioning, compare_units,
                        pipeline_prompt, units_for)
from .reference import AdapterReference, Step, source_of
from .report import FAILED, PASSED, SKIPPED, CheckResult, VerifyReport, weight_label
from .settings import TOLERANCES, VerifySettings

EMBEDDING_KINDS = ("embedding", "bundled embedding")


@dataclass
class _Plan:
    """What one verify run compares, decided from its inputs before any reference is built."""

    adapter_set: AdapterSet  # every LoRA and ControlNet
    embeddings: list[AdapterFile]  # the textual-inversion embeddings named among the adapters
    export_set: AdapterSet  # what the export holds: the LoRAs and the first converted ControlNet
    others: list[AdapterFile]  # the other converted ControlNets: compared in their slots, in torch
    units: tuple[str, ...]  # every ControlNet by the name a unit gives it (``canny``: the base's own)
    negative: str | None = None  # the negative prompt of the checks against diffusers (set when they run):
    # the base's default (it fits one CLIP window, which diffusers' ``encode_prompt`` cuts at) unless one is given

    @property
    def exported_controlnet(self) -> str | None:
        """The injected runner's ControlNet the export holds (``None``: the base's own)."""
        return next((a.name for a, _ in self.export_set.adapters if is_controlnet(a)), None)

    @property
    def has_embeddings(self) -> bool:
        """Embedding adapters, or LoRAs that bundle embeddings."""
        return bool(self.embeddings or any(a.embeddings for a, _ in self.adapter_set.adapters))

    @property
    def needs_torch(self) -> bool:
        """Whether the weight checks need the reference in torch: ControlNets outside the export, embeddings."""
        return bool(self.others) or self.has_embeddings

    @property
    def pipeline_checks(self) -> bool:
        """Whether the units check applies: several ControlNets, or embeddings to place in the prompt."""
        return len(self.units) > 1 or self.has_embeddings

    def runs_pipelines(self, checks: Sequence[str]) -> bool:
        """Whether diffusers' pipeline runs on the torch reference: the units check, or the conditioning."""
        return (self.pipeline_checks and "units" in checks) or (self.has_embeddings and "outputs" in checks)


def verify(
    workspace: Workspace, adapters: Sequence[str], *, base: str | None = None,
    control: str | Sequence[str] | None = None, backend: str = "ort-cpu",
    sources: Mapping[str, str | Path] | None = None, settings: VerifySettings = VerifySettings(), options=None,
    on_step: Step | None = None,
) -> VerifyReport:
    """Check ``adapters`` (``NAME[:WEIGHT]``) and ``control`` on ``base`` against a reference merge.

    The reference is the base's source torch model with the adapters' *source files*
    merged by diffusers or by :mod:`loramgr.verify.formulas`, exported like a base
    (cached). ``control``: one ControlNet or several (``canny``: the base's own); with
    several, the export holds the first converted one and the others are compared in their
    slots against diffusers' modules, and the ``units`` check runs them all as units against
    diffusers' ``MultiControlNetModel``. ``adapters`` may name textual-inversion embeddings
    (``embedding`` adapters, no weight): they, and those the LoRAs bundle, are loaded into
    the reference by diffusers' ``load_textual_inversion`` (docs/verify.md, "Embeddings").
    ``sources`` maps adapter name -> source path where the path recorded at
    conversion is not right. ``options``: the backend's options object (``OrtOptions``,
    ``TrtOptions``) for the sessions of the outputs and images checks. Returns a report; ``report.passed`` says whether every
    check passed. User errors (unknown names, a missing or changed source file) raise
    :class:`~loramgr.errors.LoramgrError`.

    Example:
        >>> report = verify(Workspace.resolve(), ["blindbox:0.8", "moxin:0.5", "easyneg"], control=["hed", "depth"])
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
    plan = _plan(workspace, opened, adapters, control, settings)
    adapter_set = plan.adapter_set
    resolved = {a.name: source_of(a, sources or {}) for a in [*(a for a, _ in adapter_set.adapters), *plan.embeddings]}
    tolerances = TOLERANCES[manifest.dtype]

    # 2. Reference: merged by other code, exported like a base (or found in the cache), and as
    #    torch modules where the export cannot hold it (other ControlNets, embeddings)
    folder, records, cached = None, [], False
    if plan.export_set.adapters:
        folder, records, cached = merged_export(workspace, base_dir, manifest, plan.export_set, resolved,
                                                settings.reference, use_cache=settings.use_cache, on_step=on_step)
    torch_reference = None
    pipelines = plan.runs_pipelines(settings.checks)
    if plan.needs_torch or pipelines:
        torch_reference = build_torch_reference(base_dir, manifest, adapter_set, plan.embeddings, resolved,
                                                settings.reference, loras=pipelines, on_step=on_step)
        records = _records(plan, records, torch_reference)
    timings["reference_s"], clock = time.perf_counter() - clock, time.perf_counter()
    report = VerifyReport(base, manifest.dtype, backend, settings.reference, tolerances, records,
                          merged_export=str(folder) if folder else None, cached=cached, timings=timings,
                          coverage={a.name: block_counts(t.param for t in a.targets.values())
                                    for a, _ in adapter_set.adapters})
    report.checks += [_reference_check(records), _coverage_check(records)]
    if any(r.problem for r in records):
        report.checks += [CheckResult(c, SKIPPED, "no complete reference to compare with") for c in settings.checks
                          if c != "units" or plan.pipeline_checks]
        return report
    weights = BaseWeights(manifest, base_dir)
    merged_base = OpenBase.open(folder) if folder else None

    # 3. Tensors: every injected weight, and every other weight bit for bit; embedding vectors
    if "tensors" in settings.checks:
        if on_step:
            on_step("comparing weights")
        if merged_base:
            report.tensors = compare_tensors(weights, merge_tensors(weights, plan.export_set), merged_base.manifest,
                                             folder, tolerances.tensor_rtol)
            report.untouched = untouched_mismatches(weights, base_dir, plan.export_set.touched(), merged_base.manifest,
                                                    folder)
            report.untouched_total = sum(len(g.weights) for g in manifest.graphs.values()) - len(report.tensors)
        for controlnet in plan.others:
            report.tensors += compare_slot(weights, controlnet.name, merge_tensors(weights, slot_set(controlnet)),
                                           torch_reference.controlnets[controlnet.name], tolerances.tensor_rtol)
        if report.tensors:
            report.checks.append(_tensor_check(report))
        if merged_base:
            report.checks.append(_untouched_check(report))
        if torch_reference and torch_reference.token_rows:
            ours = _loramgr_vectors(plan)
            report.vectors = compare_vectors({t: ours[t] for t in torch_reference.token_rows}, torch_reference.token_rows,
                                             tolerances.tensor_rtol)
            report.checks.append(_listed_check("vectors", report.vectors, tolerances.tensor_rtol, "embeddings' vectors"))
        timings["tensors_s"], clock = time.perf_counter() - clock, time.perf_counter()

    # 4. Graph outputs and 5. images: an injected session against a plain one on the merged export,
    #    and against diffusers' pipeline on the torch reference
    if {"outputs", "images", "units"} & set(settings.checks):
        _compare_sessions(report, opened, plan, merged_base, torch_reference, backend, options, settings, workspace,
                          on_step)
        timings["sessions_s"] = time.perf_counter() - clock
    return report


def _plan(workspace: Workspace, opened: OpenBase, adapters: Sequence[str], control: str | Sequence[str] | None,
          settings: VerifySettings) -> _Plan:
    """Load the set, split off the embeddings and the ControlNets the export does not hold; refuse what
    the reference cannot take (before anything is built)."""
    loras, embeddings = [], []
    for spec in adapters:
        name, weight = parse_adapter_spec(spec)
        path = Path(name) if name.endswith(".lora") else workspace.adapter_path(name)
        if not (path.is_file() and read_metadata(path).get("loramgr.kind") == "embedding"):
            loras.append(spec)
            continue
        if weight not in (None, 1.0):
            raise LoramgrError(f"{spec}: {name} is a textual-inversion embedding, which takes no weight: write {name}")
        embedding = load_named(workspace, name)
        width = embedding.embeddings[embedding.name].shape[1]
        text_width = opened.manifest.configs["text_encoder"]["hidden_size"]
        if width != text_width:
            raise LoramgrError(f"{embedding.path}: vectors of width {width}, base {opened.name}'s text width is {text_width}")
        if embedding.name in (e.name for e in embeddings):
            raise LoramgrError(f"embedding {embedding.name} is listed twice")
        embeddings.append(embedding)
    adapter_set = load_adapter_set(workspace, opened.manifest, loras, control)
    if not adapter_set.adapters and not embeddings:
        raise LoramgrError("verify needs at least one adapter: NAME[:WEIGHT], an embedding or --control NAME")
    converted = [a for a in adapter_set.controlnets() if a is not None]
    export_set = AdapterSet(tuple((a, w) for a, w in adapter_set.adapters if a not in converted[1:]))
    units = tuple(BASE_CONTROLNET if c is None else c.name for c in adapter_set.controlnets())
    plan = _Plan(adapter_set, embeddings, export_set, converted[1:], units)
    if plan.runs_pipelines(settings.checks):
        from transformers import CLIPTokenizer

        from ..defaults import defaults_for

        triggers = [*(e.name for e in embeddings), *(t for a, _ in adapter_set.adapters for t in a.embeddings)]
        tokenizer = CLIPTokenizer.from_pretrained(opened.dir / "tokenizer", local_files_only=True)
        plan.negative = (settings.n_prompt if settings.n_prompt is not None
                         else defaults_for(opened.manifest.configs, tokenizer).n_prompt)
        check_prompts({"prompt": pipeline_prompt(settings.prompt, triggers), "n_prompt": plan.negative},
                      tokenizer, embeddings=bool(triggers))
    return plan


def _records(plan: _Plan, exported: list[AdapterReference], built: TorchReference) -> list[AdapterReference]:
    """One record per adapter in the set's order (the export's where it holds the adapter), then the embeddings'."""
    exported = iter(exported)
    held = [a for a, _ in plan.export_set.adapters]
    return [next(exported) if adapter in held else built.records[adapter.name]
            for adapter, _ in plan.adapter_set.adapters] + built.embedding_records


def _loramgr_vectors(plan: _Plan) -> dict:
    """Trigger -> the vectors loramgr's prompts use: those the LoRAs bundle (a later LoRA wins), the
    embedding adapters winning a tie (docs/prompts.md)."""
    vectors = {t: v for a, _ in plan.adapter_set.adapters for t, v in a.embeddings.items()}
    vectors.update({e.name: e.embeddings[e.name] for e in plan.embeddings})
    return vectors


def _compare_sessions(report: VerifyReport, opened: OpenBase, plan: _Plan, merged: OpenBase | None,
                      torch_reference: TorchReference | None, backend: str, options, settings: VerifySettings,
                      workspace: Workspace, on_step: Step | None) -> None:
    tolerances = report.tolerances
    if on_step:
        on_step(f"opening {backend} sessions")
    if backend == "tensorrt":  # both sides in the precision and profile the base's engines were built with
        from ..backends.tensorrt import engines_dir, resolve_options

        options = resolve_options(engines_dir(opened.dir), options)
    on_export = merged is not None and bool({"outputs", "images"} & set(settings.checks))
    injected = open_runner(opened, plan.adapter_set, backend, options)
    reference = open_runner(merged, AdapterSet(), backend, options) if on_export else None
    controlnet = plan.exported_controlnet
    triggers = list(torch_reference.token_rows) if torch_reference else []
    prompt, negative = pipeline_prompt(settings.prompt, triggers), plan.negative
    try:
        if "outputs" in settings.checks and on_export:
            if on_step:
                on_step("comparing graph outputs")
            report.outputs = compare_outputs(injected, reference, opened.manifest, settings.image_size, settings.seed,
                                             tolerances.output_rtol, controlnet=controlnet)
            report.checks.append(_listed_check("outputs", report.outputs, tolerances.output_rtol, "outputs"))
        if "outputs" in settings.checks and triggers:
            if on_step:
                on_step("comparing the text conditioning with diffusers'")
            report.conditioning = [compare_conditioning(make_pipeline(opened, injected, workspace), plan.adapter_set,
                                                        torch_reference, prompt, negative, triggers,
                                                        tolerances.output_rtol)]
            report.checks.append(_listed_check("conditioning", report.conditioning, tolerances.output_rtol,
                                               "text conditionings"))
        if "images" in settings.checks and on_export:
            if on_step:
                on_step("generating the sample image twice")
            report.image = compare_images(make_pipeline(opened, injected), make_pipeline(merged, reference),
                                          settings.prompt, settings.image_size, settings.steps, settings.seed,
                                          tolerances.min_psnr_db, n_prompt=settings.n_prompt, controlnet=controlnet)
            report.checks.append(_image_check("images", report.image, tolerances.min_psnr_db))
        if "units" in settings.checks and plan.pipeline_checks:
            if on_step:
                on_step(f"generating with {len(plan.units)} units, and with diffusers' pipeline")
            report.units = compare_units(make_pipeline(opened, injected, workspace), torch_reference,
                                         units_for(plan.units), prompt, negative, triggers, settings.image_size,
                                         settings.steps, settings.seed, tolerances.min_psnr_db)
            report.checks.append(_image_check("units", report.units, tolerances.min_psnr_db))
    finally:
        injected.close()
        if reference is not None:
            reference.close()


def _reference_check(records: list[AdapterReference]) -> CheckResult:
    problems = [f"{r.name}: {r.problem}" for r in records if r.problem]
    if problems:
        return CheckResult("reference", FAILED, "; ".join(problems))
    applied = [r for r in records if not r.unchecked]
    routes = Counter(r.route for r in applied)
    unchecked = [f"{r.name} ({r.unchecked})" for r in records if r.unchecked]
    return CheckResult("reference", PASSED, f"{len(applied)} adapters fully applied ("
                       + ", ".join(f"{n} by {route}" for route, n in routes.items()) + ")"
                       + (f"; not checked: {'; '.join(unchecked)}" if unchecked else ""))


def _coverage_check(records: list[AdapterReference]) -> CheckResult:
    """The reference and loramgr must change the same number of weights (embeddings: vectors) per adapter."""
    differ = [f"{r.name}: loramgr changes {r.targets} weights, the reference applied {r.applied}"
              if r.kind not in EMBEDDING_KINDS else
              f"{r.name}: loramgr's .lora holds {r.targets} vectors, the reference loaded {r.applied}"
              for r in records if not r.problem and not r.unchecked and r.applied != r.targets]
    if differ:
        return CheckResult("coverage", FAILED, "; ".join(differ))
    return CheckResult("coverage", PASSED, f"{sum(r.targets for r in records if not r.unchecked)} weights and vectors "
                                           f"changed, as many as the reference applied; "
                                           f"{sum(len(r.ignored_keys) for r in records)} source keys unused")


def _tensor_check(report: VerifyReport) -> CheckResult:
    rtol = report.tolerances.tensor_rtol
    failed = [d for d in report.tensors if not d.passed]
    if failed:
        named = ", ".join(f"{weight_label(d)} (rel {d.rel:.2e})" for d in sorted(failed, key=lambda d: -d.rel)[:5])
        return CheckResult("tensors", FAILED, f"{len(failed)} of {len(report.tensors)} weights differ beyond {rtol:g}: {named}")
    worst = max(report.tensors, key=lambda d: d.rel)
    return CheckResult("tensors", PASSED, f"{len(report.tensors)} weights within {rtol:g} "
                                          f"(largest rel {worst.rel:.2e}, {weight_label(worst)})")


def _listed_check(name: str, diffs: list, rtol: float, what: str) -> CheckResult:
    """Passed when every one of ``diffs`` (``OutputDiff``) is within ``rtol``."""
    failed = [o for o in diffs if not o.passed]
    if failed:
        named = ", ".join(f"{o.name} (rel {o.rel:.2e})" for o in failed)
        return CheckResult(name, FAILED, f"{len(failed)} of {len(diffs)} {what} differ beyond {rtol:g}: {named}")
    worst = max(diffs, key=lambda o: o.rel)
    return CheckResult(name, PASSED, f"{len(diffs)} {what} within {rtol:g} (largest rel {worst.rel:.2e}, {worst.name})")


def _image_check(name: str, image, min_psnr_db: float) -> CheckResult:
    return CheckResult(name, PASSED if image.passed else FAILED,
                       f"PSNR {image.psnr_db:.1f} dB (needs >= {min_psnr_db:g}), max pixel difference "
                       f"{image.max_pixel_diff}, {image.size}px, {image.steps} steps")


def _untouched_check(report: VerifyReport) -> CheckResult:
    if report.untouched:
        return CheckResult("untouched", FAILED, f"{len(report.untouched)} weights loramgr leaves alone differ in the "
                                                f"reference, first: {', '.join(report.untouched[:5])}")
    return CheckResult("untouched", PASSED, f"{report.untouched_total} other weights bit-identical to the base")
