"""``loramgr demo``: the whole flow on the embedded tiny model, from a fresh checkout.

1. export the tiny base once (cached in the workspace),
2. synthesize sample adapters in the formats users bring (kohya LoRA ``blindbox``,
   kohya LoCon ``moxin``, a diffusers ControlNet ``hed``) and convert them,
3. run the canny pipeline on one session, hot-swapping between adapter sets,
4. draw a contact sheet: each run, the control map, and each run's difference to the
   plain base (the tiny base has random weights, so its images are noise by design: the
   differences are what shows that the adapters act),
5. verify the stacked set against a model merged in torch and exported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .workspace import Workspace

BASE = "tiny"
PROMPT = "a house under the sun"
# The tiny tokenizer is byte-level (about a token per character): the negative prompt must fit 77 tokens.
N_PROMPT = "lowres, bad anatomy, worst quality"
RESOLUTION, STEPS = 128, 10
# The runs, as (LoRAs, ControlNet): the plain base first (the reference of the differences).
CHOICES = (((), None), (("blindbox:0.8", "moxin:0.5"), "hed"), (("blindbox:0.8",), None))
VERIFIED = CHOICES[1]  # the stacked set that verify checks
RANDOM_NOTE = "note: the tiny base has random weights, so its images are noise by design."
SHEET_NAME = "demo-contact-sheet.png"
PANEL = 256  # pixels per contact-sheet panel (the 128 px images scaled 2x)
# Every run's ControlNet (the base's canny one, the sample hed) gets the canny edges of the input.
CONTROL_MAP_LABEL = ("control map: canny edges, fed to every run's ControlNet ("
                     + ", ".join(sorted({control or "canny" for _, control in CHOICES})) + ")")


def prepare(workspace: Workspace, on_step: Callable[[str], None] = lambda s: None) -> dict[str, Path]:
    """The tiny base and the sample adapters, created where missing; returns the sample files."""
    from .convert import convert_adapter
    from .export import export_base
    from .manifest import Manifest
    from .samples import sample_image, write_controlnet, write_kohya_lora

    if BASE not in workspace.base_names():
        export_base(workspace, BASE, arch="tiny", seed=0, on_step=on_step)
    manifest = Manifest.load(workspace.base_dir(BASE))
    samples = workspace.cache / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    files = {
        "blindbox": samples / "blindbox.safetensors",
        "moxin": samples / "moxin.safetensors",
        "hed": samples / "control_tiny_hed",
        "image": samples / "house.png",
    }
    shapes = manifest.param_shapes()
    if not files["blindbox"].is_file():
        write_kohya_lora(files["blindbox"], shapes, seed=1, rank=4, alpha=2.0, trigger="blindbox")
    if not files["moxin"].is_file():
        write_kohya_lora(files["moxin"], shapes, seed=2, rank=8, alpha=4.0, locon=True, trigger="moxin")
    if not files["hed"].is_dir():
        write_controlnet(files["hed"], manifest.configs["controlnet"], seed=7)
    if not files["image"].is_file():
        from PIL import Image

        Image.fromarray(sample_image()).save(files["image"])
    for name in ("blindbox", "moxin", "hed"):
        if name not in workspace.adapter_names():
            on_step(f"converting {files[name].name}")
            convert_adapter(workspace, files[name], base=BASE, name=name)
    return files


def run_demo(workspace: Workspace, out_dir: str | Path = "outputs/demo",
             on_step: Callable[[str], None] = lambda s: None) -> dict:
    """Run the demo; returns the runs, the contact sheet, the verification and where the files went."""
    from PIL import Image

    from .pipeline.settings import GenerationSettings
    from .runtime import AdapterChoice, generate
    from .verify import VerifySettings, verify

    files = prepare(workspace, on_step)
    settings = GenerationSettings(prompt=PROMPT, n_prompt=N_PROMPT, resolution=RESOLUTION, steps=STEPS, seed=1)
    choices = [AdapterChoice(loras, control) for loras, control in CHOICES]
    on_step("running the canny pipeline (one session, hot swaps between adapter sets)")
    runs = generate(workspace, files["image"], settings, choices, base=BASE, out_dir=out_dir, stem="demo",
                    overwrite=True)
    on_step("drawing the contact sheet")
    images = [np.asarray(Image.open(r.files[0]).convert("RGB")) for r in runs]
    control_map = np.asarray(Image.open(_edge_map(runs[0].files)).convert("RGB"))
    source = np.asarray(Image.open(files["image"]).convert("RGB"))
    sheet = contact_sheet(Path(out_dir) / SHEET_NAME, source, control_map,
                          [c.label() for c in choices], images)
    on_step(f"verifying {_label(VERIFIED)} against a model merged in torch")
    report = verify(workspace, list(VERIFIED[0]), base=BASE, control=VERIFIED[1],
                    settings=VerifySettings(n_prompt=N_PROMPT), on_step=on_step)
    return {"out_dir": str(Path(out_dir).resolve()), "runs": runs, "choices": choices, "sheet": sheet,
            "verify": report}


def _label(choice: tuple) -> str:
    loras, control = choice
    return " + ".join([*loras, *([control] if control else [])])


def _edge_map(files: Sequence[Path]) -> Path:
    return next(f for f in files if f.name.endswith("-edges.png"))


# The contact sheet.


@dataclass
class ContactSheet:
    """What :func:`contact_sheet` drew: where, its size, every panel's label, and each run's
    mean absolute difference to the plain base (0..255, ``None`` for the base itself)."""

    path: Path
    size: tuple[int, int]  # width, height
    labels: list[str]
    diffs: dict[str, float | None]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "size": list(self.size), "labels": self.labels, "diffs": self.diffs}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _panel(image: np.ndarray) -> np.ndarray:
    """``image`` scaled (nearest neighbour) to fit a PANEL x PANEL square, centred on grey."""
    from PIL import Image

    picture = Image.fromarray(image)
    scale = PANEL / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.NEAREST)
    canvas = Image.new("RGB", (PANEL, PANEL), (64, 64, 64))
    canvas.paste(picture, ((PANEL - picture.width) // 2, (PANEL - picture.height) // 2))
    return np.asarray(canvas)


def difference(image: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``|image - base|`` averaged over the colour channels (0..255 floats; 0: identical)."""
    return np.abs(image.astype(np.float32) - base.astype(np.float32)).mean(axis=2)


def _grey(diff: np.ndarray) -> np.ndarray:
    """A difference as grey on a square-root scale, so that small changes show next to large ones
    (1 -> 16, 4 -> 32, 64 -> 128, 255 -> 255)."""
    level = 255.0 * np.sqrt(np.clip(diff, 0, 255) / 255.0)
    return np.repeat(level.round().astype(np.uint8)[..., None], 3, axis=2)


def contact_sheet(path: Path, source: np.ndarray, control_map: np.ndarray, labels: Sequence[str],
                  images: Sequence[np.ndarray]) -> ContactSheet:
    """One labelled PNG: the input and its control map, then each run over its difference to the
    first run (the plain base). Columns: input | control map | run 0 (base) | run 1 | ...
    """
    from PIL import Image, ImageDraw

    from .workspace import atomic_path

    pad, title_h, label_h = 12, 30, 40
    columns = 2 + len(images)
    width = pad + columns * (PANEL + pad)
    height = title_h + 2 * (label_h + PANEL) + 2 * pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font, small = _font(15), _font(13)
    draw.text((pad, 8), "loramgr demo: " + RANDOM_NOTE.removeprefix("note: ").rstrip(".") +
              "; the differences show the adapters act.", fill=(0, 0, 0), font=font)
    drawn: list[str] = []
    diffs: dict[str, float | None] = {}

    def put(column: int, row: int, image: np.ndarray | None, label: str) -> None:
        x = pad + column * (PANEL + pad)
        y = title_h + row * (label_h + PANEL + pad)
        for k, line in enumerate(_wrap(label, draw, small, PANEL)[:2]):
            draw.text((x, y + 4 + 17 * k), line, fill=(0, 0, 0), font=small)
        if image is None:
            draw.rectangle((x, y + label_h, x + PANEL - 1, y + label_h + PANEL - 1), outline=(200, 200, 200))
        else:
            sheet.paste(Image.fromarray(_panel(image)), (x, y + label_h))
        drawn.append(label)

    put(0, 0, source, "input image")
    put(1, 0, control_map, CONTROL_MAP_LABEL)
    base = images[0]
    for i, (label, image) in enumerate(zip(labels, images)):
        put(2 + i, 0, image, f"run {i}: {label.replace('+', ' + ')}")
        if i == 0:
            diffs[label] = None
            put(2 + i, 1, None, "run 0 is the plain base: the reference of the differences")
        else:
            diff = difference(image, base)
            diffs[label] = float(diff.mean())
            put(2 + i, 1, _grey(diff), f"|run {i} - run 0|: mean {diffs[label]:.1f} of 255")
    legend = ["Top: the input, the control map the", "ControlNets see, and each run.", "",
              "Bottom: each run's difference to the", "plain base (run 0), on a square-root", "scale; black: no change."]
    y = title_h + label_h + PANEL + pad + 8
    for k, line in enumerate(legend):
        draw.text((pad, y + 19 * k), line, fill=(60, 60, 60), font=font)
    with atomic_path(Path(path)) as tmp:
        sheet.save(tmp, format="PNG")
    return ContactSheet(Path(path), sheet.size, drawn, diffs)


def _wrap(text: str, draw, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken at spaces, ``+`` and ``,``."""
    import re

    words = [w for w in re.split(r"(?<=[ +,])", text) if w]
    lines, line = [], ""
    for word in words:
        if line and draw.textlength(line + word, font=font) > width:
            lines.append(line.rstrip())
            line = word.lstrip()
        else:
            line += word
    return [*lines, line.rstrip()] if line else lines


# The terminal summary.


def render_demo(report: dict, console, verbose: bool = False) -> None:
    """The demo's summary on ``console`` (a ``rich.console.Console``), readable in 80 columns:
    the note on random weights, one table of runs, the contact sheet, one line of verification.
    ``verbose`` adds the full verify tables."""
    from rich.table import Table

    from .verify.report import render_report, render_summary

    console.print(RANDOM_NOTE, highlight=False)
    sheet: ContactSheet = report["sheet"]
    table = Table(title=f"runs ({RESOLUTION} px, {STEPS} steps, one session)", title_justify="left")
    for column, justify in (("run", "right"), ("adapters", "left"), ("load", "right"), ("how", "left"),
                            ("per step", "right"), ("diff", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for i, (run, choice) in enumerate(zip(report["runs"], report["choices"])):
        t = run.timings
        load = t.get("open_s", t.get("swap_s", 0.0))
        diff = sheet.diffs.get(choice.label())
        table.add_row(str(i), choice.label().replace("+", " + "), f"{load:.2f} s",
                      "hot swap" if "swap_s" in t else "open", f"{t.get('step_s', 0.0) * 1000:.0f} ms",
                      "-" if diff is None else f"{diff:.1f}")
    console.print(table)
    console.print("diff: mean |run - run 0| of the pixels (0-255): the adapters change the output.",
                  highlight=False)
    console.print(f"contact sheet: {sheet.path}", highlight=False, soft_wrap=True)
    console.print(f"all outputs:   {report['out_dir']}", highlight=False, soft_wrap=True)
    if verbose:
        render_report(report["verify"], console, top=5)
    else:
        render_summary(report["verify"], console)
        console.print("full verification tables: loramgr demo --verbose", highlight=False)
