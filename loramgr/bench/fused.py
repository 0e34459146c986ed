"""The fused UNet+ControlNet graph of base format 1, rebuilt from a base's two graphs for the bench.

Base format 1 exported one graph: a ControlNet whose 13 residuals, each scaled by a
``control_scales [B, 13]`` input, fed the UNet (the ``UNetControlNet`` wrapper of
``git show 63a1732:loramgr/models/fused.py``). Format 2 exports the two apart; the bench
times the one-unit step of the split graphs against that fused graph.

The fused graph is joined here at the ONNX level rather than traced again from torch:
the ControlNet graph's nodes, then ``Mul(residual_i, control_scales[:, i])`` as the
wrapper traced it, then the UNet graph's nodes. Same nodes, same initializers, and the
weights are the base's own data files, hard-linked into the cache folder (copied where
the file system has no hard links). Tracing the wrapper again would take minutes and
several GB of RAM on sd15 for the same graph.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ..backends.onnxruntime import _run_io_binding
from ..manifest import CONTROLNET, UNET, Manifest
from ..models.graphs import NUM_CONTROL_RESIDUALS, RESIDUALS
from ..workspace import Workspace, atomic_dir
from .fixtures import GUIDED_SCALE, StepInputs
from .harness import Step

FUSED_VERSION = 1  # bump when the recipe changes: old caches no longer apply
SCALES = "control_scales"
PREFIX = "controlnet::"  # the ControlNet graph's own value and node names, kept apart from the UNet's


def fused_graph(workspace: Workspace, base_dir: Path, manifest: Manifest, step: Step) -> Path:
    """``model.onnx`` of the fused graph of this base, cached under ``.cache/bench/fused-<fingerprint>``."""
    folder = workspace.cache / "bench" / f"fused-{manifest.fingerprint[:16]}"
    recipe = {"version": FUSED_VERSION, "base": manifest.fingerprint}
    if (folder / "recipe.json").is_file() and json.loads((folder / "recipe.json").read_text()) == recipe:
        return folder / "model.onnx"
    step("joining the UNet and ControlNet graphs into the fused graph of base format 1")
    graphs = {g: onnx.load(str(base_dir / manifest.graphs[g].path), load_external_data=False) for g in (CONTROLNET, UNET)}
    with atomic_dir(folder) as tmp:
        for graph in (CONTROLNET, UNET):
            data = Path(manifest.graphs[graph].data)
            (tmp / graph).mkdir()
            _link_or_copy(base_dir / data, tmp / graph / data.name)
            _relocate(graphs[graph], graph)
        onnx.save(join(graphs[CONTROLNET], graphs[UNET]), str(tmp / "model.onnx"))
        (tmp / "recipe.json").write_text(json.dumps(recipe))
    return folder / "model.onnx"


def join(controlnet: onnx.ModelProto, unet: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: ``noise_pred = unet(x, t, ctx, controlnet(x, t, ctx, cond) * control_scales[:, i])``."""
    cn = controlnet.graph
    shared = {i.name for i in cn.input} | {t.name for t in cn.initializer}

    def own(name: str) -> str:
        return name if not name or name in shared else PREFIX + name

    nodes = []
    for node in cn.node:
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        renamed.name = PREFIX + node.name
        renamed.input[:] = [own(i) for i in node.input]
        renamed.output[:] = [own(o) for o in node.output]
        nodes.append(renamed)
    # control_scales [B, 13] -> [B, 13, 1, 1, 1]; residual i times its [B, 1, 1, 1] slice
    constants = [helper.make_tensor(f"{PREFIX}scale_axes", onnx.TensorProto.INT64, [3], [2, 3, 4])]
    nodes.append(helper.make_node("Unsqueeze", [SCALES, f"{PREFIX}scale_axes"], [f"{PREFIX}scales5"],
                                  name=f"{PREFIX}Unsqueeze_scales"))
    for i, residual in enumerate(RESIDUALS):
        index = f"{PREFIX}scale_index_{i}"
        constants.append(helper.make_tensor(index, onnx.TensorProto.INT64, [], [i]))
        nodes.append(helper.make_node("Gather", [f"{PREFIX}scales5", index], [f"{PREFIX}scale_{i}"], axis=1,
                                      name=f"{PREFIX}Gather_scale_{i}"))
        nodes.append(helper.make_node("Mul", [own(residual), f"{PREFIX}scale_{i}"], [residual],
                                      name=f"{PREFIX}Mul_scale_{i}"))
    nodes.extend(unet.graph.node)
    inputs = [*cn.input, helper.make_tensor_value_info(SCALES, onnx.TensorProto.FLOAT, ["batch", NUM_CONTROL_RESIDUALS])]
    graph = helper.make_graph(nodes, "unet_controlnet", inputs, list(unet.graph.output),
                              [*cn.initializer, *unet.graph.initializer, *constants])
    return helper.make_model(graph, opset_imports=list(unet.opset_import), ir_version=unet.ir_version,
                             producer_name="loramgr bench")


def _relocate(model: onnx.ModelProto, graph: str) -> None:
    """Point every external tensor at ``GRAPH/<its data file>`` under the fused graph's folder."""
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"{graph}/{entry.value}"


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights on disk or in the page cache), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def fused_feeds(inputs: StepInputs) -> dict[str, np.ndarray]:
    """The fused graph's inputs for the CFG batch of ``inputs``, every residual at scale 1."""
    return {**inputs.control_feeds(), SCALES: np.ones((2, NUM_CONTROL_RESIDUALS), np.float32)}


def fused_stepper(session, inputs: StepInputs, device: torch.device, scale: float = GUIDED_SCALE
                  ) -> Callable[[], torch.Tensor]:
    """One guided step on the fused graph as base format 1's pipeline and runner made it.

    ``git show 63a1732:loramgr/pipeline/controlnet.py``: the latents twice, one graph call on
    (uncond, cond) with the control image and a scale of 1 per residual, then the guidance
    mix; on CUDA the inputs and output stay on the device (IO binding), as the runner's.
    """
    scheduler, t = inputs.scheduler(device)
    feeds = {k: torch.from_numpy(v).to(device) for k, v in fused_feeds(inputs).items()}
    latents = feeds.pop("sample")

    def step() -> torch.Tensor:
        run = {"sample": scheduler.scale_model_input(latents, t), **feeds}
        if device.type == "cuda":
            noise = _run_io_binding(session, run, device)[0]
        else:
            noise = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in run.items()})[0])
        noise_uncond, noise_cond = noise.chunk(2)
        return noise_uncond + scale * (noise_cond - noise_uncond)
    return step
