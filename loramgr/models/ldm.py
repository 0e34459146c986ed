"""Names of the original Stable Diffusion layout (LDM / CompVis, lllyasviel's ControlNet).

Two uses: LoRA files keyed by LDM module paths (``lora_unet_input_blocks_1_1_proj_in``)
are resolved to diffusers modules, and loramgr writes original-format checkpoints so
the loader can be proven on the same kind of file users bring.

diffusers reads LDM checkpoints (``diffusers.loaders.single_file_utils``) but keeps its
map as code that renames whole state dicts, with no module-level lookup and no way
back. So the map lives here as data: a table of block prefix pairs generated from a
diffusers config, each pair with the renames of its direct parts. One table serves
both directions; the tests check it against diffusers' converters, parameter by
parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Parts of a block below its prefix, LDM -> diffusers. ``None`` in a table entry
# means the names below the prefix are identical on both sides.
_UNET_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_TIME_EMBED = {"0": "linear_1", "2": "linear_2"}
_DOWNSAMPLE = {"op": "conv"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

Entry = tuple[str, str, Mapping[str, str] | None]  # (LDM prefix, diffusers prefix, part renames)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_CONTROLNET_PREFIX = "control_model."


class NameTable:
    """Module paths between LDM and diffusers, from block prefix pairs.

    A path maps through its longest prefix in the table; the rest of the path is
    renamed by that entry's parts (only the listed parts exist, anything else maps to
    ``None``) or kept as is where the entry has none. Paths that name a parameter
    (``...conv1.weight``) map too: the parameter name is kept.
    """

    def __init__(self, entries: Iterable[Entry]):
        self._to_diffusers: dict[str, tuple[str, Mapping[str, str] | None]] = {}
        self._to_ldm: dict[str, tuple[str, Mapping[str, str] | None]] = {}
        for ldm, diffusers, parts in entries:
            inverse = None if parts is None else {d: l for l, d in parts.items()}
            self._to_diffusers[ldm] = (diffusers, parts)
            self._to_ldm[diffusers] = (ldm, inverse)

    def to_diffusers(self, path: str) -> str | None:
        return _translate(path, self._to_diffusers)

    def to_ldm(self, path: str) -> str | None:
        return _translate(path, self._to_ldm)


def _translate(path: str, table: Mapping[str, tuple[str, Mapping[str, str] | None]]) -> str | None:
    tokens = path.split(".")
    for cut in range(len(tokens), 0, -1):
        prefix = ".".join(tokens[:cut])
        if prefix in table:
            target, parts = table[prefix]
            rest = ".".join(tokens[cut:])
            if not rest:
                return target
            if parts is None:
                return f"{target}.{rest}"
            for old, new in parts.items():
                if rest == old or rest.startswith(old + "."):
                    return f"{target}.{new}{rest[len(old):]}"
            return None
    return None


def _encoder_entries(config: Mapping) -> list[Entry]:
    """The half shared by UNet and ControlNet: time embedding, conv_in, down blocks, mid block."""
    has_attention = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    layers = config["layers_per_block"]
    entries: list[Entry] = [("time_embed", "time_embedding", _TIME_EMBED), ("input_blocks.0.0", "conv_in", None)]
    for i, attention in enumerate(has_attention):
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            entries.append((f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attention:
                entries.append((f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}", None))
        if i < len(has_attention) - 1:
            block = (layers + 1) * (i + 1)
            entries.append((f"input_blocks.{block}.0", f"down_blocks.{i}.downsamplers.0", _DOWNSAMPLE))
    entries += [
        ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
        ("middle_block.1", "mid_block.attentions.0", None),
        ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
    ]
    return entries


def unet_entries(config: Mapping) -> list[Entry]:
    """Block pairs of an SD1.x-style UNet, from its diffusers config."""
    layers = config["layers_per_block"]
    entries = _encoder_entries(config) + [("out.0", "conv_norm_out", None), ("out.2", "conv_out", None)]
    up_types = config["up_block_types"]
    for i, kind in enumerate(up_types):
        attention = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            entries.append((f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attention:
                entries.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", None))
        if i < len(up_types) - 1:  # the upsampler follows the attention, if any, in the last layer
            block = (layers + 1) * i + layers
            entries.append((f"output_blocks.{block}.{2 if attention else 1}", f"up_blocks.{i}.upsamplers.0", None))
    return entries


def controlnet_entries(config: Mapping) -> list[Entry]:
    """Block pairs of an SD1.x ControlNet (lllyasviel's ``cldm``), from its diffusers config."""
    layers, n_blocks = config["layers_per_block"], len(config["down_block_types"])
    n_residuals = 1 + layers * n_blocks + (n_blocks - 1)  # conv_in, resnets/attentions, downsamplers
    n_hint = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    # input_hint_block is a Sequential of convs with a SiLU between each two: convs sit at even indices.
    hint = {"0": "conv_in", **{str(2 * (k + 1)): f"blocks.{k}" for k in range(n_hint)},
            str(2 * (n_hint + 1)): "conv_out"}
    return _encoder_entries(config) + [
        *((f"zero_convs.{k}.0", f"controlnet_down_blocks.{k}", None) for k in range(n_residuals)),
        ("middle_block_out.0", "controlnet_mid_block", None),
        ("input_hint_block", "controlnet_cond_embedding", hint),
    ]


def vae_entries(config: Mapping) -> list[Entry]:
    """Block pairs of the SD ``AutoencoderKL``, from its diffusers config."""
    n_blocks, layers = len(config["down_block_types"]), config["layers_per_block"]
    entries: list[Entry] = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for side in ("encoder", "decoder"):
        entries += [
            (f"{side}.conv_in", f"{side}.conv_in", None),
            (f"{side}.norm_out", f"{side}.conv_norm_out", None),
            (f"{side}.conv_out", f"{side}.conv_out", None),
            (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET),
            (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTENTION),
            (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET),
        ]
    for i in range(n_blocks):
        for j in range(layers):
            entries.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i < n_blocks - 1:
            entries.append((f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", None))
    for i in range(n_blocks):
        up = n_blocks - 1 - i  # LDM numbers decoder blocks from the lowest resolution up
        for j in range(layers + 1):
            entries.append((f"decoder.up.{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i < n_blocks - 1:
            entries.append((f"decoder.up.{up}.upsample", f"decoder.up_blocks.{i}.upsamplers.0", None))
    return entries


@cache
def _sd15_unet_table() -> NameTable:
    from loramgr.models.architectures import architecture

    return NameTable(unet_entries(architecture("sd15").unet))


def ldm_unet_module_to_diffusers(path: str) -> str | None:
    """``input_blocks.4.0.in_layers.2`` -> ``down_blocks.1.resnets.0.conv1``; None where diffusers has no such module.

    SD1.5 topology (4 down blocks of 2 layers), which the ``tiny`` architecture shares.
    """
    return _sd15_unet_table().to_diffusers(path)


def diffusers_unet_module_to_ldm(path: str) -> str | None:
    """``up_blocks.0.upsamplers.0.conv`` -> ``output_blocks.2.1.conv``; None where LDM has no such module."""
    return _sd15_unet_table().to_ldm(path)


# Writing original-format files. diffusers only converts LDM -> diffusers, so this
# direction is written here, from the tables above; the tests convert every file back
# with diffusers' converters and require every parameter to come back bit-exact.


def to_ldm_state_dict(state_dict: Mapping[str, torch.Tensor], table: NameTable, prefix: str) -> dict[str, torch.Tensor]:
    """Rename a diffusers state dict to LDM names under ``prefix``; every key must map."""
    renamed = {}
    for name, tensor in state_dict.items():
        ldm = table.to_ldm(name)
        if ldm is None:
            raise ValueError(f"no LDM name for diffusers parameter {name!r}")
        renamed[prefix + ldm] = tensor
    return renamed


def ldm_state_dict(components: Mapping) -> dict[str, torch.Tensor]:
    """The LDM checkpoint of UNet, VAE and text encoder (the keys of an SD1.5 ``.ckpt``)."""
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    state = to_ldm_state_dict(unet.state_dict(), NameTable(unet_entries(unet.config)), LDM_UNET_PREFIX)
    vae_state = to_ldm_state_dict(vae.state_dict(), NameTable(vae_entries(vae.config)), LDM_VAE_PREFIX)
    for name, tensor in vae_state.items():
        if ".mid.attn_1." in name and tensor.ndim == 2:
            vae_state[name] = tensor[:, :, None, None]  # LDM's VAE attention projections are 1x1 convs
    state.update(vae_state)
    for name, tensor in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); LDM files keep it.
        state[f"{LDM_CLIP_PREFIX}text_model.{name.removeprefix('text_model.')}"] = tensor
    return state


def save_single_file(components: Mapping, path: Path) -> None:
    """Write an SD1.5 single-file checkpoint in the original layout.

    ``.safetensors`` holds the flat state dict; ``.ckpt`` is ``torch.save({"state_dict": ...})``
    as CompVis and A1111 wrote them.

    Example::

        save_single_file(build_components(architecture("tiny")), Path("tiny.safetensors"))
    """
    _save(ldm_state_dict(components), Path(path), torch_suffix=".ckpt", wrap=True)


def save_controlnet_original(controlnet: torch.nn.Module, path: Path) -> None:
    """Write a ControlNet in lllyasviel's layout (``control_model.*``), as ``.safetensors`` or ``.pth``.

    ``.pth`` is the flat state dict, as ``control_v11p_sd15_canny.pth`` is.
    """
    table = NameTable(controlnet_entries(controlnet.config))
    state = to_ldm_state_dict(controlnet.state_dict(), table, LDM_CONTROLNET_PREFIX)
    _save(state, Path(path), torch_suffix=".pth", wrap=False)


def _save(state: dict[str, torch.Tensor], path: Path, torch_suffix: str, wrap: bool) -> None:
    import torch

    state = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    elif path.suffix == torch_suffix:
        torch.save({"state_dict": state} if wrap else state, path)
    else:
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use .safetensors or {torch_suffix}")
