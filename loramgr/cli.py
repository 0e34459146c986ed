"""``loramgr`` command line: argument parsing and rich output over the Python API.

Every command is a thin call into the API; user errors (:class:`LoramgrError`) print
one line and exit with code 2. Heavy libraries are imported inside the commands, so
``loramgr --help`` and ``loramgr list`` start instantly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import console
from .backends import BACKENDS
from .backends.options import OPTIMIZATION_LEVELS
from .errors import LoramgrError
from .workspace import Workspace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramgr", description="LoRA / ControlNet weight swaps for one exported SD1.5 + ControlNet base.")
    parser.add_argument("--home", help="workspace folder holding base_models/ and adapters/ "
                                       "(default: $LORAMGR_HOME, else the current directory)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a base once: UNet+ControlNet, text encoder and VAE to ONNX")
    p.add_argument("--name", required=True, help="base name (folder under base_models/)")
    p.add_argument("--model", help="diffusers folder or single-file .safetensors/.ckpt checkpoint")
    p.add_argument("--controlnet", help="ControlNet: diffusers folder/file or original control_sd15_*.pth")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a CLIPTokenizer folder (vocab.json + merges.txt) instead of the model's own; "
                        "default: the folder's tokenizer/, else CLIP ViT-L/14's (shipped with loramgr)")
    p.add_argument("--arch", choices=("tiny", "sd15"), help="build this architecture instead of loading a model")
    p.add_argument("--random", action="store_true", help="with --arch: random weights (required)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("convert", help="convert a LoRA / LyCORIS / PEFT file or a ControlNet into adapters/NAME.lora")
    p.add_argument("source", help="adapter file (.safetensors/.pt/.pth) or folder (PEFT, diffusers ControlNet)")
    p.add_argument("--base", help="base to convert against (default: the only base)")
    p.add_argument("--name", help="adapter name (default: the file stem)")
    p.add_argument("--kind", choices=("lora", "controlnet"), help="refuse the other kind")
    p.add_argument("--strict", action="store_true", help="refuse files with keys that are not applied")
    p.add_argument("--default-weight", type=float, default=1.0, help="weight used when none is given at run time")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bake", help="merge adapters into full tensors for AddExternalInitializers")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]")
    p.add_argument("--control", metavar="NAME", help="a converted ControlNet")
    p.add_argument("--base")
    p.add_argument("-o", "--output", required=True, help="output .lora file")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="run the canny ControlNet pipeline with adapters")
    _add_run_arguments(p)

    p = sub.add_parser("verify", help="verify adapters against a model merged in torch (diffusers/PEFT) and exported")
    p.add_argument("adapters", nargs="*", metavar="NAME[:WEIGHT]")
    p.add_argument("--control", metavar="NAME", help="a converted ControlNet to verify with the LoRAs")
    p.add_argument("--base")
    _add_backend_arguments(p)
    p.add_argument("--reference", choices=("auto", "diffusers", "formulas"), default="auto",
                   help="who merges LoRAs for the reference (auto: diffusers where it reads the format correctly)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                   help="source file of an adapter, where the path recorded at conversion moved")
    p.add_argument("--checks", default="tensors,outputs,images", help="comma-separated: tensors,outputs,images")
    p.add_argument("--size", type=int, default=64, help="image size of the images check (pixels)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the images check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="rebuild the merged reference export")
    p.add_argument("--top", type=int, default=10, help="rows of the largest-difference tables")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="measure convert / swap / step / memory side by side (docs/benchmarks.md)")
    p.add_argument("--arch", choices=("tiny", "sd15"), default="tiny",
                   help="sd15: the real architecture (minutes, ~16 GB peak, ~11 GB of disk in the workspace)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (medians are reported)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the embedded default: tiny base, sample adapters, pipeline, verify")
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.add_argument("--verbose", action="store_true", help="print the full verification tables")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("build-engine", help="build (or reuse cached) refittable TensorRT engines for a base")
    p.add_argument("--base", required=True, help="base name (folder under base_models/)")
    p.add_argument("--fp16", action="store_true",
                   help="fp16 engines (on TensorRT 11 / TensorRT-RTX export the base with --dtype fp16 instead)")
    p.add_argument("--min", default="1x32x32", help="smallest BATCHxLATENT_HxLATENT_W (latent = image / 8)")
    p.add_argument("--opt", default="2x64x64", help="shape TensorRT tunes for (default: one 512 px image with CFG)")
    p.add_argument("--max", default="4x96x96", help="largest shape accepted")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="HTTP service: the base kept open, adapters hot-swapped per request "
                                     "(docs/serving.md)")
    _add_serve_arguments(p)

    p = sub.add_parser("list", help="list bases and adapters")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="show one base or adapter in detail")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    for command in sub.choices.values():  # --home is accepted after the command too
        command.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from .pipeline.schedulers import SCHEDULERS, SCHEDULES
    from .pipeline.settings import PREPROCESSORS
    from .pipeline.settings import GenerationSettings as S

    p.add_argument("--base")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help="repeatable")
    p.add_argument("--control", default="canny", metavar="canny|NAME",
                   help="canny: the base's own ControlNet; NAME: a converted ControlNet")
    p.add_argument("--sweep", action="append", default=[], metavar="A:W,B:W,CONTROL",
                   help="run again with another adapter set on the same session (hot swap); repeatable; "
                        "items are NAME[:WEIGHT] (a ControlNet name switches the ControlNet), 'none' = plain base")
    p.add_argument("--image", help="input image: the output size, the canny source, img2img's start")
    p.add_argument("--control-image", metavar="FILE",
                   help="make the control map from this image instead of --image (with --preprocessor none: "
                        "a map made before, e.g. depth or pose for a converted ControlNet)")
    p.add_argument("--preprocessor", choices=PREPROCESSORS, default=S.preprocessor,
                   help="canny: ControlNet's canny annotator; none: the control image is the map")
    p.add_argument("--prompt", required=True)
    p.add_argument("--a-prompt", default=S.a_prompt)
    p.add_argument("--n-prompt", default=S.n_prompt)
    p.add_argument("--num-samples", type=int, default=S.num_samples)
    p.add_argument("--resolution", type=int, default=S.resolution)
    p.add_argument("--max-pixels", type=int, default=S.max_pixels, help="refuse larger outputs (width * height)")
    p.add_argument("--steps", type=int, default=S.steps)
    p.add_argument("--guess-mode", action="store_true")
    p.add_argument("--guess-schedule", choices=("controlnet", "diffusers"), default=S.control_schedule,
                   help="guess-mode scales: ControlNet's 0.825**(12-i) or diffusers' logspace(-1, 0, 13)")
    p.add_argument("--strength", type=float, default=S.strength, help="control strength")
    p.add_argument("--scale", type=float, default=S.scale, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=S.seed)
    p.add_argument("--eta", type=float, default=S.eta)
    p.add_argument("--low-threshold", type=int, default=S.low_threshold)
    p.add_argument("--high-threshold", type=int, default=S.high_threshold)
    p.add_argument("--img2img-strength", type=float, default=None)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=S.scheduler, help="the sampler")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=S.schedule,
                   help="where the sampler places its steps (automatic: its own; docs/a1111.md)")
    _add_backend_arguments(p)
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--name", help="output file stem (default: date-time-pid, made unique)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --name")
    p.add_argument("--json", action="store_true")


def _add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """``--backend`` and each backend's options (they become one OrtOptions or TrtOptions)."""
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    p.add_argument("--ort-opt", choices=OPTIMIZATION_LEVELS, default="basic",
                   help="ONNX Runtime graph optimization level (default basic: see docs/design.md)")
    p.add_argument("--no-hot-swap", action="store_true", help="ONNX Runtime: inject at session creation only")
    p.add_argument("--no-fuse-attention", action="store_true",
                   help="ONNX Runtime: run attention as exported (default: one fused node each; docs/benchmarks.md)")
    p.add_argument("--precision", choices=("fp32", "fp16"),
                   help="TensorRT engines' precision (default: what build-engine built, else fp32)")
    for bound in ("min", "opt", "max"):
        p.add_argument(f"--{bound}", metavar="BxHxW",
                       help=f"TensorRT profile {bound} shape as in build-engine (default: what build-engine built)")


def _backend_options(args: argparse.Namespace):
    """The options object of ``args.backend``: OrtOptions for ort-*, TrtOptions for tensorrt."""
    if args.backend == "tensorrt":
        from .backends.tensorrt import DEFAULT_PROFILE, ShapeProfile, TrtOptions

        profile = None
        if args.min or args.opt or args.max:
            profile = ShapeProfile.parse(args.min or str(DEFAULT_PROFILE.min), args.opt or str(DEFAULT_PROFILE.opt),
                                         args.max or str(DEFAULT_PROFILE.max))
        return TrtOptions(args.precision, profile)
    from .backends.options import OrtOptions

    given = [f"--{o}" for o in ("precision", "min", "opt", "max") if getattr(args, o) is not None]
    if given:
        raise LoramgrError(f"{', '.join(given)}: TensorRT options, but --backend is {args.backend}")
    return OrtOptions(optimization=args.ort_opt, hot_swap=not args.no_hot_swap,
                      fuse_attention=not args.no_fuse_attention)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from .serve.config import ENV_API_KEY, ServeConfig as C

    p.add_argument("--base", help="base to serve (default: the only base)")
    p.add_argument("--backend", choices=BACKENDS, default=C.backend)
    p.add_argument("--host", default=C.host, help=f"address to bind (default {C.host}: this machine only)")
    p.add_argument("--port", type=int, default=C.port)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on every endpoint but /healthz "
                                     f"and the page at / (default: ${ENV_API_KEY})")
    p.add_argument("--scheduling", choices=("grouping", "fifo"), default=C.scheduling,
                   help="grouping: run queued requests with the runner's adapter set first (bounded by "
                        "--max-overtake); fifo: arrival order, a swap whenever the set changes")
    p.add_argument("--max-queue", type=int, default=C.max_queue, help="waiting requests before 503 + Retry-After")
    p.add_argument("--max-overtake", type=int, default=C.max_overtake,
                   help="how many later requests may run before a waiting one (grouping)")
    p.add_argument("--max-resolution", type=int, default=C.max_resolution)
    p.add_argument("--max-steps", type=int, default=C.max_steps)
    p.add_argument("--max-num-samples", type=int, default=C.max_num_samples)
    p.add_argument("--max-image-mb", type=float, default=C.max_image_bytes / 2**20,
                   help="largest input image (decoded bytes); larger gets 413")
    p.add_argument("--max-upload-mb", type=float, default=C.max_upload_bytes / 2**20,
                   help="largest adapter upload; larger gets 413")
    p.add_argument("--swap-budget-mb", type=int, default=C.swap_budget_mb,
                   help="memory for swappable buffers declared at start (every adapter that fits)")
    p.add_argument("--ort-opt", choices=OPTIMIZATION_LEVELS, default=C.ort_optimization)
    p.add_argument("--no-hot-swap", action="store_true", help="re-create sessions on every adapter change")
    p.add_argument("--no-fuse-attention", action="store_true", help="run attention as exported (docs/benchmarks.md)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    _add_ray_arguments(p)


def _add_ray_arguments(p: argparse.ArgumentParser) -> None:
    from .serve.ray_config import DEFAULT_SETS_PER_REPLICA

    g = p.add_argument_group("Ray Serve (pip install loramgr[ray]; docs/ray.md)")
    g.add_argument("--ray", action="store_true", help="serve as a Ray Serve application: one runner per replica, "
                                                      "requests routed to the replica holding their adapter set")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="replicas, each one base in memory (default 1)")
    scale.add_argument("--autoscale", metavar="MIN,MAX", help="let Ray scale between MIN and MAX replicas")
    g.add_argument("--sets-per-replica", type=int, default=DEFAULT_SETS_PER_REPLICA,
                   help="adapter sets a replica advertises to the router (LRU)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="Ray GPUs reserved per replica (default: 1 for ort-cuda / tensorrt, else 0)")
    g.add_argument("--address", help="join this Ray cluster (auto, HOST:PORT, ray://HOST:10001) instead of "
                                     "starting one here")
    g.add_argument("--write-config", metavar="FILE",
                   help="write the Serve config (YAML) for `serve deploy FILE` and exit")


def _ray_options(args: argparse.Namespace):
    from .serve.ray_config import RayOptions, parse_autoscale

    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 0.0 if args.backend == "ort-cpu" else 1.0
    try:
        return RayOptions(replicas=args.replicas, autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
                          sets_per_replica=args.sets_per_replica, cpus_per_replica=args.cpus_per_replica,
                          gpus_per_replica=gpus, address=args.address)
    except ValueError as exc:
        raise LoramgrError(str(exc)) from None


def _serve_on_ray(args: argparse.Namespace, ws: Workspace, config) -> int:
    from .convert import resolve_base

    options = _ray_options(args)
    resolve_base(ws, config.base)  # a missing base is one line here, not replicas failing to start
    if args.write_config:
        from .serve.ray_config import write_serve_config

        path = write_serve_config(args.write_config, ws.home, config, options)
        console.out.print(f"wrote {path}: deploy it with `serve deploy {path}` (docs/ray.md)", soft_wrap=True)
        return 0
    try:
        from .serve import ray_serve
    except ImportError as exc:
        raise LoramgrError(f"--ray needs Ray Serve: pip install 'loramgr[ray]' ({exc})") from None
    return ray_serve.run(ws, config, options, log_level=args.log_level)


def cmd_serve(args: argparse.Namespace, ws: Workspace) -> int:
    from .serve import ServeConfig, serve

    try:
        config = ServeConfig(
            base=args.base, backend=args.backend, ort_optimization=args.ort_opt, hot_swap=not args.no_hot_swap,
            fuse_attention=not args.no_fuse_attention,
            host=args.host, port=args.port, api_key=args.api_key or ServeConfig.api_key_from_env(),
            scheduling=args.scheduling, max_queue=args.max_queue, max_overtake=args.max_overtake,
            max_resolution=args.max_resolution, max_steps=args.max_steps, max_num_samples=args.max_num_samples,
            max_image_bytes=int(args.max_image_mb * 2**20), max_upload_bytes=int(args.max_upload_mb * 2**20),
            swap_budget_mb=args.swap_budget_mb)
    except ValueError as exc:
        raise LoramgrError(str(exc)) from None
    if args.ray or args.write_config:
        return _serve_on_ray(args, ws, config)
    return serve(ws, config, log_level=args.log_level)


def cmd_convert(args: argparse.Namespace, ws: Workspace) -> int:
    from .convert import convert_adapter

    with console.steps(f"convert {args.source}", enabled=not args.json) as step:
        step("reading and mapping keys")
        report = convert_adapter(ws, args.source, base=args.base, name=args.name, kind=args.kind,
                                 strict=args.strict, default_weight=args.default_weight)
    if args.json:
        console.print_json(vars(report))
        return 0
    if report.unknown_keys:
        console.err.print(f"[yellow]warning:[/] {args.source}: {len(report.unknown_keys)} keys were not applied "
                          f"(use --strict to refuse): {', '.join(report.unknown_keys[:8])}", highlight=False)
    rows = [
        ("format", report.format), ("kind", report.kind), ("base", report.base),
        *((f"modules ({graph})", n) for graph, n in report.modules.items()),
        ("keys used", f"{report.keys_used} / {report.keys_total}"),
        ("rank(s)", ", ".join(map(str, report.ranks)) or "-"), ("dtype", report.dtype),
        ("size", f"{console.human_size(report.size_bytes)} (source {console.human_size(report.source_bytes)})"),
        ("trigger words", ", ".join(report.trigger_words[:5]) or "-"),
        ("time", f"{report.seconds:.2f} s"),
    ]
    console.out.print(console.table(f"converted {args.source} -> {report.path}", ("", ""), rows))
    return 0


def cmd_bake(args: argparse.Namespace, ws: Workspace) -> int:
    from .bake import bake

    written = bake(ws, args.output, args.lora, base=args.base, control=args.control)
    if args.json:
        console.print_json({g: str(p) for g, p in written.items()})
        return 0
    rows = [(g, p, console.human_size(p.stat().st_size)) for g, p in written.items()]
    console.out.print(console.table("baked (pass to AddExternalInitializers of the graph)", ("graph", "file", "size"), rows))
    return 0


# run's options named otherwise than the GenerationSettings field they set
_SETTING_OPTIONS = {"control_schedule": "guess_schedule"}


def _settings(args: argparse.Namespace):
    """GenerationSettings from ``run``'s options, field by field (every field has an option)."""
    from dataclasses import fields

    from .pipeline.settings import GenerationSettings

    return GenerationSettings(**{f.name: getattr(args, _SETTING_OPTIONS.get(f.name, f.name))
                                 for f in fields(GenerationSettings)})


def cmd_run(args: argparse.Namespace, ws: Workspace) -> int:
    from .adapters import AdapterChoice
    from .runtime import generate

    choices = [AdapterChoice(tuple(args.lora), args.control)]
    choices += [AdapterChoice.parse(spec, ws) for spec in args.sweep]
    options = _backend_options(args)
    with console.steps_bar("denoising", enabled=not args.json) as progress:
        reports = generate(ws, args.image, _settings(args), choices, base=args.base, backend=args.backend,
                           options=options, control_image=args.control_image, out_dir=args.out, progress=progress, stem=args.name,
                           overwrite=args.overwrite)
    _print_runs(reports, choices, args.json)
    return 0


def _print_runs(reports, choices, as_json: bool) -> None:
    if as_json:
        console.print_json([vars(r) for r in reports])
        return
    rows = []
    for report, choice in zip(reports, choices):
        t = report.timings
        load = t.get("open_s", t.get("swap_s", 0.0))
        rows.append((choice.label(), f"{load:.2f} s", "hot swap" if "swap_s" in t else "open + inject",
                     f"{t.get('step_s', 0.0) * 1000:.0f} ms", f"{t.get('run_s', 0.0):.2f} s"))
    folder = reports[0].files[0].parent if reports else ""
    console.out.print(console.table(f"runs (files in {folder})", ("adapters", "load", "how", "per step", "run"), rows))


def cmd_verify(args: argparse.Namespace, ws: Workspace) -> int:
    from .verify import VerifySettings, render_report, verify

    sources = {}
    for item in args.source:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LoramgrError(f"--source {item!r}: use NAME=PATH")
        sources[name] = path
    settings = VerifySettings(checks=tuple(c for c in args.checks.split(",") if c), reference=args.reference,
                              seed=args.seed, image_size=args.size, steps=args.steps, use_cache=not args.no_cache)
    with console.steps("verify", enabled=not args.json) as step:
        report = verify(ws, args.adapters, base=args.base, control=args.control, backend=args.backend,
                        sources=sources, settings=settings, options=_backend_options(args), on_step=step)
    if args.json:
        console.print_json(report.to_dict())
    else:
        render_report(report, console.out, top=args.top)
    return 0 if report.passed else 1


def cmd_bench(args: argparse.Namespace, ws: Workspace) -> int:
    from .bench import render_bench, run_bench

    if args.repeats < 1:
        raise LoramgrError(f"--repeats {args.repeats}: must be at least 1")
    with console.steps(f"bench {args.arch}", enabled=not args.json) as step:
        result = run_bench(ws, args.arch, repeats=args.repeats, on_step=step)
    if args.json:
        console.print_json(result)
    else:
        render_bench(result, console.out)
    return 0


def cmd_demo(args: argparse.Namespace, ws: Workspace) -> int:
    from .demo import render_demo, run_demo

    with console.steps("demo", enabled=not args.json) as step:
        report = run_demo(ws, args.out, on_step=step)
    verified = report["verify"]
    if args.json:
        console.print_json({**report, "runs": [vars(r) for r in report["runs"]], "sheet": report["sheet"].to_dict(),
                            "verify": verified.to_dict()})
    else:
        render_demo(report, console.out, verbose=args.verbose)
    return 0 if verified.passed else 1


def cmd_build_engine(args: argparse.Namespace, ws: Workspace) -> int:
    from .backends.tensorrt import ShapeProfile, TrtOptions, build_engines
    from .bases import OpenBase

    options = TrtOptions("fp16" if args.fp16 else "fp32", ShapeProfile.parse(args.min, args.opt, args.max))
    with console.steps(f"build-engine {args.base}", enabled=not args.json) as step:
        paths = build_engines(OpenBase.resolve(ws, args.base), options, on_step=step)
    if args.json:
        console.print_json({g: str(p) for g, p in paths.items()})
    else:
        rows = [(g, p, console.human_size(p.stat().st_size)) for g, p in paths.items()]
        console.out.print(console.table(f"TensorRT engines of {args.base}", ("graph", "engine", "size"), rows))
    return 0


def cmd_export(args: argparse.Namespace, ws: Workspace) -> int:
    from .export import export_base
    from .inventory import base_summary

    if args.arch and not args.random:
        raise LoramgrError("--arch builds a model with random weights: add --random (no pretrained weights exist offline)")
    if args.model and args.arch:
        raise LoramgrError("give either --model or --arch, not both")
    with console.steps(f"export {args.name}", enabled=not args.json) as step:
        export_base(ws, args.name, model=args.model, controlnet=args.controlnet, arch=args.arch, seed=args.seed,
                    dtype=args.dtype, opset=args.opset, tokenizer=args.tokenizer, on_step=step)
    summary = base_summary(ws, args.name)
    if args.json:
        console.print_json(summary)
    else:
        _print_bases([summary], f"exported to {ws.base_dir(args.name)}")
    return 0


def _print_bases(bases: Sequence[dict], title: str) -> None:
    rows = [(b["name"], b["dtype"], _source(b["source"]), f"{sum(b['parameters'].values()) / 1e6:.1f}M",
             console.human_size(b["size_bytes"]), b["fingerprint"][:12]) for b in bases]
    console.out.print(console.table(title, ("base", "dtype", "source", "parameters", "size", "fingerprint"), rows))


def _source(source: dict) -> str:
    if source.get("kind") == "random":
        return f"{source['arch']} random, seed {source['seed']}"
    return str(source.get("model", ""))


def cmd_list(args: argparse.Namespace, ws: Workspace) -> int:
    from .inventory import inventory

    data = inventory(ws)
    if args.json:
        console.print_json(data)
        return 0
    _print_bases(data["bases"], f"bases in {ws.base_models}")
    rows = [(a["name"], a["kind"], a["base"], a["format"], a["targets"], console.human_size(a["size_bytes"]),
             ", ".join(a["trigger_words"][:3])) for a in data["adapters"]]
    console.out.print(console.table(f"adapters in {ws.adapters}",
                                    ("adapter", "kind", "base", "format", "targets", "size", "trigger words"), rows))
    if data["problems"]:
        rows = [(p["kind"], p["name"], p["reason"]) for p in data["problems"]]
        console.out.print(console.table("[red]entries that cannot be used[/]", ("", "name", "reason"), rows))
    return 0


def cmd_inspect(args: argparse.Namespace, ws: Workspace) -> int:
    from .inventory import details

    data = details(ws, args.name)
    if args.json:
        console.print_json(data)
        return 0
    if data["type"] == "base":
        _print_bases([data], f"base {args.name}")
        for graph, info in data["graphs"].items():
            io = [("input", i["name"], i["dtype"], i["shape"]) for i in info["inputs"]]
            io += [("output", o["name"], o["dtype"], o["shape"]) for o in info["outputs"]]
            console.out.print(console.table(f"{graph}: {data['weights'][graph]} weights, layouts {info['layouts']}",
                                            ("", "name", "dtype", "shape"), io))
        blocks = [(g, b, n) for g, info in data["graphs"].items() for b, n in info["blocks"].items()]
        console.out.print(console.table("weights per block", ("graph", "block", "weights"), blocks))
    else:
        rows = [(k, v) for k, v in data.items() if k not in ("blocks", "type")]
        console.out.print(console.table(f"adapter {args.name}", ("field", "value"), rows))
        console.out.print(console.table("targets per block", ("block", "weights"), sorted(data["blocks"].items())))
    return 0


COMMANDS = {"export": cmd_export, "convert": cmd_convert, "bake": cmd_bake, "run": cmd_run, "demo": cmd_demo,
            "build-engine": cmd_build_engine, "verify": cmd_verify, "bench": cmd_bench, "list": cmd_list, "inspect": cmd_inspect,
            "serve": cmd_serve}


def _quiet_libraries() -> None:
    """loramgr never downloads, and prints its own progress: keep the libraries' quiet."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(key, value)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = _parser().parse_args(argv)
    try:
        ws = Workspace.resolve(args.home)
        return COMMANDS[args.command](args, ws)
    except LoramgrError as exc:
        console.err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
