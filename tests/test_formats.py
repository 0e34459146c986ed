"""loramgr.formats: every adapter format read into WeightDeltas, checked against independent references.

References: diffusers' own LoRA loading and fusing (asserting how many modules it
changed: it can silently do nothing), PEFT's LoRA / LoHa / LoKr / DoRA layers, the
conv arithmetic of LoCon itself, and formulas written out here. Tolerances: fp32
throughout; merged weights (magnitude ~0.1-1) agree within atol 1e-6 / rtol 1e-5,
i.e. a few float32 roundings.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loramgr.errors import BadFileError
from loramgr.formats import ParsedAdapter, WeightDelta, delta_weight, merge_weight, read_adapter
from format_writers import (
    base_namespace,
    cloneofsimo_file,
    cloneofsimo_walk,
    kohya_name,
    lora_factors,
    lycoris_file,
    peft_layers,
    save,
)

TOL = {"atol": 1e-6, "rtol": 1e-5}


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> dict[str, torch.nn.Module]:
    """The tiny architecture with the weights saved in ``tiny_folder``."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_folder / "unet"),
        "controlnet": ControlNetModel.from_pretrained(tiny_folder / "controlnet"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_folder / "text_encoder"),
    }


@pytest.fixture(scope="module")
def weights(tiny) -> dict[str, torch.Tensor]:
    return base_namespace(tiny)


@pytest.fixture(scope="module")
def params(weights) -> dict[str, tuple[int, ...]]:
    return {name: tuple(w.shape) for name, w in weights.items()}


def by_param(parsed: ParsedAdapter) -> dict[str, WeightDelta]:
    return {d.param: d for d in parsed.deltas}


def merged(weights, delta: WeightDelta, multiplier: float = 1.0) -> torch.Tensor:
    return merge_weight(weights[delta.param], [(delta, multiplier)])


# ---------------------------------------------------------------- real files (sd15 base)

REAL = {
    # file: (format, UNet deltas, text-encoder deltas, dtype)
    "sd15_old_processor_catundchat.safetensors": ("diffusers-old-processor", 128, 0, "float32"),
    "sd15_unet_prefix_lora_down_timohavdk.safetensors": ("diffusers", 128, 0, "float32"),
    "sd15_kohya_lycoris_lokr_r4.safetensors": ("lycoris-lokr", 278, 72, "float16"),
    "sd15_cloneofsimo_analog_svd_r4.safetensors": ("cloneofsimo", 144, 48, "float16"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_file_parses_completely(name, sd15_param_shapes, testdata):
    fmt, n_unet, n_text, dtype = REAL[name]
    parsed = read_adapter(testdata / name, sd15_param_shapes)
    components = Counter("unet" if d.param.startswith("unet.") else "text" for d in parsed.deltas)
    assert (parsed.format, parsed.kind, parsed.dtype) == (fmt, "lora", dtype)
    assert (components["unet"], components["text"]) == (n_unet, n_text)
    assert parsed.keys_used == parsed.keys_total and parsed.unknown_keys == []
    assert parsed.ranks == {4}
    assert all(d.param in sd15_param_shapes for d in parsed.deltas)
    assert all(t.dtype == getattr(torch, dtype) for d in parsed.deltas for t in d.tensors.values())
    for delta in parsed.deltas[:: max(1, len(parsed.deltas) // 6)]:  # sd15-size products are slow on 2 cores
        dw = delta_weight(delta, sd15_param_shapes[delta.param])
        assert dw.dtype == torch.float32 and dw.shape == sd15_param_shapes[delta.param] and dw.abs().max() > 0


def test_real_kohya_lokr_details(sd15_param_shapes, testdata):
    parsed = read_adapter(testdata / "sd15_kohya_lycoris_lokr_r4.safetensors", sd15_param_shapes)
    deltas = by_param(parsed)
    assert parsed.trigger_words == ["smart falcon \\(umamusume\\)"]  # in all 130 captions; "hair bow" in 129
    conv = deltas["unet.down_blocks.0.resnets.0.conv1.weight"]  # flattened 2-D Kronecker factors of a 3x3 conv
    assert conv.kind == "lokr" and conv.scale == 1.0 and set(conv.tensors) == {"w1_a", "w1_b", "w2_a", "w2_b"}
    w1 = conv.tensors["w1_a"].float() @ conv.tensors["w1_b"].float()
    w2 = conv.tensors["w2_a"].float() @ conv.tensors["w2_b"].float()
    expected = torch.stack([torch.stack([w1[i, j] * w2 for j in range(w1.shape[1])], 1) for i in range(w1.shape[0])])
    expected = expected.reshape(320, 320, 3, 3)  # kron written out block by block
    torch.testing.assert_close(delta_weight(conv, (320, 320, 3, 3)), expected, **TOL)
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in deltas


def test_real_cloneofsimo_positions(sd15_param_shapes, testdata):
    """cloneofsimo numbers modules in diffusers' old order: attn1 (4), GEGLU proj, attn2 (4) per block."""
    from safetensors.torch import load_file

    path = testdata / "sd15_cloneofsimo_analog_svd_r4.safetensors"
    raw, deltas = load_file(path), by_param(read_adapter(path, sd15_param_shapes))
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    expected = {
        "unet:0": f"{block}.attn1.to_q", "unet:3": f"{block}.attn1.to_out.0", "unet:4": f"{block}.ff.net.0.proj",
        "unet:6": f"{block}.attn2.to_k", "unet:54": "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet:135": "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "text_encoder:0": "text_model.encoder.layers.0.self_attn.k_proj",
        "text_encoder:47": "text_model.encoder.layers.11.self_attn.out_proj",
    }
    for key, module in expected.items():
        delta = deltas[module + ".weight"]
        assert torch.equal(delta.tensors["up"], raw[f"{key}:up"]) and torch.equal(delta.tensors["down"], raw[f"{key}:down"])
        assert delta.scale == 1.0


def test_real_old_processor_maps_to_out(sd15_param_shapes, testdata):
    from safetensors.torch import load_file

    path = testdata / "sd15_old_processor_catundchat.safetensors"
    raw, deltas = load_file(path), by_param(read_adapter(path, sd15_param_shapes))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"
    assert torch.equal(deltas["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"].tensors["up"], raw[key])


NEGATIVE = {
    "git_lfs_pointer.safetensors": r"Git LFS pointer \(134 bytes\).*185,968,776.*git lfs pull",
    "truncated.safetensors": r"truncated: .*but the file has 1,310,720",
    "sd2x_old_processor.safetensors": r"attn2\.processor\.to_k_lora\.down\.weight: expected shape \[4, 768\], "
                                      r"got \[4, 1024\].*SD 2\.x",
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_real_negative_file_refused(name, sd15_param_shapes, testdata):
    path = testdata / "negative" / name
    with pytest.raises(BadFileError, match=NEGATIVE[name]) as error:
        read_adapter(path, sd15_param_shapes)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


# ---------------------------------------------------------------- LoRA / LoCon vs diffusers

UNET_MODULES = {  # module: alpha -- linear, 1x1 and 3x3 convs of every block kind
    # diffusers quirks kept out of the oracle's way: a module without alpha gets the file's
    # most common alpha there (kohya: alpha = rank; alpha-free files are covered below), and
    # an attention module's own alpha is ignored (its alpha_pattern key is misspelled), so
    # every module has an alpha and the attention ones use the most common one, 2.0.
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2.0,
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": 2.0,
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": 8.0,
    "down_blocks.0.attentions.0.proj_in": 1.0,
    "up_blocks.3.attentions.2.proj_out": 0.5,
    "down_blocks.0.resnets.0.conv1": 4.0,
    "down_blocks.0.resnets.0.time_emb_proj": 16.0,
    "down_blocks.0.downsamplers.0.conv": 2.0,
    "up_blocks.1.resnets.0.conv_shortcut": 4.0,
    "up_blocks.0.upsamplers.0.conv": 3.0,
    "mid_block.resnets.1.conv2": 2.0,
}


def kohya_unet_file(path: Path, params, modules=UNET_MODULES, rank=4, seed=0) -> Path:
    gen, tensors = torch.Generator().manual_seed(seed), {}
    for module, alpha in modules.items():
        name = kohya_name("unet", module)
        up, down = lora_factors(gen, params[f"unet.{module}.weight"], rank)
        tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up, down
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return save(path, tensors, {"ss_network_dim": str(rank)})


def diffusers_fused_unet(unet_folder: Path, lora: Path) -> tuple[dict, dict]:
    """(base, fused) UNet weights after diffusers' ``load_lora_into_unet`` + ``fuse_lora``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(lora))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet)
    unet.fuse_lora()
    unet.unload_lora()
    return base, {n: p.detach() for n, p in unet.named_parameters()}


def assert_matches_diffusers(parsed: ParsedAdapter, tiny_folder: Path, path: Path, expected_modules: set[str], weights):
    base, fused = diffusers_fused_unet(tiny_folder / "unet", path)
    changed = {f"unet.{n}" for n in fused if not torch.equal(fused[n], base[n])}
    assert changed == {f"unet.{m}.weight" for m in expected_modules}  # diffusers really applied every module
    for delta in parsed.deltas:
        torch.testing.assert_close(merged(weights, delta), fused[delta.param.removeprefix("unet.")], **TOL)


def test_kohya_lora_locon_matches_diffusers(tmp_path, tiny_folder, params, weights):
    path = kohya_unet_file(tmp_path / "kohya.safetensors", params)
    parsed = read_adapter(path, params)
    assert parsed.format == "kohya" and parsed.keys_used == parsed.keys_total == 3 * 11
    assert {d.param for d in parsed.deltas} == {f"unet.{m}.weight" for m in UNET_MODULES}
    deltas = by_param(parsed)
    for module, alpha in UNET_MODULES.items():
        assert deltas[f"unet.{module}.weight"].scale == alpha / 4
    conv = deltas["unet.down_blocks.0.resnets.0.conv1.weight"].tensors
    assert conv["up"].shape == (32, 4) and conv["down"].shape == (4, 32 * 9)  # LoCon factors flattened
    assert_matches_diffusers(parsed, tiny_folder, path, set(UNET_MODULES), weights)


def test_locon_delta_is_the_conv_of_its_factors(tmp_path, params):
    """Independent of any library: conv(x, dW) == up(mid(down(x))) for plain and Tucker LoCon."""
    gen = torch.Generator().manual_seed(1)
    module, shape, rank = "down_blocks.0.resnets.0.conv1", params["unet.down_blocks.0.resnets.0.conv1.weight"], 4
    up, down = lora_factors(gen, shape, rank)
    mid = 0.3 * torch.randn(rank, rank, 3, 3, generator=gen)
    down_1x1 = 0.1 * torch.randn(rank, shape[1], 1, 1, generator=gen)
    name = kohya_name("unet", module)
    x = torch.randn(2, shape[1], 8, 8, generator=gen)
    cases = {
        "plain": ({"lora_down.weight": down}, lambda x: F.conv2d(F.conv2d(x, down, padding=1), up)),
        "tucker": ({"lora_down.weight": down_1x1, "lora_mid.weight": mid},
                   lambda x: F.conv2d(F.conv2d(F.conv2d(x, down_1x1), mid, padding=1), up)),
    }
    for case, (extra, reference) in cases.items():
        tensors = {f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0), **{f"{name}.{k}": v for k, v in extra.items()}}
        (delta,) = read_adapter(save(tmp_path / f"{case}.safetensors", tensors), params).deltas
        assert delta.tensors["down"].shape == (rank, shape[1] * 9)  # Tucker folded: still rank 4
        ours = F.conv2d(x, delta_weight(delta, shape), padding=1)
        torch.testing.assert_close(ours, 0.5 * reference(x), atol=1e-5, rtol=1e-5)


SPELLINGS = {  # format name: key for (module, part), parts "up" / "down"
    "kohya": lambda m, p: f"{kohya_name('unet', m)}.lora_{p}.weight",
    "diffusers": lambda m, p: f"unet.{m}.lora.{p}.weight",
    "peft": lambda m, p: f"unet.{m}.lora_{'B' if p == 'up' else 'A'}.weight",
    "diffusers-old-processor": lambda m, p: f"unet.{m.replace('.to_out.0', '.to_out').replace('.to_', '.processor.to_')}_lora.{p}.weight",
    "diffusers-old-processor-bare": lambda m, p: f"{m.replace('.to_out.0', '.to_out').replace('.to_', '.processor.to_')}_lora.{p}.weight",
}
ATTENTION = [f"down_blocks.1.attentions.0.transformer_blocks.0.attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_lora_spellings_agree(spelling, tmp_path, tiny_folder, params, weights):
    """The same factors spelled every way give the same deltas; diffusers agrees where it reads the spelling."""
    gen, tensors = torch.Generator().manual_seed(2), {}
    for module in ATTENTION:
        up, down = lora_factors(gen, params[f"unet.{module}.weight"], 4)
        tensors[SPELLINGS[spelling](module, "up")], tensors[SPELLINGS[spelling](module, "down")] = up, down
    path = save(tmp_path / "lora.safetensors", tensors)
    parsed = read_adapter(path, params)
    assert parsed.format == spelling.removesuffix("-bare") and parsed.keys_used == parsed.keys_total == 16
    assert {d.param for d in parsed.deltas} == {f"unet.{m}.weight" for m in ATTENTION}
    assert all(d.scale == 1.0 for d in parsed.deltas)
    if spelling.endswith("-bare"):  # diffusers loads this spelling as 0 modules (REFERENCE.md): compare to "kohya"
        tensors = {SPELLINGS["kohya"](m, p): tensors[SPELLINGS[spelling](m, p)] for m in ATTENTION for p in ("up", "down")}
        reference = by_param(read_adapter(save(tmp_path / "kohya.safetensors", tensors), params))
        for delta in parsed.deltas:
            torch.testing.assert_close(delta_weight(delta, params[delta.param]), delta_weight(reference[delta.param], params[delta.param]))
    else:
        assert_matches_diffusers(parsed, tiny_folder, path, set(ATTENTION), weights)


LDM_NAMES = {  # kohya LDM-style name -> diffusers module, written out from the SD1.5 block layout
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_2_1_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_emb_layers_1": "down_blocks.1.resnets.0.time_emb_proj",
    "input_blocks_7_0_skip_connection": "down_blocks.2.resnets.0.conv_shortcut",
    "input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
    "middle_block_0_in_layers_2": "mid_block.resnets.0.conv1",
    "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_1_proj_out": "up_blocks.1.attentions.0.proj_out",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_2_conv": "up_blocks.2.upsamplers.0.conv",
    "output_blocks_11_1_transformer_blocks_0_attn1_to_out_0": "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "out_2": "conv_out",
}


def test_kohya_ldm_names(tmp_path, params):
    gen, tensors, factors = torch.Generator().manual_seed(3), {}, {}
    for ldm, module in LDM_NAMES.items():
        up, down = factors[module] = lora_factors(gen, params[f"unet.{module}.weight"], 2)
        tensors[f"lora_unet_{ldm}.lora_up.weight"], tensors[f"lora_unet_{ldm}.lora_down.weight"] = up, down
    parsed = read_adapter(save(tmp_path / "ldm.safetensors", tensors), params)
    assert parsed.format == "kohya-ldm" and parsed.keys_used == parsed.keys_total == 2 * len(LDM_NAMES)
    deltas = by_param(parsed)
    for module, (up, down) in factors.items():
        assert torch.equal(deltas[f"unet.{module}.weight"].tensors["up"], up.reshape(up.shape[0], -1))


def test_every_sd15_module_resolves_by_kohya_and_ldm_name(tmp_path, sd15_param_shapes):
    """Every 2-D+ weight of the sd15 UNet and text encoder is reachable by its kohya name, UNet ones also by LDM name."""
    from loramgr.models.ldm import diffusers_unet_module_to_ldm

    modules = {p.removesuffix(".weight"): shape for p, shape in sd15_param_shapes.items()
               if p.endswith(".weight") and len(shape) >= 2 and not p.startswith("controlnet.")}
    names = {m: kohya_name("unet", m.removeprefix("unet.")) if m.startswith("unet.") else kohya_name("text_encoder", m.removeprefix("text_model."))
             for m in modules}
    ldm = {m: "lora_unet_" + diffusers_unet_module_to_ldm(m.removeprefix("unet.")).replace(".", "_") for m in modules if m.startswith("unet.")}
    for fmt, spelled in (("kohya", names), ("kohya-ldm", ldm)):
        tensors = {}
        for module, name in spelled.items():
            out, fan_in, *kernel = modules[module]
            tensors |= {f"{name}.lora_up.weight": torch.zeros(out, 1), f"{name}.lora_down.weight": torch.zeros(1, fan_in, *kernel)}
        parsed = read_adapter(save(tmp_path / f"{fmt}.safetensors", tensors), sd15_param_shapes)
        assert parsed.format == fmt and {d.param for d in parsed.deltas} == {f"{m}.weight" for m in spelled}
    assert len(ldm) == 282 and len(names) == 282 + 74  # linear/conv weights: UNet; CLIP's 72 linears + 2 embeddings


def test_text_encoder_lora_matches_peft(tmp_path, tiny, params):
    """Text-encoder LoRA spelled by kohya (``lora_te_`` / ``lora_te1_``), PEFT and old diffusers, vs PEFT's layers."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"fc1": 2}, target_modules=["q_proj", "out_proj", "fc1"], init_lora_weights=False)
    layers = peft_layers(copy.deepcopy(tiny["text_encoder"]), config)
    assert len(layers) == 2 * 3
    files: dict[str, dict] = {"kohya": {}, "peft": {}, "diffusers": {}, "diffusers-old-processor": {}}
    for i, (module, layer) in enumerate(sorted(layers.items())):
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        kohya = kohya_name("text_encoder", module).replace("lora_te_", "lora_te1_" if i % 2 else "lora_te_")
        files["kohya"] |= {f"{kohya}.lora_down.weight": a, f"{kohya}.lora_up.weight": b,
                           f"{kohya}.alpha": torch.tensor(layer.scaling["default"] * 4)}
        dotted = f"text_encoder.text_model.{module}"
        files["peft"] |= {f"{dotted}.lora_A.weight": a, f"{dotted}.lora_B.weight": b}
        files["diffusers"] |= {f"{dotted}.lora_linear_layer.down.weight": a, f"{dotted}.lora_linear_layer.up.weight": b}
        old = dotted.replace("self_attn.q_proj", "self_attn.to_q_lora").replace("self_attn.out_proj", "self_attn.to_out_lora")
        if old != dotted:  # that format covered the attention projections only
            files["diffusers-old-processor"] |= {f"{old}.down.weight": a, f"{old}.up.weight": b}
    metadata = {"lora_adapter_metadata": json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 8, "text_encoder.alpha_pattern": {"fc1": 2}})}
    for fmt, tensors in files.items():
        parsed = read_adapter(save(tmp_path / f"{fmt}.safetensors", tensors, metadata if fmt == "peft" else None), params)
        assert parsed.format == fmt and parsed.keys_used == parsed.keys_total == len(tensors)
        assert len(parsed.deltas) == (4 if fmt == "diffusers-old-processor" else 6)
        for delta in parsed.deltas:
            layer = layers[delta.param.removeprefix("text_model.").removesuffix(".weight")]
            scaling = layer.scaling["default"] if fmt.startswith("diffusers") else 1.0  # old diffusers files have no alpha
            assert delta.scale * scaling == layer.scaling["default"]
            torch.testing.assert_close(delta_weight(delta, params[delta.param]) * scaling, layer.get_delta_weight("default"), **TOL)
    bare = {name.removeprefix("text_model."): shape for name, shape in params.items()}  # transformers-5 parameter names
    assert {d.param for d in read_adapter(tmp_path / "kohya.safetensors", bare).deltas} == {f"{m}.weight" for m in layers}


def test_peft_folder_with_adapter_config(tmp_path, tiny, params):
    """A real PEFT ``save_pretrained`` folder: alphas (rsLoRA) from its adapter_config.json."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["k_proj", "fc2"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(tiny["text_encoder"]), config)
    model.save_pretrained(tmp_path / "adapter")
    parsed = read_adapter(tmp_path / "adapter", params)
    assert parsed.format == "peft" and len(parsed.deltas) == 4 and parsed.keys_used == parsed.keys_total
    layers = {"text_model." + n.removeprefix("base_model.model."): m
              for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    for delta in parsed.deltas:
        assert delta.scale == pytest.approx(6 / 2)  # rsLoRA: alpha / sqrt(r)
        torch.testing.assert_close(delta_weight(delta, params[delta.param]), layers[delta.param.removesuffix(".weight")].get_delta_weight("default"), **TOL)


# ---------------------------------------------------------------- LyCORIS vs PEFT

LOHA_CASES = {  # name: (target modules, use_effective_conv2d) -- effective conv2d is LyCORIS' Tucker form
    "linear": (["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"], False),
    "conv-tucker": (["down_blocks.0.resnets.0.conv1", "up_blocks.0.upsamplers.0.conv", "down_blocks.0.attentions.0.proj_in"], True),
    "conv-flat": (["down_blocks.0.resnets.1.conv2", "down_blocks.0.downsamplers.0.conv"], False),
}


@pytest.mark.parametrize("case", sorted(LOHA_CASES))
def test_loha_matches_peft(case, tmp_path, tiny, params):
    from peft import LoHaConfig

    targets, effective = LOHA_CASES[case]
    config = LoHaConfig(r=4, alpha=2, target_modules=targets, use_effective_conv2d=effective, init_weights=False)
    layers = peft_layers(copy.deepcopy(tiny["unet"]), config)
    parsed = read_adapter(lycoris_file(tmp_path / "loha.safetensors", layers, "hada_", 2.0), params)
    assert parsed.format == "lycoris-loha" and len(parsed.deltas) == len(targets) and parsed.keys_used == parsed.keys_total
    tucker = {d.param for d in parsed.deltas if "t1" in d.tensors}
    assert tucker == ({f"unet.{m}.weight" for m in targets if params[f"unet.{m}.weight"][2:] != (1, 1)} if effective else set())
    deltas = by_param(parsed)
    for module, layer in layers.items():
        delta = deltas[f"unet.{module}.weight"]
        assert delta.scale == 0.5
        torch.testing.assert_close(delta_weight(delta, params[delta.param]), layer.get_delta_weight("default"), **TOL)


LOKR_CASES = {  # name: (targets, r, extra config, expected factor names)
    "linear": (["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"], 1, {}, {"w1", "w2_a", "w2_b"}),
    "decompose-both": (["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"], 2, {"decompose_both": True}, {"w1_a", "w1_b", "w2_a", "w2_b"}),
    "conv-tucker": (["down_blocks.0.resnets.0.conv1"], 2, {"use_effective_conv2d": True}, {"w1", "w2_a", "w2_b", "t2"}),
    "conv-flat": (["down_blocks.1.resnets.0.conv2"], 2, {}, {"w1", "w2_a", "w2_b"}),
}


@pytest.mark.parametrize("case", sorted(LOKR_CASES))
def test_lokr_matches_peft(case, tmp_path, tiny, params):
    from peft import LoKrConfig

    targets, rank, extra, factors = LOKR_CASES[case]
    config = LoKrConfig(r=rank, alpha=3, target_modules=targets, init_weights=False, **extra)
    layers = peft_layers(copy.deepcopy(tiny["unet"]), config)
    parsed = read_adapter(lycoris_file(tmp_path / "lokr.safetensors", layers, "lokr_", 3.0), params)
    assert parsed.format == "lycoris-lokr" and parsed.keys_used == parsed.keys_total
    for delta in parsed.deltas:
        assert set(delta.tensors) == factors and delta.scale == 3 / rank
        layer = layers[delta.param.removeprefix("unet.").removesuffix(".weight")]
        torch.testing.assert_close(delta_weight(delta, params[delta.param]), layer.get_delta_weight("default"), **TOL)


def test_lokr_full_factors_take_no_scale(tmp_path, params):
    """LyCORIS: with w1 and w2 both full there is no rank, so no alpha scale (PEFT would use alpha / r)."""
    gen = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen)
    name = kohya_name("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")
    path = save(tmp_path / "full.safetensors", {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(7.0)})
    (delta,) = read_adapter(path, params).deltas
    assert delta.scale == 1.0
    expected = torch.einsum("ab,cd->acbd", w1, w2).reshape(32, 32)  # kron written as an outer product
    torch.testing.assert_close(delta_weight(delta, (32, 32)), expected, **TOL)


# ---------------------------------------------------------------- DoRA

@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_dora_lycoris_formula(orientation, multiplier, tmp_path, params, weights):
    """LyCORIS: W' = W + s*dW; W' * (m * (dora / ||W'|| - 1) + 1), norms over all axes but the kept one."""
    gen, tensors = torch.Generator().manual_seed(5), {}
    modules = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "down_blocks.0.resnets.0.conv2"]
    expected = {}
    for module in modules:
        shape, name = params[f"unet.{module}.weight"], kohya_name("unet", module)
        up, down = lora_factors(gen, shape, 4, std=0.3)
        keep = 1 if orientation == "input" else 0
        dora = 1 + torch.rand([s if i == keep else 1 for i, s in enumerate(shape)], generator=gen)
        tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": dora}
        w = weights[f"unet.{module}.weight"] + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(shape)
        axes = [i for i in range(len(shape)) if i != keep]
        norm = w.pow(2).sum(dim=axes, keepdim=True).sqrt()
        expected[f"unet.{module}.weight"] = w * (multiplier * (dora / norm - 1) + 1)
    parsed = read_adapter(save(tmp_path / "dora.safetensors", tensors), params)
    assert parsed.keys_used == parsed.keys_total == 8
    for delta in parsed.deltas:
        assert delta.dora_scale is not None
        torch.testing.assert_close(merged(weights, delta, multiplier), expected[delta.param], **TOL)


def test_dora_peft_matches_peft_merge(tmp_path, tiny, params, weights):
    """PEFT DoRA (``lora_magnitude_vector``, per output channel) merges as PEFT merges it at multiplier 1."""
    from peft import LoraConfig, get_peft_model_state_dict

    modules = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"]
    unet = copy.deepcopy(tiny["unet"])
    layers = peft_layers(unet, LoraConfig(r=4, lora_alpha=8, target_modules=modules, use_dora=True, init_lora_weights=False))
    gen = torch.Generator().manual_seed(6)
    for layer in layers.values():
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.data *= 1 + 0.2 * torch.rand(magnitude.shape, generator=gen)  # not the init norm
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    parsed = read_adapter(save(tmp_path / "dora.safetensors", state, metadata), params)
    assert parsed.format == "peft" and parsed.keys_used == parsed.keys_total == 6
    for module, layer in layers.items():
        layer.merge()
        delta = by_param(parsed)[f"unet.{module}.weight"]
        torch.testing.assert_close(merged(weights, delta), layer.get_base_layer().weight.detach(), **TOL)


# ---------------------------------------------------------------- merge semantics

def test_merge_weight_sums_and_replaces():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(32, 32, generator=gen)
    up1, down1 = lora_factors(gen, (32, 32), 4)
    up2, down2 = lora_factors(gen, (32, 32), 2)
    a = WeightDelta("p.weight", "lora", {"up": up1, "down": down1}, 0.5)
    b = WeightDelta("p.weight", "lora", {"up": up2.half(), "down": down2.half()}, 2.0)
    full = WeightDelta("p.weight", "full", {"weight": torch.randn(32, 32, generator=gen).half()}, 1.0)
    expected = base + 0.8 * 0.5 * up1 @ down1 - 1.5 * 2.0 * up2.half().float() @ down2.half().float()
    torch.testing.assert_close(merge_weight(base, [(a, 0.8), (b, -1.5)]), expected, **TOL)
    replaced = merge_weight(base, [(a, 1.0), (full, 1.0)])
    torch.testing.assert_close(replaced, full.tensors["weight"].float() + 0.5 * up1 @ down1, **TOL)
    assert replaced.dtype == torch.float32
    with pytest.raises(ValueError, match="multiplier 1"):
        merge_weight(base, [(full, 0.5)])
    with pytest.raises(ValueError, match="2 full replacements"):
        merge_weight(base, [(full, 1.0), (full, 1.0)])
    with pytest.raises(ValueError, match="use merge_weight"):
        delta_weight(full, (32, 32))


# ---------------------------------------------------------------- cloneofsimo

def test_cloneofsimo_current_diffusers_order(tmp_path, tiny, params):
    """A file numbered by cloneofsimo's own walk over today's diffusers modules (ff after attn2)."""
    gen = torch.Generator().manual_seed(8)
    for component, targets in (("unet", ["CrossAttention", "Attention", "GEGLU"]), ("text_encoder", ["CLIPAttention"])):
        modules = cloneofsimo_walk(tiny[component], set(targets))
        prefix = "unet." if component == "unet" else "text_model."
        factors = [lora_factors(gen, params[f"{prefix}{m}.weight"], 4) for m in modules]
        path = cloneofsimo_file(tmp_path / f"{component}.safetensors", component, targets, factors, embeddings={"<s1>": torch.zeros(32)})
        parsed = read_adapter(path, params)
        assert parsed.format == "cloneofsimo" and parsed.keys_used == 2 * len(modules) + 1
        assert parsed.unknown_keys == []  # the pivotal-tuning token embedding is one of the file's embeddings
        assert torch.equal(parsed.embeddings["<s1>"], torch.zeros(1, 32))
        deltas = by_param(parsed)
        for module, (up, down) in zip(modules, factors):
            assert torch.equal(deltas[f"{prefix}{module}.weight"].tensors["down"], down)
    assert len(modules) == 4 * 2  # tiny text encoder: 2 layers x (k, v, q, out)


def test_cloneofsimo_of_another_base_refused(params, testdata):
    with pytest.raises(BadFileError, match=r"cloneofsimo (text_encoder|unet) LoRA .* does not fit this base"):
        read_adapter(testdata / "sd15_cloneofsimo_analog_svd_r4.safetensors", params)


# ---------------------------------------------------------------- ControlNet

def assert_controlnet_deltas(parsed: ParsedAdapter, tiny, params, fmt: str, dtype=torch.float32):
    expected = {f"controlnet.{n}": p.detach() for n, p in tiny["controlnet"].named_parameters()}
    assert parsed.kind == "controlnet" and parsed.format == fmt
    assert {d.param for d in parsed.deltas} == {p for p in params if p.startswith("controlnet.")} == set(expected)
    for delta in parsed.deltas:
        assert delta.kind == "full" and delta.scale == 1.0 and delta.tensors["weight"].dtype == dtype
        assert torch.equal(delta.tensors["weight"].float(), expected[delta.param].to(dtype).float())


def test_controlnet_diffusers_folder(tiny_folder, tiny, params):
    parsed = read_adapter(tiny_folder / "controlnet", params, kind="controlnet")
    assert parsed.keys_used == parsed.keys_total == len(list(tiny["controlnet"].parameters()))
    assert_controlnet_deltas(parsed, tiny, params, "controlnet-diffusers")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("with_config", [True, False])
def test_controlnet_original_checkpoint(suffix, with_config, tmp_path, tiny, params):
    from loramgr.models.architectures import architecture
    from loramgr.models.ldm import save_controlnet_original

    path = tmp_path / f"control_tiny{suffix}"
    save_controlnet_original(tiny["controlnet"], path)
    config = architecture("tiny").controlnet if with_config else None
    parsed = read_adapter(path, params, controlnet_config=config)
    assert parsed.keys_used == parsed.keys_total and parsed.unknown_keys == []
    assert_controlnet_deltas(parsed, tiny, params, "controlnet-original")


def test_controlnet_fp16_stays_fp16_and_extra_keys_reported(tmp_path, tiny, params):
    state = {n: p.detach().half() for n, p in tiny["controlnet"].named_parameters()}
    parsed = read_adapter(save(tmp_path / "cn.safetensors", {**state, "extra.weight": torch.zeros(1)}), params)
    assert parsed.unknown_keys == ["extra.weight"] and parsed.keys_used == parsed.keys_total - 1
    assert_controlnet_deltas(parsed, tiny, params, "controlnet-diffusers", dtype=torch.float16)


def test_controlnet_of_another_architecture(tiny_folder, sd15_param_shapes):
    with pytest.raises(BadFileError, match=r"ControlNet of another architecture: \S+ has shape \[\d+"):
        read_adapter(tiny_folder / "controlnet", sd15_param_shapes)


def test_kind_mismatch(tmp_path, tiny_folder, params):
    with pytest.raises(BadFileError, match="is a ControlNet checkpoint, not a LoRA-family adapter"):
        read_adapter(tiny_folder / "controlnet", params, kind="lora")
    with pytest.raises(BadFileError, match="is a LoRA-family adapter, not a ControlNet checkpoint"):
        read_adapter(kohya_unet_file(tmp_path / "k.safetensors", params), params, kind="controlnet")


# ---------------------------------------------------------------- keys not applied

def test_unknown_keys_listed_then_refused_in_strict_mode(tmp_path, params):
    path = kohya_unet_file(tmp_path / "k.safetensors", params)
    from safetensors.torch import load_file

    tensors = load_file(path)
    name = kohya_name("unet", "down_blocks.0.resnets.0.conv2")
    extra = {
        f"{name}.oft_blocks": torch.zeros(4, 8, 8),  # OFT
        f"{kohya_name('unet', 'down_blocks.0.resnets.0.conv1')}.lora_up.bias": torch.zeros(32),  # bias part
        f"{name}.lora_up.weight": torch.zeros(32, 4, 1, 1),  # up without down: incomplete
        "lora_unet_conv_norm_out.w_norm": torch.zeros(32),  # LyCORIS norm
    }
    path = save(tmp_path / "extra.safetensors", {**tensors, **extra})
    parsed = read_adapter(path, params)
    assert sorted(parsed.unknown_keys) == sorted(extra)
    assert parsed.keys_total == len(tensors) + 4 and parsed.keys_used == len(tensors)
    with pytest.raises(BadFileError, match=r"4 of 37 keys are not applied \(strict mode\), e\.g\. \S+ \((OFT|LoRA bias|LyCORIS norm), which"):
        read_adapter(path, params, strict=True)


def test_nothing_understood_refused(tmp_path, params):
    path = save(tmp_path / "oft.safetensors", {"lora_unet_conv_in.oft_blocks": torch.zeros(4, 8, 8)})
    with pytest.raises(BadFileError, match=r"no LoRA, LoHa, LoKr or ControlNet weights loramgr can apply, e\.g\. \S+oft_blocks \(OFT"):
        read_adapter(path, params)


def test_keys_matching_no_weight_refused(tmp_path, params):
    up, down = torch.zeros(32, 4), torch.zeros(4, 32)
    tensors = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
               f"{kohya_name('unet', ATTENTION[0])}.lora_up.weight": up.clone(),
               f"{kohya_name('unet', ATTENTION[0])}.lora_down.weight": down.clone()}
    with pytest.raises(BadFileError, match=r"2 of 4 keys match no weight of the base: first unmatched: lora_te2_.*SDXL"):
        read_adapter(save(tmp_path / "sdxl.safetensors", tensors), params)


# ---------------------------------------------------------------- broken files

class NotATensor:
    pass


BROKEN = {  # name: (writer, reason pattern)
    "notes.safetensors": (lambda p: p.write_text("just some notes\n"), "not a safetensors or PyTorch weight file"),
    "page.safetensors": (lambda p: p.write_text("<!DOCTYPE html><html>login</html>"), "not a safetensors or PyTorch"),
    "empty.safetensors": (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    "cut_header.safetensors": (lambda p: p.write_bytes((1000).to_bytes(8, "little") + b'{"a": {'), "truncated: the file ends inside"),
    "bad_header.safetensors": (lambda p: p.write_bytes((10).to_bytes(8, "little") + b'{"a": "b"}'), "corrupt safetensors header"),
    "cut.pt": (lambda p: (torch.save({"w": torch.zeros(1000)}, p), p.write_bytes(p.read_bytes()[:2000])), "unreadable PyTorch file, truncated"),
    "list.pt": (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state dict"),
    "code.pt": (lambda p: torch.save({"w": NotATensor()}, p), r"refused by torch's safe loader \(weights_only=True\)"),
    "legacy.pt": (lambda p: p.write_bytes(pickle.dumps({"w": NotATensor()}, protocol=2)), "refused by torch's safe loader"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_refused(name, tmp_path, params):
    writer, reason = BROKEN[name]
    writer(tmp_path / name)
    with pytest.raises(BadFileError, match=reason) as error:
        read_adapter(tmp_path / name, params)
    assert str(error.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(error.value)


def test_missing_path_and_empty_folder(tmp_path, params):
    with pytest.raises(BadFileError, match="no such file or folder"):
        read_adapter(tmp_path / "nope.safetensors", params)
    with pytest.raises(BadFileError, match="folder holds no adapter weights"):
        read_adapter(tmp_path, params)


def test_torch_checkpoint_state_dict_read(tmp_path, params):
    """``.ckpt`` layout ({"state_dict": …}) via the torch loader."""
    name = kohya_name("unet", ATTENTION[0])
    up, down = lora_factors(torch.Generator().manual_seed(9), (32, 32), 4)
    torch.save({"state_dict": {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}, "epoch": 3}, tmp_path / "l.ckpt")
    (delta,) = read_adapter(tmp_path / "l.ckpt", params).deltas
    assert torch.equal(delta.tensors["up"], up)


# ---------------------------------------------------------------- layering

def test_formats_imports_only_errors_filechecks_and_models():
    """Every import of loramgr.formats, relative ones and those inside functions too (resolved as test_layers.py
    resolves them), stays within formats, errors, filechecks and models."""
    from test_layers import MODULES, _imports, _resolve

    modules = [m for m in MODULES if m.startswith("formats.")]
    assert len(modules) > 5
    for module in modules:
        for name in _imports(module, MODULES[module]):
            target = _resolve(name) or name
            assert target in ("errors", "filechecks") or target.startswith(("formats.", "models.")), \
                f"{module} imports {target}"
