"""``loramgr`` command line: argument parsing and rich output over the Python API.

Every command is a thin call into the API; user errors (:class:`LoramgrError`) print
one line and exit with code 2. Heavy libraries are imported inside the commands, so
``loramgr --help`` and ``loramgr list`` start instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import console
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
    p.add_argument("--arch", choices=("tiny", "sd15"), help="build this architecture instead of loading a model")
    p.add_argument("--random", action="store_true", help="with --arch: random weights (required)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("list", help="list bases and adapters")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="show one base or adapter in detail")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    return parser


def cmd_export(args: argparse.Namespace, ws: Workspace) -> int:
    from .export import export_base
    from .inventory import base_summary

    if args.arch and not args.random:
        raise LoramgrError("--arch builds a model with random weights: add --random (no pretrained weights exist offline)")
    if args.model and args.arch:
        raise LoramgrError("give either --model or --arch, not both")
    with console.steps(f"export {args.name}", enabled=not args.json) as step:
        export_base(ws, args.name, model=args.model, controlnet=args.controlnet, arch=args.arch, seed=args.seed,
                    dtype=args.dtype, opset=args.opset, on_step=step)
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


COMMANDS = {"export": cmd_export, "list": cmd_list, "inspect": cmd_inspect}


def main(argv: Sequence[str] | None = None) -> int:
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
