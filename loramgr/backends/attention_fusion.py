"""Fuse the exported attention core into ``com.microsoft.MultiHeadAttention``, weights untouched.

torch's exporter writes ``scaled_dot_product_attention`` as a dozen nodes per attention:
the Q/K/V projections, head-split reshapes and transposes, a ``MatMul`` of Q and K^T, a
``Softmax`` over a (batch, heads, tokens, tokens) tensor, a second ``MatMul`` with V and
the head merge. At 512 px the self-attention of the 64x64 latent has 4096 tokens, so that
score tensor is 1 GiB at batch 2 and is written, read and written again. ONNX Runtime's
``MultiHeadAttention`` contrib op computes the same thing from the projected Q, K and V
without materializing it (flash attention on CPU and CUDA).

The rewrite replaces only the core between the projections and the head merge. The
projections (``to_q``, ``to_k``, ``to_v``, ``to_out``) keep their ``MatMul`` nodes and
their initializer names, so every weight stays injectable and hot-swappable, and a
``.lora`` names the same tensors with or without the fusion. The graph is rewritten in
memory when a session is created; the base on disk is never changed (TensorRT reads the
same files and has no such op). docs/benchmarks.md has what it gains.

The pattern is the one torch.onnx (TorchScript) writes for diffusers' ``AttnProcessor2_0``
with the default scale; anything else is left as it is, so a graph with no match is
simply not fused.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

__all__ = ["fuse_attention"]

MS_DOMAIN = "com.microsoft"


@dataclass
class _Graph:
    """Producer and consumer indexes of one ``GraphProto``."""

    graph: onnx.GraphProto

    def __post_init__(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def constant(self, name: str):
        node = self.node(name, "Constant")
        if node is None or len(node.attribute) != 1 or node.attribute[0].name != "value":
            return None
        return numpy_helper.to_array(node.attribute[0].t)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _heads_input(g: _Graph, name: str, perm: list[int]) -> tuple[str, str] | None:
    """For ``Transpose(perm)(Reshape(x, shape))``: (x, shape), else None."""
    transpose = g.node(name, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != perm:
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    return (reshape.input[0], reshape.input[1]) if reshape is not None else None


def _scaled(g: _Graph, name: str) -> tuple[str, str] | None:
    """For ``Mul(x, s)`` (either order) where ``s`` comes from a ``Sqrt``: (x, s's input), else None."""
    mul = g.node(name, "Mul")
    if mul is None:
        return None
    for x, s in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        sqrt = g.node(s, "Sqrt")
        if sqrt is not None:
            return x, sqrt.input[0]
    return None


def _is_default_scale(g: _Graph, name: str, query_heads: str) -> bool:
    """True when ``name`` is ``1 / sqrt(head_dim)`` of ``query_heads`` (SDPA's default scale).

    The exporter writes ``Cast(Div(1.0, Sqrt(Cast(Slice(Shape(q))))))``; each factor of the
    score is then multiplied by its square root.
    """
    cast = g.node(name, "Cast")
    div = g.node(cast.input[0], "Div") if cast is not None else None
    if div is None:
        return False
    one = g.constant(div.input[0])
    sqrt = g.node(div.input[1], "Sqrt")
    inner = g.node(sqrt.input[0], "Cast") if sqrt is not None else None
    sliced = g.node(inner.input[0], "Slice") if inner is not None else None
    shape = g.node(sliced.input[0], "Shape") if sliced is not None else None
    if one is None or one.size != 1 or float(one.reshape(())) != 1.0 or shape is None:
        return False
    starts = g.constant(sliced.input[1])
    return shape.input[0] == query_heads and starts is not None and starts.reshape(-1).tolist() == [-1]


def _num_heads(g: _Graph, shape: str) -> int | None:
    """The head count of a ``Reshape`` to (batch, tokens, heads, head_dim), from its ``Concat``."""
    concat = g.node(shape, "Concat")
    if concat is None or len(concat.input) != 4:
        return None
    unsqueeze = g.node(concat.input[2], "Unsqueeze")  # Unsqueeze(Constant) or a folded Constant
    value = g.constant(unsqueeze.input[0] if unsqueeze is not None else concat.input[2])
    return int(value.reshape(())) if value is not None and value.size == 1 and int(value.reshape(())) > 0 else None


def _match(g: _Graph, softmax: onnx.NodeProto) -> tuple[list[str], int, onnx.NodeProto] | None:
    """(q, k, v inputs, head count, the head-merge ``Reshape`` to replace) for one attention, else None."""
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scores = g.node(softmax.input[0], "MatMul")
    weighted = g.only_consumer(softmax.output[0], "MatMul")
    if scores is None or weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    q_side, k_side = _scaled(g, scores.input[0]), _scaled(g, scores.input[1])
    if q_side is None or k_side is None or q_side[1] != k_side[1]:
        return None
    q, k, v = (_heads_input(g, q_side[0], [0, 2, 1, 3]), _heads_input(g, k_side[0], [0, 2, 3, 1]),
               _heads_input(g, weighted.input[1], [0, 2, 1, 3]))
    if q is None or k is None or v is None or not _is_default_scale(g, q_side[1], q_side[0]):
        return None
    heads = {_num_heads(g, shape) for _, shape in (q, k, v)}
    merge_t = g.only_consumer(weighted.output[0], "Transpose")
    if len(heads) != 1 or None in heads or merge_t is None or list(_attr(merge_t, "perm", [])) != [0, 2, 1, 3]:
        return None
    merge = g.only_consumer(merge_t.output[0], "Reshape")
    return ([q[0], k[0], v[0]], heads.pop(), merge) if merge is not None else None


def _names_read(node: onnx.NodeProto) -> set[str]:
    """The values ``node`` reads: its inputs and, for control flow, what its subgraphs read from outside."""
    names = {i for i in node.input if i}
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else
                    attribute.graphs if attribute.type == onnx.AttributeProto.GRAPHS else []):
            for inner in sub.node:
                names |= _names_read(inner)
    return names


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs reach a graph output (the unfused core)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= _names_read(node)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matching attention core of ``model`` in place; returns how many were fused."""
    graph = model.graph
    g = _Graph(graph)
    replacements: dict[int, onnx.NodeProto] = {}
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        found = _match(g, softmax)
        if found is None:
            continue
        inputs, heads, merge = found
        fused = onnx.helper.make_node("MultiHeadAttention", inputs, [merge.output[0]], name=f"{softmax.name}/mha",
                                      domain=MS_DOMAIN, num_heads=heads)
        replacements[id(merge)] = fused
    if not replacements:
        return 0
    nodes = [replacements.get(id(n), n) for n in graph.node]  # same position: its inputs come earlier
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_dead_nodes(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return len(replacements)
