"""Attention fusion: the exported core becomes one MultiHeadAttention node, weights untouched, outputs equal."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from loramgr.backends.attention_fusion import fuse_attention
from loramgr.backends.onnxruntime import OrtOptions, OrtRunner
from loramgr.bench.fixtures import StepInputs
from loramgr.manifest import CONTROLNET, TEXT_ENCODER, UNET, VAE_DECODER, Manifest


class Attention(torch.nn.Module):
    """diffusers' ``AttnProcessor2_0`` core: projections, head split, SDPA, head merge."""

    def __init__(self, dim: int = 16, heads: int = 2, scale: float | None = None, masked: bool = False):
        super().__init__()
        self.heads, self.scale, self.masked = heads, scale, masked
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        head_dim = k.shape[-1] // self.heads
        q, k, v = (t.view(batch, -1, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril() if self.masked else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim))


def _export(module: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, (x, context), buffer, dynamo=False, opset_version=17, input_names=["x", "context"],
                      output_names=["out"], dynamic_axes={"x": {0: "b", 1: "s"}, "context": {0: "b", 1: "l"}})
    return onnx.load_from_string(buffer.getvalue())


def _run(model: onnx.ModelProto, **feeds: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def _weights_read(model: onnx.ModelProto) -> set[str]:
    initializers = {i.name for i in model.graph.initializer}
    return {name for node in model.graph.node for name in node.input if name in initializers}


@pytest.mark.parametrize("context_len", [None, 5])  # self-attention, cross-attention
def test_fused_attention_equals_the_exported_core(context_len):
    torch.manual_seed(0)
    module = Attention().eval()
    x = torch.randn(2, 9, 16)
    context = x if context_len is None else torch.randn(2, context_len, 16)
    model = _export(module, x, context)
    plain = _run(model, x=x, context=context)
    weights = _weights_read(model)
    assert fuse_attention(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Softmax" not in ops and ops.count("MultiHeadAttention") == 1
    assert next(n for n in model.graph.node if n.op_type == "MultiHeadAttention").attribute[0].i == 2  # heads
    assert _weights_read(model) == weights  # every projection still reads its own initializer
    with torch.no_grad():
        expected = module(x, context).numpy()
    np.testing.assert_allclose(_run(model, x=x, context=context), expected, atol=1e-5)
    np.testing.assert_allclose(plain, expected, atol=1e-5)


@pytest.mark.parametrize("variant", [{"scale": 0.5}, {"masked": True}])
def test_attention_the_op_would_compute_differently_is_left_alone(variant):
    x = torch.randn(1, 6, 16)
    model = _export(Attention(**variant).eval(), x, x)
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before


def _node_ops(session: ort.InferenceSession) -> Counter:
    """Op type -> number of nodes the session ran, from ONNX Runtime's profile of that session."""
    import json

    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = {e["name"]: e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    return Counter(nodes.values())


def test_the_base_graphs_fuse_and_runners_agree(tiny_workspace, tmp_path, monkeypatch):
    """Every UNet/ControlNet attention fuses; the runner's own session then runs MultiHeadAttention nodes and no
    Softmax (from ONNX Runtime's profile of every session the runner creates); outputs agree either way."""
    base_dir = tiny_workspace.base_dir("tiny")
    manifest = Manifest.load(base_dir)
    counts = {}
    for graph in (UNET, CONTROLNET, TEXT_ENCODER, VAE_DECODER):
        model = onnx.load(str(base_dir / manifest.graphs[graph].path), load_external_data=False)
        softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
        counts[graph] = (fuse_attention(model), softmaxes)
    assert counts[UNET][0] == counts[UNET][1] > 0 and counts[CONTROLNET][0] == counts[CONTROLNET][1] > 0
    assert counts[TEXT_ENCODER][0] == 0  # CLIP's causal mask: left as exported
    assert counts[VAE_DECODER][0] == counts[VAE_DECODER][1] == 1  # the mid-block attention

    created: list[ort.InferenceSession] = []

    class Profiled(ort.InferenceSession):  # every session the runner creates, profiled
        def __init__(self, model, sess_options=None, *args, **kwargs):
            sess_options = sess_options or ort.SessionOptions()
            sess_options.enable_profiling = True
            sess_options.profile_file_prefix = str(tmp_path / f"profile{len(created)}")
            super().__init__(model, sess_options, *args, **kwargs)
            created.append(self)

    monkeypatch.setattr(ort, "InferenceSession", Profiled)
    inputs = StepInputs.random(base_dir, manifest, 64)
    ids = torch.randint(0, 500, (1, 77))  # the tiny vocabulary has 520 ids
    outputs, ops = {}, {}
    for fused in (True, False):
        created.clear()
        with OrtRunner.open(base_dir, options=OrtOptions(fuse_attention=fused)) as runner:
            outputs[fused] = (inputs.step(runner), runner.encode_text(ids),
                              runner.vae_decode(inputs.latents))
            for graph, input_name in ((UNET, "mid_block_res"), (CONTROLNET, "controlnet_cond")):
                (session,) = [s for s in created if input_name in {i.name for i in s.get_inputs()}]
                ops[fused, graph] = _node_ops(session)
    for graph in (UNET, CONTROLNET):
        fused_ops, plain_ops = ops[True, graph], ops[False, graph]
        assert fused_ops["MultiHeadAttention"] == counts[graph][0] and fused_ops["Softmax"] == 0, fused_ops
        assert plain_ops["MultiHeadAttention"] == 0 and plain_ops["Softmax"] == counts[graph][1], plain_ops
    for a, b in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

