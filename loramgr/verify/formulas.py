"""The reference merge, written from the published formulas (LyCORIS, PEFT), apart from ``loramgr.formats``.

Each function follows the code of the project that defines the format, named in its
docstring, so that a disagreement with loramgr points at loramgr's reading of the
format, not at a shared helper. Everything is computed in float32.
"""

from __future__ import annotations

import torch

from .sources import SourceModule


def lora_product(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """LyCORIS ``LoConModule.make_weight``: ``up @ down`` flattened, or the Tucker form with ``lora_mid``."""
    up, down = f["up"].float(), f["down"].float()
    if "mid" in f:
        return torch.einsum("i j k l, p i, j r -> p r k l", f["mid"].float(), up.flatten(1), down.flatten(1)).reshape(shape)
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS ``make_weight_cp``: the Tucker rebuild ``[r, r, kh, kw] x [r, out] x [r, in] -> [out, in, kh, kw]``."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t.float(), wa.float(), wb.float())


def loha_product(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """LyCORIS LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)``, Hadamard product of two low-rank matrices."""
    if "t1" in f:
        return (_cp(f["t1"], f["w1_a"], f["w1_b"]) * _cp(f["t2"], f["w2_a"], f["w2_b"])).reshape(shape)
    w1 = f["w1_a"].float() @ f["w1_b"].float().flatten(1)
    w2 = f["w2_a"].float() @ f["w2_b"].float().flatten(1)
    return (w1 * w2).reshape(shape)


def lokr_product(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """LyCORIS ``make_kron``: ``kron(w1, w2)``, ``w1`` unsqueezed to 4-D when ``w2`` is a conv kernel."""
    w1 = f["w1"].float() if "w1" in f else f["w1_a"].float() @ f["w1_b"].float()
    if "w2" in f:
        w2 = f["w2"].float()
    elif "t2" in f:
        w2 = _cp(f["t2"], f["w2_a"], f["w2_b"])
    else:
        w2 = f["w2_a"].float() @ f["w2_b"].float().flatten(1)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape)


PRODUCTS = {"lora": lora_product, "loha": loha_product, "lokr": lokr_product}


def delta(module: SourceModule, shape: tuple[int, ...]) -> torch.Tensor:
    """``scale * product``: the change at multiplier 1, before any DoRA rescale."""
    return PRODUCTS[module.kind](module.factors, shape) * module.scale


def merged(weight: torch.Tensor, module: SourceModule, multiplier: float) -> torch.Tensor:
    """``weight`` with ``module`` applied at ``multiplier``, as the format's own implementation merges it.

    - plain: ``W + m * dW`` (kohya, LyCORIS ``merge_to``, PEFT ``merge``);
    - LyCORIS DoRA (``dora_scale``), ``get_merged_weight`` + ``apply_weight_decompose``:
      ``W' = W + dW`` at full strength, ``s = dora_scale / (norm(W') + eps)`` with the norm
      per output row or per input column (the axis ``dora_scale`` keeps),
      ``W' * (m * (s - 1) + 1)``;
    - PEFT DoRA (``lora_magnitude_vector``), ``LoraLayer.merge`` with ``use_dora``:
      ``W' = W + m * dW``, then ``magnitude / norm(W')`` per output row, no eps.
    """
    weight = weight.float()
    shape = tuple(weight.shape)
    change = delta(module, shape)
    if module.dora is None:
        return weight + multiplier * change
    magnitude = module.magnitude.float()
    if module.dora == "peft":
        new = weight + multiplier * change
        norm = new.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *[1] * (len(shape) - 1))
        return magnitude.reshape(norm.shape) / norm * new
    new = weight + change
    eps = torch.finfo(torch.float32).eps
    if magnitude.shape[0] == shape[0] and magnitude.shape[1] == 1:  # LyCORIS wd_on_output
        norm = new.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *[1] * (len(shape) - 1)) + eps
    else:
        norm = new.transpose(0, 1).reshape(shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(shape[1], *[1] * (len(shape) - 1)).transpose(0, 1) + eps
    scale = magnitude / norm
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return new * scale
