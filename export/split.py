"""Find where a Keras classifier splits into a static backbone and a droppable head, and pull the head out.

The split is the input of the first head Dropout: everything before it (BatchNorm included) runs once per
image as an int8 model; everything after it is a chain of `Dropout? -> Dense -> activation` blocks that the
runtime resamples with MC dropout. The head is extracted as plain float32 matrices, so the runtime and the
exported head models can be checked against the numpy reference in edge_quq.head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from edge_quq.bundle import HeadLayer
from edge_quq.errors import ExportError
from edge_quq.head import HeadWeights

OUTPUT_ACTIVATIONS = ("sigmoid", "softmax", "linear")
NO_DROPOUT_HINT = "pass --dropout with one rate per dense layer, e.g. --dropout 0.2,0.4"


@dataclass
class HeadBlock:
    name: str  # key prefix in head.npz
    dropout: float
    kernel: np.ndarray  # [in, out] float32
    bias: np.ndarray  # [out] float32
    activation: str
    keras_layers: List[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        return int(self.kernel.shape[1])


@dataclass
class Split:
    split_layer: str
    backbone: Any  # keras.Model: model input -> features [N, F]
    blocks: List[HeadBlock]
    head_layers: List[str]
    dropout_from_option: bool = False

    @property
    def feature_size(self) -> int:
        return int(self.blocks[0].kernel.shape[0])

    @property
    def num_classes(self) -> int:
        return self.blocks[-1].units

    @property
    def activation(self) -> str:
        return self.blocks[-1].activation

    def head_weights(self) -> HeadWeights:
        return HeadWeights(kernels=tuple(b.kernel for b in self.blocks), biases=tuple(b.bias for b in self.blocks),
                           rates=tuple(b.dropout for b in self.blocks), activation=self.activation)

    def layer_specs(self) -> Tuple[HeadLayer, ...]:
        """The manifest's head.layers."""
        return tuple(HeadLayer(name=b.name, dropout=float(b.dropout), units=b.units, activation=b.activation) for b in self.blocks)


def _kind(layer) -> str:
    import keras

    L = keras.layers
    if isinstance(layer, L.Dropout):
        return "dropout"
    if isinstance(layer, L.Dense):
        return "dense"
    if isinstance(layer, (L.Activation, L.ReLU, L.Softmax)):
        return "activation"
    return "other"


def _activation_name(layer) -> str:
    import keras

    if isinstance(layer, keras.layers.ReLU):
        cfg = layer.get_config()
        if cfg.get("max_value") is not None or float(cfg.get("negative_slope", 0.0)) != 0.0 or float(cfg.get("threshold", 0.0)) != 0.0:
            return f"relu(custom: {cfg})"
        return "relu"
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    fn = layer.activation
    name = getattr(fn, "__name__", None) or str(fn)
    return {"relu": "relu", "sigmoid": "sigmoid", "softmax": "softmax", "linear": "linear"}.get(name, name)


def _describe(layers: Sequence) -> str:
    return ", ".join(f"{l.name} ({type(l).__name__})" for l in layers)


def _check_chain(model, head: Sequence) -> None:
    """The head must be a straight line ending at the model's output: no branches, no shared layers."""
    prev = None
    for layer in head:
        try:
            inp = layer.input
        except (AttributeError, ValueError) as e:
            raise ExportError(f"head layer {layer.name!r} is used more than once or has no single input ({e})") from None
        if isinstance(inp, (list, tuple)):
            raise ExportError(f"head layer {layer.name!r} takes several inputs; the head must be a single chain")
        if prev is not None and inp is not prev.output:
            raise ExportError(f"head layer {layer.name!r} does not take the output of {prev.name!r}; the head must be a single chain")
        prev = layer
    outs = model.outputs
    if len(outs) != 1 or outs[0] is not head[-1].output:
        raise ExportError(f"the model's output is not produced by the last head layer {head[-1].name!r}")


def find_split(model, split_layer: Optional[str] = None, dropout: Optional[Sequence[float]] = None) -> Split:
    """Locate the split and extract the head.

    Automatic: the trailing run of Dropout/Dense/Activation layers is the head; the split is its first
    Dropout. A head with no Dropout at all is accepted only when `dropout` gives the rates explicitly (MC
    dropout on a head trained without dropout is a user decision, not something to guess). `dropout`, when
    given, overrides the model's rates block by block.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise ExportError(f"expected a Keras model, got {type(model).__name__}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(f"the model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; exactly one of each is supported")
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    if not layers:
        raise ExportError("the model has no layers")
    head = _named_head(layers, split_layer) if split_layer is not None else _trailing_head(layers, dropout)
    _check_chain(model, head)
    blocks = _blocks(head)
    from_option = dropout is not None
    if from_option:
        _override_rates(blocks, dropout)
    if all(b.dropout == 0.0 for b in blocks):
        raise ExportError(f"every head dropout rate is 0, so MC dropout would return one value; {NO_DROPOUT_HINT}")

    split_at = head[0]
    backbone = keras.Model(model.inputs, split_at.input, name="backbone")
    out_shape = tuple(backbone.outputs[0].shape)
    if len(out_shape) != 2 or out_shape[1] != blocks[0].kernel.shape[0]:
        raise ExportError(f"the backbone output at {split_at.name!r} has shape {out_shape}; the head needs flat features "
                          f"[N, {blocks[0].kernel.shape[0]}] (add global pooling or Flatten before the head)")
    return Split(split_layer=split_at.name, backbone=backbone, blocks=blocks, head_layers=[l.name for l in head],
                 dropout_from_option=from_option)


def _named_head(layers: Sequence, split_layer: str) -> List:
    names = [l.name for l in layers]
    if split_layer not in names:
        tail = ", ".join(names[-8:])
        raise ExportError(f"split layer {split_layer!r} does not exist in the model (last layers: {tail})")
    head = list(layers[names.index(split_layer):])
    bad = [l for l in head if _kind(l) == "other"]
    if bad:
        raise ExportError(f"layers after split layer {split_layer!r} must be Dropout/Dense/Activation only; found {_describe(bad)}")
    return head


def _trailing_head(layers: Sequence, dropout: Optional[Sequence[float]]) -> List:
    start = len(layers)
    while start > 0 and _kind(layers[start - 1]) != "other":
        start -= 1
    head = list(layers[start:])
    if not any(_kind(l) == "dense" for l in head):
        raise ExportError(
            "the model does not end in a Dense classification head (expected global pooling -> BatchNorm -> "
            f"Dropout -> Dense ... ; last layers: {_describe(layers[-4:])})"
        )
    first_drop = next((i for i, l in enumerate(head) if _kind(l) == "dropout"), None)
    first_dense = next(i for i, l in enumerate(head) if _kind(l) == "dense")
    if first_drop is not None and first_drop < first_dense:
        head = head[first_drop:]
    else:
        # No dropout in front of the first Dense: split at that Dense. Rates come from later Dropouts,
        # or from the option when there are none at all.
        head = head[first_dense:]
    if not any(_kind(l) == "dropout" for l in head) and dropout is None:
        raise ExportError(f"the model's head ({_describe(head)}) has no Dropout layer, so MC dropout has no rates; {NO_DROPOUT_HINT}")
    return head


def _blocks(head: Sequence) -> List[HeadBlock]:
    """`Dropout? -> Dense -> Activation?` blocks of a checked chain, as float32 matrices."""
    blocks: List[HeadBlock] = []
    pending: Optional[float] = None
    for layer in head:
        kind = _kind(layer)
        if kind == "dropout":
            if pending is not None:
                raise ExportError(f"two Dropout layers in a row in the head (at {layer.name!r}); merge them into one")
            pending = float(layer.rate)
        elif kind == "dense":
            w = layer.get_weights()
            kernel = np.asarray(w[0], dtype=np.float32)
            bias = np.asarray(w[1], dtype=np.float32) if len(w) > 1 else np.zeros(kernel.shape[1], np.float32)
            blocks.append(HeadBlock(name=f"dense{len(blocks)}", dropout=pending or 0.0, kernel=np.ascontiguousarray(kernel),
                                    bias=bias, activation=_activation_name(layer), keras_layers=[layer.name]))
            pending = None
        elif kind == "activation":
            if not blocks or pending is not None:
                raise ExportError(f"activation layer {layer.name!r} does not directly follow a Dense layer")
            if blocks[-1].activation != "linear":
                raise ExportError(f"activation layer {layer.name!r} follows Dense {blocks[-1].keras_layers[0]!r} which already applies {blocks[-1].activation}")
            blocks[-1].activation = _activation_name(layer)
            blocks[-1].keras_layers.append(layer.name)
        else:
            raise ExportError(f"layer {layer.name!r} ({type(layer).__name__}) cannot be part of the head")
    if pending is not None:
        raise ExportError(f"the head ends in a Dropout layer ({head[-1].name!r}); the last head layer must be the output Dense")
    if not blocks:
        raise ExportError(f"no Dense layer after split layer {head[0].name!r}")
    for b in blocks[:-1]:
        if b.activation != "relu":
            raise ExportError(f"hidden head layer {b.keras_layers[0]!r} uses activation {b.activation!r}; only relu is supported")
    if blocks[-1].activation not in OUTPUT_ACTIVATIONS:
        raise ExportError(f"output layer {blocks[-1].keras_layers[0]!r} uses activation {blocks[-1].activation!r}; expected sigmoid, softmax or linear")
    return blocks


def _override_rates(blocks: List[HeadBlock], dropout: Sequence[float]) -> None:
    rates = [float(r) for r in dropout]
    if len(rates) != len(blocks):
        raise ExportError(f"--dropout gives {len(rates)} rates but the head has {len(blocks)} dense layers ({', '.join(b.keras_layers[0] for b in blocks)})")
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ExportError(f"--dropout rates must be in [0, 1), got {rates}")
    for b, r in zip(blocks, rates):
        b.dropout = r
