"""Reading a float ONNX classifier: where the head starts, and the head's exact weights as a HeadWeights.

The head is the graph after the split tensor: blocks of `[Dropout] [BatchNorm] Gemm|MatMul(+Add) [BatchNorm]
activation`, with Flatten, Reshape and Identity allowed anywhere, and Softmax, Sigmoid or nothing at the
output. A BatchNorm is folded into its neighbouring dense layer exactly (BN(x) = s*x + t is affine, and
dropout(x) keeps the affine form on either side of the mask). Hidden activations are recognised by what they
compute, not by how an exporter spelled them (ReLU, HardSwish, Sigmoid*Mul, the erf form of GELU or the Gelu
op): the elementwise subgraph is run by ONNX Runtime on probe values and compared with
edge_quq.head.hidden_activation. Anything else raises ExportError naming the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_quq.bundle import HIDDEN_ACTIVATIONS
from edge_quq.errors import ExportError
from edge_quq.head import HeadWeights, hidden_activation, sigmoid

# Ops a head may pass through unchanged (on [N, F] rows): data goes in on input 0.
_PASS = ("Identity", "Flatten", "Reshape", "Dropout")
# Ops that may make up an activation subgraph (evaluated on probes, so any spelling of a known function works).
_ELEMENTWISE = ("Relu", "HardSwish", "HardSigmoid", "Sigmoid", "Mul", "Div", "Add", "Sub", "Erf", "Tanh", "Pow",
                "Clip", "Gelu", "Max", "Min", "Neg", "Sqrt", "Exp", "LeakyRelu", "Elu", "Selu", "Softplus")
# Ops that mark the graph before the split as a backbone (a Dropout after all of them can start the head).
_BACKBONE_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                 "ReduceMean", "ReduceMax", "Concat", "Attention", "LayerNormalization")
_PROBE = np.concatenate([np.linspace(-8.0, 8.0, 321), [-0.0, 1e-3, -1e-3]]).astype(np.float32)


def label(node) -> str:
    """How error lines name a node: its name, or its op and first output when the exporter left it unnamed."""
    return f"{node.name!r} ({node.op_type})" if node.name else f"{node.op_type} -> {node.output[0]!r}"


class Graph:
    """Producers, consumers and constant values of a model's main graph (nodes are in topological order)."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.consts: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in self.nodes:  # topological order: an Identity of a constant (TorchScript's shared weights) is one too
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            elif n.op_type == "Identity" and n.input[0] in self.consts:
                self.consts[n.output[0]] = self.consts[n.input[0]]
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: Dict[str, List] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.output = g.output[0].name
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def data_inputs(self, node) -> List[str]:
        return [i for i in node.input if i and i not in self.consts]

    def const(self, name: str, node) -> np.ndarray:
        if name not in self.consts:
            raise ExportError(f"head node {label(node)}: input {name!r} is not a constant (weights must be initializers)")
        return np.asarray(self.consts[name])

    def node(self, name: str):
        for n in self.nodes:
            if n.name == name:
                return n
        raise ExportError(f"--split-node {name!r}: no node of that name in the model")

    def downstream(self, tensor: str) -> List:
        """Every node reachable from `tensor`."""
        seen, todo, out = set(), [tensor], []
        while todo:
            for n in self.consumers.get(todo.pop(), []):
                if id(n) not in seen:
                    seen.add(id(n))
                    out.append(n)
                    todo.extend(n.output)
        return out


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_split(g: Graph, split_node: Optional[str], dropout: Optional[Sequence[float]]) -> Tuple[str, str]:
    """(split tensor, how it was found): the input of --split-node, of the head's first Dropout, or of the
    k-th last dense layer when the head has no Dropout (k = the number of --dropout rates, 1 or 2)."""
    if split_node is not None:
        n = g.node(split_node)
        data = g.data_inputs(n)
        if not data:
            raise ExportError(f"--split-node {split_node!r} has no data input")
        return data[0], f"node {split_node!r} (option --split-node)"
    for n in g.nodes:
        if n.op_type == "Dropout" and not any(d.op_type in _BACKBONE_OPS for d in g.downstream(n.output[0])):
            return n.input[0], f"first Dropout of the head {label(n)}"
    dense = [n for n in g.nodes if n.op_type in ("Gemm", "MatMul") and len(g.data_inputs(n)) == 1]
    if not dense:
        raise ExportError("no Linear head found: the model has no Gemm or MatMul layer with constant weights")
    if dropout is None:
        raise ExportError("the model's head has no Dropout: give the rates with --dropout (one per head dense layer, "
                          "e.g. --dropout 0.5 for the last layer or --dropout 0.2,0.5 for the last two)")
    if len(dropout) not in (1, 2) or len(dropout) > len(dense):
        raise ExportError(f"--dropout gives {len(dropout)} rates; without Dropout in the model the head is the last 1 or 2 "
                          f"dense layers (the model has {len(dense)})")
    first = dense[-len(dropout)]
    return g.data_inputs(first)[0], f"before the last {len(dropout)} dense layer(s), from {label(first)} (no Dropout in the model)"


@dataclass
class _Builder:
    kernels: List[np.ndarray]
    biases: List[np.ndarray]
    rates: List[float]
    hidden: List[str]
    names: List[str]
    rate: float = 0.0
    affine: Optional[Tuple[np.ndarray, np.ndarray]] = None  # BatchNorm waiting on the next dense layer's input
    need_act: bool = False  # a dense layer was just added: an activation (or the output) comes next
    softmax: bool = False


def parse_head(g: Graph, split: str, dropout: Optional[Sequence[float]]) -> Tuple[HeadWeights, List[str]]:
    """The head from `split` to the graph output, as HeadWeights, and the ONNX node names it covers."""
    b = _Builder([], [], [], [], [])
    h, output_act, covered = split, "linear", []
    while h != g.output:
        cons = g.consumers.get(h, [])
        if not cons:
            raise ExportError(f"tensor {h!r} in the head leads nowhere (the model's output is {g.output!r})")
        n = cons[0]
        if len(cons) == 1 and n.op_type not in _ELEMENTWISE:
            h = _structural(g, n, b)
            covered.append(n.name or n.output[0])
            continue
        region, out = _elementwise_region(g, h)
        covered += [r.name or r.output[0] for r in region]
        kind = _classify(g, region, h, out)
        final = _leads_to_output(g, out)
        if not b.need_act:
            raise ExportError(f"head node {label(region[0])} computes {kind or 'an unknown function'} where the head "
                              "expects a dense layer (activations must follow a Gemm/MatMul)")
        if final and kind in ("sigmoid", "linear"):
            output_act, h = kind, g.output
            break
        if kind not in HIDDEN_ACTIVATIONS:
            raise ExportError(f"head node {label(region[0])} is not supported in a head: it computes "
                              f"{kind or 'a function that is not relu, hardswish, silu, gelu or (at the output) sigmoid'}")
        b.hidden.append(kind)
        b.need_act = False
        h = out
    if not b.kernels:
        raise ExportError(f"no Linear head found after {split!r}: no Gemm or MatMul between the split and the output")
    if b.softmax:
        output_act = "softmax"
    elif not b.need_act and output_act == "linear":
        raise ExportError(f"the head ends in a {b.hidden[-1]} activation; the output must be a dense layer, then softmax, sigmoid or nothing")
    rates = list(dropout) if dropout is not None else b.rates
    if len(rates) != len(b.kernels):
        raise ExportError(f"--dropout gives {len(rates)} rates but the head has {len(b.kernels)} dense layers")
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ExportError(f"dropout rates must be in [0, 1), got {list(rates)}")
    if not any(rates):  # as for Keras models: MC dropout with no dropout is a user mistake, not a default
        raise ExportError("every head dropout rate is 0; give the rates with --dropout")
    head = HeadWeights(kernels=tuple(b.kernels), biases=tuple(b.biases), rates=tuple(float(r) for r in rates),
                       activation=output_act, hidden=tuple(b.hidden))
    return head, covered


def _structural(g: Graph, n, b: _Builder) -> str:
    """Apply one non-elementwise head node to the builder; returns the tensor after it."""
    op = n.op_type
    if op == "Softmax":
        axis = _attr(n, "axis", -1 if g.opset >= 13 else 1)
        if not b.need_act or axis not in (-1, 1) or not _leads_to_output(g, n.output[0]):
            raise ExportError(f"head node {label(n)}: Softmax must come last, over the class axis, right after a dense layer")
        b.softmax, b.need_act = True, False
        return g.output
    if op in _PASS:
        if op == "Dropout":
            if b.need_act:
                raise ExportError(f"head node {label(n)}: a Dropout right after a dense layer, with no activation between")
            b.rate = _dropout_rate(g, n)
        return n.output[0]
    if op == "BatchNormalization":
        return _batchnorm(g, n, b)
    if op in ("Gemm", "MatMul"):
        return _dense(g, n, b)
    raise ExportError(f"head node {label(n)} is not supported in a head (supported: Dropout, Gemm, MatMul+Add, "
                      "BatchNormalization, Flatten, Reshape, relu/hardswish/silu/gelu, softmax or sigmoid at the output)")


def _dropout_rate(g: Graph, n) -> float:
    # Rates are stored as float32 in the graph: rounded so that 0.2 is recorded as 0.2, not 0.20000000298.
    if len(n.input) > 1 and n.input[1]:
        return round(float(g.const(n.input[1], n).reshape(-1)[0]), 6)
    return round(float(_attr(n, "ratio", 0.5)), 6)


def _batchnorm(g: Graph, n, b: _Builder) -> str:
    gamma, beta, mean, var = (g.const(i, n).astype(np.float64) for i in n.input[1:5])
    s = gamma / np.sqrt(var + float(_attr(n, "epsilon", 1e-5)))
    t = beta - mean * s
    if b.need_act:  # after the dense layer: scale its columns
        b.kernels[-1] = (b.kernels[-1] * s).astype(np.float32)
        b.biases[-1] = (b.biases[-1] * s + t).astype(np.float32)
    elif b.affine is None:
        b.affine = (s, t)
    else:
        s0, t0 = b.affine
        b.affine = (s0 * s, t0 * s + t)
    return n.output[0]


def _dense(g: Graph, n, b: _Builder) -> str:
    if b.need_act:
        raise ExportError(f"head node {label(n)}: two dense layers with no activation between them")
    data = g.data_inputs(n)
    if len(data) != 1:
        raise ExportError(f"head node {label(n)}: a dense layer needs constant weights")
    if n.op_type == "Gemm":
        if n.input[0] != data[0] or _attr(n, "transA", 0):
            raise ExportError(f"head node {label(n)}: Gemm must take the features as input A, not transposed")
        w = g.const(n.input[1], n).astype(np.float64)
        k = (w.T if _attr(n, "transB", 0) else w) * float(_attr(n, "alpha", 1.0))
        bias = g.const(n.input[2], n).astype(np.float64) * float(_attr(n, "beta", 1.0)) if len(n.input) > 2 and n.input[2] else 0.0
        out = n.output[0]
    else:
        k = g.const(n.input[1] if n.input[0] == data[0] else n.input[0], n).astype(np.float64)
        if n.input[0] != data[0] or k.ndim != 2:
            raise ExportError(f"head node {label(n)}: MatMul must be features @ a 2-D weight")
        bias, out = _bias_add(g, n.output[0], k.shape[1])
    bias = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1) if np.ndim(bias) else bias, (k.shape[1],))
    if b.affine is not None:  # W^T (s*x + t) + c = (diag(s) W)^T x + (W^T t + c)
        s, t = b.affine
        bias = bias + t @ k
        k = s[:, None] * k
        b.affine = None
    b.kernels.append(np.ascontiguousarray(k, np.float32))
    b.biases.append(np.ascontiguousarray(bias, np.float32))
    b.rates.append(b.rate)
    b.names.append(n.name or n.output[0])
    b.rate, b.need_act = 0.0, True
    return out


def _bias_add(g: Graph, mm_out: str, units: int) -> Tuple[np.ndarray, str]:
    """The constant Add right after a MatMul (a Linear's bias), or zeros when there is none."""
    cons = g.consumers.get(mm_out, [])
    if len(cons) == 1 and cons[0].op_type == "Add":
        a = cons[0]
        other = [i for i in a.input if i != mm_out]
        if len(other) == 1 and other[0] in g.consts and g.consts[other[0]].size in (1, units):
            return np.asarray(g.consts[other[0]], np.float64).reshape(-1), a.output[0]
    return np.zeros(units), mm_out


def _leads_to_output(g: Graph, t: str) -> bool:
    """`t` is the graph output, or reaches it through Identity nodes only."""
    while t != g.output:
        cons = g.consumers.get(t, [])
        if len(cons) != 1 or cons[0].op_type != "Identity":
            return False
        t = cons[0].output[0]
    return True


def _elementwise_region(g: Graph, h: str) -> Tuple[List, str]:
    """The elementwise nodes fed only by `h` (and constants), and the one tensor that leaves them."""
    inside, region = {h}, []
    for n in g.nodes:
        if n.op_type in _ELEMENTWISE and any(i in inside for i in n.input) and all(i in inside or i in g.consts or not i for i in n.input):
            region.append(n)
            inside.update(n.output)
    if not region:
        n = g.consumers[h][0]
        raise ExportError(f"head node {label(n)} is not supported in a head (its input {h!r} also feeds other nodes)")
    produced = {o for n in region for o in n.output}
    region_ids = {id(n) for n in region}
    exits = [t for t in produced if t == g.output or any(id(c) not in region_ids for c in g.consumers.get(t, []))]
    if len(exits) != 1:
        raise ExportError(f"head node {label(region[0])}: the activation subgraph has {len(exits)} outputs, not one")
    return region, exits[0]


def _classify(g: Graph, region: List, h: str, out: str) -> Optional[str]:
    """Which known function the region computes (a HIDDEN_ACTIVATIONS name, 'sigmoid' or 'linear'), or None."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    needed = {i for n in region for i in n.input if i in g.consts}
    inits = [numpy_helper.from_array(np.asarray(g.consts[c]), c) for c in sorted(needed)]
    graph = helper.make_graph(list(region), "probe", [helper.make_tensor_value_info(h, TensorProto.FLOAT, [len(_PROBE)])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=list(g.model.opset_import))
    model.ir_version = g.model.ir_version
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = np.asarray(sess.run(None, {h: _PROBE})[0], np.float64)
    except Exception:  # noqa: BLE001  (per-channel constants or an op ORT lacks: not a plain activation)
        return None
    if y.shape != _PROBE.shape:
        return None
    x = _PROBE.astype(np.float64)
    candidates = {**{k: hidden_activation(x, k) for k in HIDDEN_ACTIVATIONS}, "sigmoid": sigmoid(x), "linear": x}
    for kind, ref in candidates.items():
        if np.all(np.abs(y - ref) <= 1e-5 * (1.0 + np.abs(ref))):
            return kind
    return None
