"""``loramgr demo``: the whole flow on the embedded tiny model, from a fresh checkout.

1. export the tiny base once (cached in the workspace),
2. synthesize sample adapters in the formats users bring (kohya LoRA ``blindbox``,
   kohya LoCon ``moxin``, a diffusers ControlNet ``hed``) and convert them,
3. run the canny pipeline on one session, hot-swapping between adapter sets,
4. verify the stacked set against a model merged in torch and exported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .workspace import Workspace

BASE = "tiny"
PROMPT = "a house under the sun"
N_PROMPT = "lowres, bad anatomy, worst quality"


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
    """Run the demo; returns the runs, the verification and where the files went."""
    from .pipeline.settings import GenerationSettings
    from .runtime import AdapterChoice, generate
    from .verify import verify

    files = prepare(workspace, on_step)
    # The tiny tokenizer is byte-level (a token per character): a short negative prompt fits 77 tokens.
    settings = GenerationSettings(prompt=PROMPT, n_prompt=N_PROMPT, resolution=128, steps=10, seed=1)
    choices = [AdapterChoice(), AdapterChoice(("blindbox:0.8", "moxin:0.5"), "hed"), AdapterChoice(("blindbox:0.8",))]
    on_step("running the canny pipeline (one session, hot swaps between adapter sets)")
    runs = generate(workspace, files["image"], settings, choices, base=BASE, out_dir=out_dir, stem="demo",
                    overwrite=True)
    on_step("verifying blindbox:0.8 + moxin:0.5 + hed against a model merged in torch")
    report = verify(workspace, ["blindbox:0.8", "moxin:0.5"], base=BASE, control="hed", on_step=on_step)
    return {"out_dir": str(Path(out_dir).resolve()), "runs": runs, "choices": choices, "verify": report}
