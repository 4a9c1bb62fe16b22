"""The reference architecture: a small CNN backbone and the seed paper's droppable head.

Head (arXiv 2403.01076): global pooling -> BatchNorm -> Dropout(0.2) -> Dense(300, relu) -> Dropout(0.4) ->
Dense(C, sigmoid), trained with binary cross-entropy on one-hot labels. Per-class sigmoids let every class be
absent, which the decision rule needs to say "none of these".
"""
from __future__ import annotations

from typing import Sequence, Tuple


def paper_head(x, num_classes: int, hidden: int = 300, rates: Tuple[float, float] = (0.2, 0.4), activation: str = "sigmoid"):
    """Append BN -> Dropout -> Dense+ReLU -> Dropout -> Dense(activation) to pooled features `x`."""
    import keras

    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dropout(rates[0], name="head_dropout0")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="head_dense0")(x)
    x = keras.layers.Dropout(rates[1], name="head_dropout1")(x)
    return keras.layers.Dense(num_classes, activation=activation, name="head_out")(x)


def small_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, filters: Sequence[int] = (24, 48, 64),
              hidden: int = 300, rates: Tuple[float, float] = (0.2, 0.4), activation: str = "sigmoid"):
    """conv blocks (conv-BN-relu x2, pool between blocks) -> global average pooling -> paper head.

    Global pooling instead of Flatten keeps the feature vector small (F = last filter count), which is what
    the MC head samples over; BN inside the conv blocks keeps the int8 activation ranges well behaved.
    """
    import keras

    inp = keras.Input(tuple(input_shape), name="image")
    x = inp
    for i, f in enumerate(filters):
        if i:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
        for j in range(2):
            x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i}_{j}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}_{j}")(x)
            x = keras.layers.ReLU(name=f"relu{i}_{j}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = paper_head(x, num_classes, hidden, rates, activation)
    return keras.Model(inp, out, name="edge_quq_reference")


def tiny_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, hidden: int = 32):
    """The test suite's model: two small strided convs, Flatten (F = 144) and the paper head.

    Flatten rather than global pooling because two convolutions this small lose too much when averaged
    (about 30% accuracy after a few seconds of training instead of about 75%).
    """
    import keras

    inp = keras.Input(tuple(input_shape), name="image")
    x = keras.layers.Conv2D(8, 5, strides=2, activation="relu", name="conv0")(inp)
    x = keras.layers.Conv2D(16, 5, strides=3, activation="relu", name="conv1")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    out = paper_head(x, num_classes, hidden)
    return keras.Model(inp, out, name="edge_quq_tiny")


def compile_for_paper(model, learning_rate: float = 1e-3) -> None:
    """Adam + binary cross-entropy on one-hot labels (the paper's per-class sigmoid training)."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.CategoricalAccuracy(name="acc")])
