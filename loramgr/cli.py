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

from . import __version__, console
from .backends import BACKENDS
from .backends.options import OPTIMIZATION_LEVELS
from .errors import LoramgrError
from .workspace import Workspace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramgr", description="LoRA / ControlNet weight swaps for one exported SD1.5 + ControlNet base.")
    parser.add_argument("--home", help="workspace folder holding base_models/ and adapters/ "
                                       "(default: $LORAMGR_HOME, else the current directory)")
    parser.add_argument("--version", action="version", version=f"loramgr {__version__}")
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

    p = sub.add_parser("convert", help="convert a LoRA / LyCORIS / PEFT file, a ControlNet or a textual-inversion "
                                       "embedding into adapters/NAME.lora")
    p.add_argument("source", help="adapter file (.safetensors/.pt/.pth/.bin) or folder (PEFT, diffusers ControlNet, "
                                  "diffusers learned_embeds)")
    p.add_argument("--base", help="base to convert against (default: the only base)")
    p.add_argument("--name", help="adapter name (default: the file stem); an embedding's trigger word in prompts")
    p.add_argument("--kind", choices=("lora", "controlnet", "embedding"), help="refuse the other kinds")
    p.add_argument("--strict", action="store_true", help="refuse files with keys that are not applied")
    p.add_argument("--default-weight", type=float, default=1.0, help="weight used when none is given at run time")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bake", help="merge adapters into full tensors for AddExternalInitializers")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]")
    p.add_argument("--control", metavar="NAME", help="a converted ControlNet")
    p.add_argument("--base", help="base name (default: the only base in the workspace)")
    p.add_argument("-o", "--output", action="append", required=True, metavar="[GRAPH=]FILE",
                   help="the .lora file to write: one per graph the set changes, as GRAPH=FILE "
                        "(e.g. -o mix.lora -o text_encoder=mix-te.lora); a plain FILE is the UNet graph's")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="run the canny ControlNet pipeline with adapters")
    _add_run_arguments(p)

    p = sub.add_parser("verify", help="verify adapters against a model merged in torch (diffusers/PEFT) and exported")
    p.add_argument("adapters", nargs="*", metavar="NAME[:WEIGHT]")
    p.add_argument("--control", metavar="NAME", action="append",
                   help="a converted ControlNet to verify with the LoRAs (canny: the base's own); repeat it for "
                        "several, run as units against diffusers' MultiControlNetModel")
    p.add_argument("--base", help="base name (default: the only base in the workspace)")
    _add_backend_arguments(p)
    p.add_argument("--reference", choices=("auto", "diffusers", "formulas"), default="auto",
                   help="who merges LoRAs for the reference (auto: diffusers where it reads the format correctly)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                   help="source file of an adapter, where the path recorded at conversion moved")
    p.add_argument("--checks", default="tensors,outputs,images,units",
                   help="comma-separated: tensors,outputs,images,units")
    p.add_argument("--size", type=int, default=64, help="image size of the images check (pixels)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the images check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="rebuild the merged reference export")
    p.add_argument("--top", type=int, default=10, help="rows of the largest-difference tables")
    p.add_argument("--verbose", action="store_true", help="print every table (default: the verdict and worst figures)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="measure convert / swap / step / memory side by side (docs/benchmarks.md)")
    p.add_argument("--arch", choices=("tiny", "sd15"), default="tiny",
                   help="sd15: the real architecture (minutes, ~16 GB peak, ~11 GB of disk in the workspace)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (medians are reported)")
    p.add_argument("--verbose", action="store_true", help="print every table (default: one line per measurement)")
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
    p.add_argument("--max-tokens", type=int, default=3 * 77,
                   help="longest text context of the UNet and ControlNet engines: 77 per 75-token prompt chunk")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="HTTP service: the base kept open, adapters hot-swapped per request "
                                     "(docs/serving.md)")
    _add_serve_arguments(p)

    p = sub.add_parser("list", help="list bases and adapters")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="show one base or adapter in detail")
    p.add_argument("name")
    p.add_argument("--verbose", action="store_true", help="a base: every graph's inputs, outputs and blocks")
    p.add_argument("--json", action="store_true")
    for command in sub.choices.values():  # --home is accepted after the command too
        command.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        _show_defaults(command)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default (unless it names it already or has none to show)."""
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default == [] \
                or default is argparse.SUPPRESS:  # -h, --version: SUPPRESS
            continue
        if action.help is None:
            action.help = "default: %(default)s"
        elif action.help is not argparse.SUPPRESS and "default" not in action.help:
            action.help += " (default: %(default)s)"


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from .pipeline.control import WINDOW_RULES
    from .pipeline.schedulers import SCHEDULERS, SCHEDULES
    from .pipeline.settings import PREPROCESSORS
    from .pipeline.settings import GenerationSettings as S

    p.add_argument("--base", help="base name (default: the only base in the workspace)")
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
    p.add_argument("--unit", action="append", default=[], metavar="CONTROLNET[,KEY=VALUE...]",
                   help="a ControlNet unit (repeatable; replaces --control, --control-image, --strength, "
                        "--guess-mode): CONTROLNET is canny or a converted ControlNet; keys: image=FILE, "
                        "preprocessor=canny|none, strength, start, end (fractions of the steps), "
                        "mode=balanced|prompt|control, low, high (canny thresholds). 'none' alone: no ControlNet")
    p.add_argument("--control-window", choices=WINDOW_RULES, default=S.control_window,
                   help="how unit start/end pick steps: diffusers' rule or A1111's")
    p.add_argument("--width", type=int, help="output width when there is no image at all (multiple of 64)")
    p.add_argument("--height", type=int, help="output height when there is no image at all (multiple of 64)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--a-prompt", default=S.a_prompt)
    p.add_argument("--n-prompt", help="negative prompt (default: ControlNet's, up to the last of its items that "
                                       "fits the base's tokenizer in 77 tokens)")
    p.add_argument("--plain-prompt", action="store_true",
                   help="take the prompts as they are (default: A1111's syntax: (emphasis:1.2), [less], BREAK, "
                        "embeddings, 75-token chunks)")
    p.add_argument("--clip-skip", type=int, default=S.clip_skip, help="A1111's CLIP skip (1: the last layer)")
    p.add_argument("--max-prompt-tokens", type=int, default=S.max_prompt_tokens,
                   help="refuse longer prompts (tokens; 75 per chunk)")
    p.add_argument("--num-samples", type=int, default=S.num_samples)
    p.add_argument("--resolution", type=int,
                   help="short side of the output in pixels (default: the base's native size; tiny: 128, sd15: 512)")
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
    p.add_argument("--img2img-strength", type=float, default=None,
                   help="start from --image noised this much, in (0, 1] (default: text to image)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=S.scheduler, metavar="NAME",
                   help=f"the sampler, one of {', '.join(sorted(SCHEDULERS))}")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=S.schedule, metavar="NAME",
                   help=f"where the sampler places its steps (automatic: its own; docs/a1111.md), one of "
                        f"{', '.join(SCHEDULES)}")
    _add_pass_arguments(p)
    _add_backend_arguments(p)
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--name", help="output file stem (default: date-time-pid, made unique)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --name")
    p.add_argument("--json", action="store_true")


def _add_pass_arguments(p: argparse.ArgumentParser) -> None:
    """Hires fix and inpainting options of ``run`` (docs/a1111.md has the rules)."""
    from .pipeline.inpaint import INPAINT_FILLS, MASK_RULES, Inpaint
    from .pipeline.passes import UPSCALERS, HiresFix

    g = p.add_argument_group("hires fix: upscale, then an image-to-image second pass (text-to-image only)")
    g.add_argument("--hires-scale", type=float, help="upscale factor; turns the hires fix on")
    g.add_argument("--hires-size", metavar="WxH", help="target size instead of a factor (W or H 0: from the "
                                                         "aspect ratio; both: upscale to cover, then crop)")
    g.add_argument("--hires-upscaler", choices=UPSCALERS, default=HiresFix.upscaler, metavar="NAME",
                   help=f"{', '.join(UPSCALERS)} (default %(default)s)")
    g.add_argument("--hires-steps", type=int, default=HiresFix.steps, help="second pass schedule (0: --steps)")
    g.add_argument("--hires-strength", type=float, default=HiresFix.strength,
                   help="second pass img2img strength (default %(default)s)")
    g.add_argument("--hires-prompt", help="second pass prompt (default: --prompt)")
    g.add_argument("--hires-n-prompt", help="second pass negative prompt (default: --n-prompt)")
    g = p.add_argument_group("inpainting: --image is repainted where --mask is white")
    g.add_argument("--mask", metavar="FILE", help="mask image (white: inpaint; an RGBA mask: its alpha)")
    g.add_argument("--mask-blur", type=int, default=Inpaint.blur, help="Gaussian blur of the mask, pixels")
    g.add_argument("--mask-invert", action="store_true", help="inpaint where the mask is black")
    g.add_argument("--inpaint-fill", choices=INPAINT_FILLS, default=Inpaint.fill,
                   help="what the masked area starts from (A1111's inpainting_fill)")
    g.add_argument("--inpaint-full-res", action="store_true",
                   help="generate the masked region's box at the output size and paste it back")
    g.add_argument("--inpaint-padding", type=int, default=Inpaint.padding, help="pixels around that box")
    g.add_argument("--inpaint-rule", choices=MASK_RULES, default=Inpaint.rule,
                   help="mask rules: diffusers' inpaint pipelines or A1111's")


def _passes(args: argparse.Namespace) -> dict:
    """The ``hires`` and ``inpaint`` settings of ``run``'s options."""
    from .pipeline.inpaint import Inpaint
    from .pipeline.passes import HiresFix

    hires = None
    if args.hires_scale is not None or args.hires_size is not None:
        resize = (0, 0)
        if args.hires_size is not None:
            width, sep, height = args.hires_size.lower().partition("x")
            if not sep or not width.isdigit() or not height.isdigit():
                raise LoramgrError(f"--hires-size {args.hires_size!r}: write WxH, e.g. 1024x768 (0 for a side "
                                   "that follows the aspect ratio)")
            resize = (int(width), int(height))
        hires = HiresFix(scale=2.0 if args.hires_scale is None else args.hires_scale, resize_x=resize[0],
                         resize_y=resize[1], upscaler=args.hires_upscaler, steps=args.hires_steps,
                         strength=args.hires_strength, prompt=args.hires_prompt, n_prompt=args.hires_n_prompt)
    inpaint = Inpaint(blur=args.mask_blur, invert=args.mask_invert, fill=args.inpaint_fill,
                      full_res=args.inpaint_full_res, padding=args.inpaint_padding, rule=args.inpaint_rule)
    return {"hires": hires, "inpaint": inpaint}


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
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="TensorRT profile's longest text context as in build-engine (default: what it built)")


def _backend_options(args: argparse.Namespace):
    """The options object of ``args.backend``: OrtOptions for ort-*, TrtOptions for tensorrt."""
    if args.backend == "tensorrt":
        from .backends.tensorrt import DEFAULT_PROFILE, ShapeProfile, TrtOptions

        profile = None
        if args.min or args.opt or args.max or args.max_tokens:
            profile = ShapeProfile.parse(args.min or str(DEFAULT_PROFILE.min), args.opt or str(DEFAULT_PROFILE.opt),
                                         args.max or str(DEFAULT_PROFILE.max),
                                         args.max_tokens or DEFAULT_PROFILE.max_tokens)
        return TrtOptions(args.precision, profile)
    from .backends.options import OrtOptions

    given = [f"--{o.replace('_', '-')}" for o in ("precision", "min", "opt", "max", "max_tokens")
             if getattr(args, o) is not None]
    if given:
        raise LoramgrError(f"{', '.join(given)}: TensorRT options, but --backend is {args.backend}")
    return OrtOptions(optimization=args.ort_opt, hot_swap=not args.no_hot_swap,
                      fuse_attention=not args.no_fuse_attention)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from .serve.config import ENV_API_AUTH, ENV_API_KEY, ServeConfig as C

    p.add_argument("--base", help="base to serve (default: the only base)")
    p.add_argument("--backend", choices=BACKENDS, default=C.backend)
    p.add_argument("--host", default=C.host, help=f"address to bind (default {C.host}: this machine only)")
    p.add_argument("--port", type=int, default=C.port)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on every endpoint but /healthz "
                                     f"and the page at / (default: ${ENV_API_KEY})")
    p.add_argument("--api-key-file", metavar="PATH", help="read the key from this file (argv is visible in ps)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]",
                   help=f"HTTP Basic credentials, as A1111's --api-auth; with --api-key either one is accepted "
                        f"(default: ${ENV_API_AUTH})")
    p.add_argument("--api-auth-file", metavar="PATH", help="read the credentials from this file (USER:PASS a line)")
    p.add_argument("--allowed-hosts", default="", metavar="NAME,...",
                   help="Host names answered besides the bound address (others get 400: DNS rebinding); * for any")
    p.add_argument("--cors-origins", default="", metavar="ORIGIN,...",
                   help="web origins (scheme://host[:port]) allowed to send requests from their pages (CORS); "
                        "default none: cross-origin uploads, generations and interrupts get 403")
    p.add_argument("--scheduling", choices=("grouping", "fifo"), default=C.scheduling,
                   help="grouping: run queued requests with the runner's adapter set first (bounded by "
                        "--max-overtake); fifo: arrival order, a swap whenever the set changes")
    p.add_argument("--max-queue", type=int, default=C.max_queue, help="waiting requests before 503 + Retry-After")
    p.add_argument("--max-overtake", type=int, default=C.max_overtake,
                   help="how many later requests may run before a waiting one (grouping)")
    p.add_argument("--max-resolution", type=int, default=C.max_resolution)
    p.add_argument("--max-steps", type=int, default=C.max_steps)
    p.add_argument("--max-num-samples", type=int, default=C.max_num_samples)
    p.add_argument("--max-controlnets", type=int, default=C.max_controlnets,
                   help="ControlNet units per request; each distinct ControlNet keeps one ControlNet's weights")
    p.add_argument("--max-prompt-tokens", type=int, default=C.max_prompt_tokens,
                   help="longest prompt and negative prompt, in tokens (75 per chunk)")
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


def _names(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b"): a comma-separated option."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def cmd_serve(args: argparse.Namespace, ws: Workspace) -> int:
    from .serve import ServeConfig, serve
    from .serve.auth import read_secret
    from .serve.config import ENV_API_AUTH, ENV_API_KEY

    try:
        config = ServeConfig(
            base=args.base, backend=args.backend, ort_optimization=args.ort_opt, hot_swap=not args.no_hot_swap,
            fuse_attention=not args.no_fuse_attention, host=args.host, port=args.port,
            api_key=read_secret(args.api_key, args.api_key_file, ENV_API_KEY, "--api-key"),
            api_auth=read_secret(args.api_auth, args.api_auth_file, ENV_API_AUTH, "--api-auth"),
            allowed_hosts=_names(args.allowed_hosts), cors_origins=_names(args.cors_origins),
            scheduling=args.scheduling, max_queue=args.max_queue, max_overtake=args.max_overtake,
            max_resolution=args.max_resolution, max_steps=args.max_steps, max_num_samples=args.max_num_samples,
            max_image_bytes=int(args.max_image_mb * 2**20), max_upload_bytes=int(args.max_upload_mb * 2**20),
            swap_budget_mb=args.swap_budget_mb, max_controlnets=args.max_controlnets,
            max_prompt_tokens=args.max_prompt_tokens)
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
    size = f"{console.human_size(report.size_bytes)} (source {console.human_size(report.source_bytes)})"
    if report.kind == "embedding":  # no weights: the trigger word and its vectors are the whole of it
        rows = [("format", report.format), ("kind", report.kind),
                ("trigger (vectors×width)", _embeddings(report.embeddings)), ("size", size),
                ("time", f"{report.seconds:.2f} s")]
    else:
        rows = [
            ("format", report.format), ("kind", report.kind), ("base", report.base),
            *((f"modules ({graph})", n) for graph, n in report.modules.items()),
            ("keys used", f"{report.keys_used} / {report.keys_total}"),
            ("rank(s)", ", ".join(map(str, report.ranks)) or "-"), ("dtype", report.dtype), ("size", size),
            ("trigger words", ", ".join(report.trigger_words[:5]) or "-"),
            *((("embeddings", _embeddings(report.embeddings)),) if report.embeddings else ()),
            ("time", f"{report.seconds:.2f} s"),
        ]
    console.out.print(console.table(f"converted {args.source} -> {report.path}", ("", ""), rows))
    return 0


def cmd_bake(args: argparse.Namespace, ws: Workspace) -> int:
    from .bake import bake, parse_outputs

    written = bake(ws, parse_outputs(args.output), args.lora, base=args.base, control=args.control)
    if args.json:
        console.print_json({g: str(p) for g, p in written.items()})
        return 0
    console.out.print(f"baked {' + '.join([*args.lora, *filter(None, [args.control])])}: pass each file to "
                      "AddExternalInitializers of its graph (docs/lora-format.md)", highlight=False)
    for graph, path in written.items():
        console.out.print(f"  {graph:<16} {console.human_size(path.stat().st_size):>9}  {path}", highlight=False,
                          soft_wrap=True)
    return 0


# run's options named otherwise than the GenerationSettings field they set
_SETTING_OPTIONS = {"control_schedule": "guess_schedule"}
_UNIT_KEYS = {"image": str, "preprocessor": str, "strength": float, "start": float, "end": float, "mode": str,
              "low": int, "high": int}


def parse_unit(spec: str) -> tuple[object, str | None]:
    """``--unit CONTROLNET[,KEY=VALUE...]`` -> (ControlUnit, image file or None)."""
    from .pipeline.control import ControlUnit

    name, *items = [item.strip() for item in spec.split(",")]
    if not name or "=" in name:
        raise LoramgrError(f"--unit {spec!r}: start with the ControlNet (canny or a converted one), "
                           "e.g. --unit canny,strength=0.8")
    values: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in _UNIT_KEYS:
            raise LoramgrError(f"--unit {spec!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(_UNIT_KEYS)}")
        try:
            values[key] = _UNIT_KEYS[key](value)
        except ValueError:
            raise LoramgrError(f"--unit {spec!r}: {key}={value!r} is not a {_UNIT_KEYS[key].__name__}") from None
    image = values.pop("image", None)
    renamed = {"low": "low_threshold", "high": "high_threshold"}
    return ControlUnit(name, **{renamed.get(k, k): v for k, v in values.items()}), image


def _settings(args: argparse.Namespace, defaults):
    """GenerationSettings from ``run``'s options, field by field (every field has an option); options
    left out that depend on the base take ``defaults`` (:class:`~loramgr.defaults.BaseDefaults`)."""
    from dataclasses import fields

    from .pipeline.settings import GenerationSettings

    computed = {"units": _units(args)[0], "prompt_syntax": "plain" if args.plain_prompt else "a1111",
                **_passes(args)}
    return defaults.settings(**{f.name: computed[f.name] if f.name in computed
                                else getattr(args, _SETTING_OPTIONS.get(f.name, f.name))
                                for f in fields(GenerationSettings)})


def _units(args: argparse.Namespace) -> tuple[tuple | None, list[str | None] | None]:
    """The ``--unit`` options as (units, their image files); ``--unit none``: no ControlNet at all."""
    if not args.unit:
        return None, None
    if args.unit == ["none"]:
        return (), []
    parsed = [parse_unit(spec) for spec in args.unit]
    return tuple(u for u, _ in parsed), [image for _, image in parsed]


def cmd_run(args: argparse.Namespace, ws: Workspace) -> int:
    from .adapters import AdapterChoice
    from .bases import OpenBase
    from .defaults import base_defaults
    from .runtime import generate

    choices = [AdapterChoice(tuple(args.lora), args.control)]
    choices += [AdapterChoice.parse(spec, ws) for spec in args.sweep]
    options = _backend_options(args)
    opened = OpenBase.resolve(ws, args.base)
    settings = _settings(args, base_defaults(opened))
    _, unit_images = _units(args)
    with console.steps_bar("denoising", enabled=not args.json) as progress:
        reports = generate(ws, args.image, settings, choices, base=opened.name, backend=args.backend,
                           options=options, control_image=args.control_image, control_images=unit_images,
                           out_dir=args.out, progress=progress, stem=args.name, overwrite=args.overwrite,
                           mask=args.mask)
    _print_runs(reports, choices, settings, args.json)
    return 0


def _print_runs(reports, choices, settings, as_json: bool) -> None:
    """The runs' timings, then every file written, one per line."""
    if as_json:
        console.print_json([vars(r) for r in reports])
        return
    rows = []
    for report, choice in zip(reports, choices):
        t = report.timings
        load = t.get("open_s", t.get("swap_s", 0.0))
        rows.append((choice.label(), f"{load:.2f} s", "hot swap" if "swap_s" in t else "open + inject",
                     f"{t.get('step_s', 0.0) * 1000:.0f} ms", f"{t.get('run_s', 0.0):.2f} s"))
    base = reports[0].base if reports else ""
    console.out.print(console.table(f"runs on {base} (resolution {settings.resolution}, {settings.steps} steps)",
                                    ("adapters", "load", "how", "per step", "run"), rows))
    console.out.print("wrote:", highlight=False)
    for path in (p for report in reports for p in report.files):
        console.out.print(f"  {path}", highlight=False, soft_wrap=True)


def cmd_verify(args: argparse.Namespace, ws: Workspace) -> int:
    from .bases import OpenBase
    from .defaults import base_defaults
    from .verify import VerifySettings, verify
    from .verify.report import render_report, render_summary

    sources = {}
    for item in args.source:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LoramgrError(f"--source {item!r}: use NAME=PATH")
        sources[name] = path
    opened = OpenBase.resolve(ws, args.base)
    settings = VerifySettings(checks=tuple(c for c in args.checks.split(",") if c), reference=args.reference,
                              seed=args.seed, image_size=args.size, steps=args.steps, use_cache=not args.no_cache,
                              n_prompt=base_defaults(opened).n_prompt)  # as `run` on this base
    with console.steps("verify", enabled=not args.json) as step:
        report = verify(ws, args.adapters, base=opened.name, control=args.control, backend=args.backend,
                        sources=sources, settings=settings, options=_backend_options(args), on_step=step)
    if args.json:
        console.print_json(report.to_dict())
    elif args.verbose:
        render_report(report, console.out, top=args.top)
    else:
        render_summary(report, console.out)
        console.out.print("  every table: --verbose; every number: --json", highlight=False)
    return 0 if report.passed else 1


def cmd_bench(args: argparse.Namespace, ws: Workspace) -> int:
    from .bench import render_bench, run_bench
    from .bench.rendering import render_summary

    if args.repeats < 1:
        raise LoramgrError(f"--repeats {args.repeats}: must be at least 1")
    with console.steps(f"bench {args.arch}", enabled=not args.json) as step:
        result = run_bench(ws, args.arch, repeats=args.repeats, on_step=step)
    if args.json:
        console.print_json(result)
    elif args.verbose:
        render_bench(result, console.out)
    else:
        render_summary(result, console.out)
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

    options = TrtOptions("fp16" if args.fp16 else "fp32",
                         ShapeProfile.parse(args.min, args.opt, args.max, args.max_tokens))
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


def _embeddings(embeddings: dict[str, dict]) -> str:
    """``{trigger: {"vectors": n, "dim": D}}`` as ``trigger (n×D), ...``."""
    return ", ".join(f"{t} ({e['vectors']}×{e['dim']})" for t, e in embeddings.items())


def cmd_list(args: argparse.Namespace, ws: Workspace) -> int:
    from .inventory import inventory

    data = inventory(ws)
    if args.json:
        console.print_json(data)
        return 0
    console.out.print(f"workspace {ws.home}", highlight=False, soft_wrap=True)
    if data["bases"]:
        _print_bases(data["bases"], f"bases in {ws.base_models}")
    else:
        console.out.print(f"no base in {ws.base_models.name}/: make one with\n"
                          "  loramgr demo                                      # tiny base + sample adapters\n"
                          "  loramgr export --arch tiny --random --name tiny   # tiny base only\n"
                          "  loramgr export --model DIR_OR_FILE --name sd15    # an SD1.5 model (README)\n"
                          "or read another workspace: --home DIR or $LORAMGR_HOME", highlight=False)
    if data["adapters"]:
        with_embeddings = any(a["embeddings"] for a in data["adapters"])  # a column only when some have them
        rows = [(a["name"], a["kind"], a["base"], a["format"], a["targets"], console.human_size(a["size_bytes"]),
                 ", ".join(a["trigger_words"][:3]), *([_embeddings(a["embeddings"])] * with_embeddings))
                for a in data["adapters"]]
        console.out.print(console.table(f"adapters in {ws.adapters}",
                                        ("adapter", "kind", "base", "format", "targets", "size", "trigger words",
                                         *(["embeddings"] * with_embeddings)), rows))
    else:
        console.out.print(f"no adapter in {ws.adapters.name}/: convert one with loramgr convert FILE",
                          highlight=False)
    if data["problems"]:
        rows = [(p["kind"], p["name"], p["reason"]) for p in data["problems"]]
        console.out.print(console.table("[red]entries that cannot be used[/]", ("", "name", "reason"), rows))
    return 0


def cmd_inspect(args: argparse.Namespace, ws: Workspace) -> int:
    from .inventory import details

    data = details(ws, args.name)
    if args.json:
        console.print_json(data)
    elif data["type"] == "base":
        _print_base_details(data, args.verbose)
    else:
        _print_adapter_details(data)
    return 0


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _print_base_details(data: dict, verbose: bool) -> None:
    _print_bases([data], f"base {data['name']}")
    rows = [(graph, data["weights"][graph], len(info["blocks"]), _counts(info["layouts"]))
            for graph, info in data["graphs"].items()]
    console.out.print(console.table("graphs", ("graph", "weights", "blocks", "weight layouts"), rows))
    if not verbose:
        console.out.print("inputs, outputs and weights per block: --verbose", highlight=False)
        return
    for graph, info in data["graphs"].items():
        io = [("input", i["name"], i["dtype"], ", ".join(map(str, i["shape"]))) for i in info["inputs"]]
        io += [("output", o["name"], o["dtype"], ", ".join(map(str, o["shape"]))) for o in info["outputs"]]
        console.out.print(console.table(graph, ("", "name", "dtype", "shape"), io))
    blocks = [(g, b, n) for g, info in data["graphs"].items() for b, n in info["blocks"].items()]
    console.out.print(console.table("weights per block", ("graph", "block", "weights"), blocks))


def _print_adapter_details(data: dict) -> None:
    rows = [("kind", data["kind"]), ("base", f"{data['base']} (fingerprint {data['base_fingerprint']})"),
            ("format", data["format"]), ("source", f"{data['source']} (sha256 {data['source_sha256']})"),
            ("size", console.human_size(data["size_bytes"])), ("default weight", data["default_weight"]),
            ("trigger words", ", ".join(data["trigger_words"]) or "-"),
            ("weights changed", f"{data['targets']}: {_counts(data['graphs'])}"), ("as", _counts(data["kinds"]))]
    console.out.print(console.table(f"adapter {data['name']}", ("field", "value"), rows))
    if data.get("embeddings"):
        fields = ("vectors", "dim", "step", "sd_checkpoint", "sd_checkpoint_name")
        rows = [(t, *("-" if e.get(k) is None else e[k] for k in fields)) for t, e in data["embeddings"].items()]
        console.out.print(console.table("textual-inversion embeddings (triggered by name in prompts)",
                                        ("trigger", "vectors", "width", "step", "sd_checkpoint", "sd_checkpoint_name"),
                                        rows))
    if data["blocks"]:
        console.out.print(console.table("weights changed per block", ("block", "weights"),
                                        list(data["blocks"].items())))


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
