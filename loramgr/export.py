"""One-time export of a base: torch modules -> ONNX graphs with a verified weight map.

Exporter choice (see docs/base-layout.md): torch's TorchScript exporter with
``do_constant_folding=False``. It keeps every parameter as an initializer under its
torch name, which makes the torch -> ONNX map exact by construction. Constant folding
would rename Linear weights (``onnx::MatMul_123``) and merge identical tensors into
one shared initializer; the dynamo exporter renames folded weights ``val_<n>``. Either
way the map would have to be rebuilt by value, which is ambiguous where values repeat.

Two things are then fixed up by hand, because no exporter option does them:

* Layout ops on weights (``Transpose`` in front of every Linear's MatMul, ``Unsqueeze``
  of GroupNorm scales) are folded into the initializer itself, so every weight feeds a
  compute op directly. ONNX Runtime would fold them at load anyway; folding them here
  means an injected or in-place-updated buffer is the tensor the kernel reads, and
  TensorRT's refitter sees plain named weights.
* The exporter still de-duplicates parameters with identical values (for example the
  zero-initialized convs of a fresh ControlNet). Such parameters are exported with
  unique placeholder values and their real values written into their own
  initializers afterwards, so every parameter keeps its own injectable initializer.

Every weight is stored as external data in one file per graph (ONNX Runtime only
replaces external initializers), and every parameter is compared byte for byte with
the file at the offset the weight map records before the base is accepted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .errors import LoramgrError
from .manifest import (
    CONTROLNET, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, GraphInfo, IOSpec, Manifest, WeightEntry,
)
from .workspace import Workspace, atomic_dir, honour_umask, sha256_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 17
# Opsets the export is known to work with: the graphs need opset 14+ ops, and torch's
# TorchScript exporter writes at most torch.onnx's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET.
MIN_OPSET = 14
DATA_FILE = "model.onnx_data"
ExportStep = Callable[[str], None]


@dataclass(frozen=True)
class GraphSpec:
    """What to trace for one graph: example inputs and named, partly dynamic axes."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    uses_all_parameters: bool = True  # False for the VAE halves: each uses half the VAE


def graph_specs(components: dict, dtype: torch.dtype) -> list[GraphSpec]:
    """The five graphs of a base with small example inputs (axes are dynamic anyway)."""
    from .models.graphs import RESIDUALS, ControlNetResiduals, TextEncoder, UNetWithResiduals, VaeDecoder, VaeEncoder

    text_width = components["text_encoder"].config.hidden_size
    batch, h, w = 2, 8, 8
    gen = torch.Generator().manual_seed(0)
    # The text encoder stays fp32 in an fp16 base: transformers' CLIP traced in fp16 mixes an
    # fp32 attention mask into fp16 activations, a graph ONNX Runtime refuses to load; it is
    # 10% of the weights and runs once per prompt.
    for name in ("unet", "controlnet", "vae"):
        if components[name].dtype != dtype:
            components[name].to(dtype)
    controlnet = ControlNetResiduals(components["controlnet"])
    denoise_inputs = {
        "sample": torch.randn(batch, 4, h, w, generator=gen),
        "timestep": torch.tensor([999.0, 999.0]),
        # 2 chunks of 77 tokens: cross-attention takes any length (A1111's long prompts)
        "encoder_hidden_states": torch.randn(batch, 2 * 77, text_width, generator=gen),
    }
    control_inputs = {**denoise_inputs, "controlnet_cond": torch.rand(batch, 3, 8 * h, 8 * w, generator=gen)}
    with torch.no_grad():
        residuals = dict(zip(RESIDUALS, controlnet(*control_inputs.values())))
    latent_axes = {0: "batch", 2: "latent_height", 3: "latent_width"}
    image_axes = {0: "batch", 2: "height", 3: "width"}
    context_axes = {"sample": latent_axes, "timestep": {0: "batch"},
                    "encoder_hidden_states": {0: "batch", 1: "tokens"}}
    residual_axes = {name: residual_axes_of(r.shape[2], h) for name, r in residuals.items()}
    text_inputs = {
        "input_ids": torch.zeros(batch, 77, dtype=torch.int64),
        "token_vectors": torch.zeros(batch, 77, text_width),
        "token_mask": torch.zeros(batch, 77),
    }
    return [
        GraphSpec(
            UNET, UNetWithResiduals(components["unet"]), {**denoise_inputs, **residuals}, ["noise_pred"],
            {**context_axes, **residual_axes, "noise_pred": latent_axes},
        ),
        GraphSpec(
            CONTROLNET, controlnet, control_inputs, list(RESIDUALS),
            {**context_axes, "controlnet_cond": image_axes, **residual_axes},
        ),
        GraphSpec(
            TEXT_ENCODER, TextEncoder(components["text_encoder"]), text_inputs, ["hidden_states"],
            {"input_ids": {0: "batch"}, "token_vectors": {0: "batch"}, "token_mask": {0: "batch"},
             "hidden_states": {1: "batch"}},
        ),
        GraphSpec(
            VAE_DECODER, VaeDecoder(components["vae"]), {"latent": denoise_inputs["sample"]}, ["image"],
            {"latent": latent_axes, "image": image_axes}, uses_all_parameters=False,
        ),
        GraphSpec(
            VAE_ENCODER, VaeEncoder(components["vae"]), {"image": control_inputs["controlnet_cond"] * 2 - 1},
            ["latent_mean", "latent_std"],
            {"image": image_axes, "latent_mean": latent_axes, "latent_std": latent_axes},
            uses_all_parameters=False,
        ),
    ]


def residual_axes_of(size: int, latent_size: int) -> dict[int, str]:
    """Named axes of a ControlNet residual ``size`` pixels high on a latent ``latent_size`` high.

    ``latent_height/4``: a quarter of the latent's height (the UNet halves it per down block).
    """
    factor = latent_size // size
    suffix = "" if factor == 1 else f"/{factor}"
    return {0: "batch", 2: f"latent_height{suffix}", 3: f"latent_width{suffix}"}


def _io_specs(values: list, axes: dict[str, dict[int, str]]) -> list[IOSpec]:
    specs = []
    for value in values:
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_param or d.dim_value for d in dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        specs.append(IOSpec(value.name, dtype, shape))
    return specs


def _unique_placeholders(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Swap parameters whose values repeat for unique random ones; return the real values.

    The TorchScript exporter merges initializers with equal values into one; placeholders
    keep every parameter its own initializer (the real values are written back later).
    """
    groups: dict[tuple, list[tuple[str, torch.nn.Parameter]]] = defaultdict(list)
    for name, param in module.named_parameters():
        digest = hashlib.sha1(param.detach().contiguous().view(torch.uint8).numpy()).hexdigest()
        groups[(tuple(param.shape), param.dtype, digest)].append((name, param))
    gen = torch.Generator().manual_seed(1234)
    saved = {}
    for members in groups.values():
        if len(members) > 1:
            for name, param in members:
                saved[name] = param.detach().clone()
                param.data.copy_(torch.randn(param.shape, generator=gen).to(param.dtype))
    return saved


def _const_value(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _fold_weight_layout_ops(model: onnx.ModelProto, params: set[str]) -> dict[str, str]:
    """Fold ``Transpose``/``Unsqueeze`` nodes that only re-lay-out a parameter into the parameter.

    Returns the layout of every folded parameter (``transpose`` or ``reshape``); the
    folded initializer keeps the parameter's torch name.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
        for o in node.output:
            producers[o] = node
    layouts: dict[str, str] = {}
    rewire: dict[str, str] = {}  # output of a folded node -> the parameter that replaces it
    dead: set[int] = set()
    for name in params:
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type not in ("Transpose", "Unsqueeze") or users[0].input[0] != name:
            continue
        node = users[0]
        value = numpy_helper.to_array(inits[name])
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded, layout = np.ascontiguousarray(np.transpose(value, perm)), "transpose"
            if value.ndim != 2 or (perm is not None and perm != [1, 0]):
                continue  # only the Linear case is a known layout
        else:
            axes = _const_value(node.input[1], producers, inits) if len(node.input) > 1 else None
            if axes is None:
                axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
            if axes is None:
                continue
            folded, layout = np.expand_dims(value, tuple(int(a) for a in np.atleast_1d(axes))), "reshape"
        inits[name].CopyFrom(numpy_helper.from_array(folded, name))
        rewire[node.output[0]] = name
        dead.add(id(node))
        layouts[name] = layout
    kept = [node for node in graph.node if id(node) not in dead]
    for node in kept:
        for k, i in enumerate(node.input):
            if i in rewire:
                node.input[k] = rewire[i]
    del graph.node[:]
    graph.node.extend(kept)
    return layouts


def _drop_scalar_multiplications_by_one(model: onnx.ModelProto) -> int:
    """Remove ``Mul(x, 1.0)`` nodes (diffusers' ControlNet scales its residuals by a constant 1).

    ONNX Runtime's basic-level ``ConvMulFusion`` would fold that constant into the
    preceding conv's weights, creating new tensors in place of the base's: in-place
    weight updates (hot swap) would then be lost on those convs.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    rewire, dead = {}, set()
    for node in graph.node:
        if node.op_type != "Mul" or node.output[0] in outputs:
            continue
        for keep, const in ((0, 1), (1, 0)):
            value = _const_value(node.input[const], producers, inits)
            if value is not None and value.size == 1 and value.ndim == 0 and float(value) == 1.0:
                rewire[node.output[0]] = node.input[keep]
                dead.add(id(node))
                break
    kept = [n for n in graph.node if id(n) not in dead]
    for node in kept:
        for k, i in enumerate(node.input):
            while i in rewire:
                i = rewire[i]
            node.input[k] = i
    del graph.node[:]
    graph.node.extend(kept)
    return len(dead)


def _export_graph(spec: GraphSpec, folder: Path, opset: int, on_step: ExportStep | None) -> GraphInfo:
    """Trace one graph, fold weight layouts, save with one external data file, build its weight map."""
    module = spec.module.eval()
    params = dict(module.named_parameters())
    real_values = _unique_placeholders(module)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="loramgr-export-", dir=folder.parent))
    try:
        if on_step:
            on_step(f"{spec.name}: tracing with torch.onnx.export")
        traced = scratch / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, tuple(spec.inputs.values()), str(traced), dynamo=False, do_constant_folding=False,
                opset_version=opset, input_names=list(spec.inputs), output_names=spec.outputs,
                dynamic_axes=spec.dynamic_axes,
            )
        for name, value in real_values.items():
            params[name].data.copy_(value)
        if on_step:
            on_step(f"{spec.name}: folding weight layouts")
        model = onnx.load(str(traced), load_external_data=True)
        inits = {t.name: t for t in model.graph.initializer}
        missing = [p for p in params if p not in inits]
        if not spec.uses_all_parameters:
            params = {p: v for p, v in params.items() if p in inits}
        elif missing:
            raise LoramgrError(
                f"export of {spec.name} left {len(missing)} of {len(params)} parameters without their own "
                f"initializer: {', '.join(missing[:10])}"
            )
        layouts = _fold_weight_layout_ops(model, set(params))
        _drop_scalar_multiplications_by_one(model)
        for name, value in real_values.items():
            entry_value = value.numpy()
            if layouts.get(name) == "transpose":
                entry_value = np.ascontiguousarray(entry_value.T)
            inits[name].CopyFrom(numpy_helper.from_array(entry_value.reshape(tuple(inits[name].dims)), name))
        if on_step:
            on_step(f"{spec.name}: saving weights as external data")
        folder.mkdir(parents=True)
        onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=0)
        honour_umask(folder / DATA_FILE, 0o666)  # onnx may write it 0600
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    del model
    skeleton = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    weights = {}
    for tensor in skeleton.graph.initializer:
        if tensor.name not in params:
            continue
        ext = {kv.key: kv.value for kv in tensor.external_data}
        weights[tensor.name] = WeightEntry(
            initializer=tensor.name, layout=layouts.get(tensor.name, "identity"),
            torch_shape=tuple(params[tensor.name].shape), shape=tuple(tensor.dims),
            dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name,
            offset=int(ext.get("offset", 0)), length=int(ext["length"]),
        )
    if on_step:
        on_step(f"{spec.name}: checking every weight against its initializer")
    _check_weight_map(spec.name, params, weights, folder / DATA_FILE)
    return GraphInfo(
        path=f"{spec.name}/model.onnx", data=f"{spec.name}/{DATA_FILE}",
        inputs=_io_specs(list(skeleton.graph.input), spec.dynamic_axes),
        outputs=_io_specs(list(skeleton.graph.output), spec.dynamic_axes),
        weights=weights, data_sha256=sha256_file(folder / DATA_FILE), data_size=(folder / DATA_FILE).stat().st_size,
        model_sha256=sha256_file(folder / "model.onnx"), model_size=(folder / "model.onnx").stat().st_size,
    )


def _check_weight_map(graph: str, params: dict[str, torch.Tensor], weights: dict[str, WeightEntry], data_file: Path):
    """Every parameter must equal, byte for byte, its initializer in the saved data file."""
    unmapped = sorted(set(params) - set(weights))
    if unmapped:
        raise LoramgrError(f"{graph}: {len(unmapped)} parameters are not mapped: {', '.join(unmapped[:10])}")
    data = np.memmap(data_file, dtype=np.uint8, mode="r")
    wrong = [
        name for name, entry in weights.items()
        if not np.array_equal(entry.read(data), entry.to_onnx_layout(params[name].detach().numpy()))
    ]
    if wrong:
        raise LoramgrError(f"{graph}: {len(wrong)} initializers differ from their parameters: {', '.join(wrong[:10])}")


def _plain_config(config: dict) -> dict:
    """A config as plain JSON values, without loader bookkeeping (``_name_or_path``...)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=str))


def export_components(
    components: dict, target: Path, *, name: str, source: dict, dtype: str = "fp32",
    opset: int = DEFAULT_OPSET, on_step: ExportStep | None = None,
) -> Manifest:
    """Export loaded components into the (new, empty) folder ``target``; return the manifest."""
    if dtype not in DTYPES:
        raise LoramgrError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    graphs = {}
    for spec in graph_specs(components, DTYPES[dtype]):
        graphs[spec.name] = _export_graph(spec, target / spec.name, opset, on_step)
    components["tokenizer"].save_pretrained(target / "tokenizer")
    components["scheduler"].save_pretrained(target / "scheduler")
    configs = {k: _plain_config(dict(components[k].config)) for k in ("unet", "controlnet", "vae")}
    configs["text_encoder"] = _plain_config(components["text_encoder"].config.to_dict())
    manifest = Manifest(
        name=name, dtype=dtype, opset=opset, source=source, graphs=graphs, configs=configs,
        vae_scaling_factor=float(components["vae"].config.scaling_factor),
        exporter={"torch": torch.__version__, "onnx": onnx.__version__, "method": "torchscript, no constant folding"},
    )
    manifest.fingerprint = manifest.compute_fingerprint()
    manifest.save(target)
    return manifest


def max_opset() -> int:
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


def check_opset(opset: int) -> None:
    """Refuse an opset the exporter cannot write (or the graphs cannot use) before anything is loaded."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise LoramgrError(f"--opset {opset!r}: choose an opset from {MIN_OPSET} to {max_opset()} "
                           f"(default {DEFAULT_OPSET})")


def export_base(
    workspace: Workspace, name: str, *, model: str | Path | None = None, controlnet: str | Path | None = None,
    arch: str | None = None, seed: int = 0, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
    tokenizer: str | Path | None = None, on_step: ExportStep | None = None,
) -> Manifest:
    """Export a base into ``workspace.base_models/name``, atomically.

    Either ``model`` (a diffusers folder or single-file checkpoint) with ``controlnet``
    (or a ``controlnet/`` inside the model folder), or ``arch`` (``tiny``/``sd15``) with
    ``seed``: the architecture is built with random weights, saved as a diffusers folder
    under the base (``source/``) and exported through the same path as any model.

    The tokenizer is the model folder's own; for a single-file checkpoint and ``sd15``
    it is CLIP ViT-L/14's (shipped with loramgr), for ``tiny`` a byte-level one.
    ``tokenizer`` (a folder with a ``CLIPTokenizer``'s files) overrides it.

    Example:
        >>> ws = Workspace.resolve("/tmp/ws")
        >>> manifest = export_base(ws, "tiny", arch="tiny", seed=0)
        >>> sorted(manifest.graphs)
        ['controlnet', 'text_encoder', 'unet', 'vae_decoder', 'vae_encoder']
    """
    from .models.loading import load_components, load_controlnet
    from .models.tokenizer import fit_tokenizer, load_tokenizer

    check_opset(opset)
    target = workspace.base_dir(name)
    if (model is None) == (arch is None):
        raise LoramgrError("export needs either --model SRC (with --controlnet SRC) or --arch tiny|sd15 --random")
    user_tokenizer = None
    if tokenizer is not None:  # refused before any work where the text encoder's size is known
        user_tokenizer = load_tokenizer(tokenizer)
        if arch is not None:
            from .models.architectures import architecture

            text = architecture(arch).text_encoder
            fit_tokenizer(user_tokenizer, tokenizer, text["vocab_size"], text["max_position_embeddings"])
    with atomic_dir(target) as tmp:
        if arch is not None:
            from .models.architectures import build_random_folder

            if on_step:
                on_step(f"building {arch} with random weights (seed {seed})")
            model = tmp / "source"
            build_random_folder(arch, seed, model)
            source = {"kind": "random", "arch": arch, "seed": seed, "model": "source"}
        else:
            source = {"kind": "files", "model": str(Path(model).resolve()),
                      "controlnet": str(Path(controlnet).resolve()) if controlnet else None}
        if on_step:
            on_step("loading the model")
        components = load_components(Path(model))
        if user_tokenizer is not None:
            text = components["text_encoder"].config
            components["tokenizer"] = fit_tokenizer(user_tokenizer, tokenizer, text.vocab_size,
                                                    text.max_position_embeddings)
            source["tokenizer"] = str(Path(tokenizer).resolve())
        if controlnet is not None:
            components["controlnet"] = load_controlnet(Path(controlnet))
        elif "controlnet" not in components:
            raise LoramgrError(f"{model}: has no controlnet/ folder; pass --controlnet SRC")
        export_components(components, tmp, name=name, source=source, dtype=dtype, opset=opset, on_step=on_step)
    return Manifest.load(target)
