"""Outlier exposure (python -m edge_quq_export.train --outlier-exposure N): the generated pool and the fine-tune."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")


def test_pool_is_seeded_uint8_and_never_blank():
    from edge_quq_export.outlier_exposure import outlier_pool

    a = outlier_pool(120)
    assert a.shape == (120, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, outlier_pool(120))
    assert not np.array_equal(a, outlier_pool(120, seed=1))
    assert (a.reshape(120, -1).max(1) > 0).all()  # an all-black outlier would teach "black is no class"
    assert len({img.tobytes() for img in a}) == 120


def test_pool_shares_no_image_with_the_suites_drawn_digits():
    """The suite's digits set (OpenCV Hershey fonts) stays held out: the pool draws only TrueType glyphs."""
    import edge_quq_export.outlier_exposure as oe

    assert all(p.suffix == ".ttf" for p in oe.font_paths())
    assert len(oe.font_paths()) >= 10
    source = open(oe.__file__, encoding="utf-8").read()
    assert "putText" not in source and "HERSHEY" not in source


def test_finetune_freezes_batchnorm_and_moves_the_head_for_outliers():
    pytest.importorskip("tensorflow")
    import keras

    from edge_quq_export.model import compile_for_paper, tiny_cnn
    from edge_quq_export.outlier_exposure import OE_PER_BATCH, finetune, outlier_pool

    keras.utils.set_random_seed(0)
    model = tiny_cnn(hidden=16)
    compile_for_paper(model, 1e-3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (256, 28, 28, 1)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 256)]
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    before_bn = [w.copy() for layer in bn for w in layer.get_weights()]
    before = [w.copy() for w in model.get_weights()]
    record = finetune(model, x, y, epochs=1, validation=(x[:32], y[:32]), verbose=0)
    assert record["epochs"] == 1 and record["batchnorm"] == "frozen" and len(record["val_accuracy"]) == 1
    assert str(2 * OE_PER_BATCH) in record["outliers"]  # two steps of 128, one pool slot per step
    after_bn = [w for layer in bn for w in layer.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(before_bn, after_bn))
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.predict(outlier_pool(8)[..., None] / 255.0, verbose=0).shape == (8, 10)


def test_train_command_lists_the_option():
    from click.testing import CliRunner

    from edge_quq_export.train import train_cmd

    out = CliRunner().invoke(train_cmd, ["--help"]).output
    assert "--outlier-exposure" in out
    bad = CliRunner().invoke(train_cmd, ["--out", "x", "--outlier-exposure", "-1"])
    assert bad.exit_code == 2 and "outlier-exposure" in bad.output


def test_training_record_names_the_command_that_made_the_model():
    from pathlib import Path
    from types import SimpleNamespace

    from edge_quq_export.train import _command_line, train_cmd

    args = {p.name: p.default for p in train_cmd.params}
    args.update(out=Path("b"), from_model=Path("m.keras"), keep_model=Path("oe.keras"), outlier_exposure=3, fit_temperature=True)
    line = _command_line(SimpleNamespace(**args))
    assert line == ("python -m edge_quq_export.train --out b --keep-model oe.keras --from-model m.keras --outlier-exposure 3 "
                    "--fit-temperature")


def test_finetune_repeats_exactly_for_a_seed():
    """Two fine-tunes of the same tiny model with the same seed end with identical weights (the pool, the
    augmentation and the op-deterministic kernels). The full-size run did not repeat (docs/export.md,
    "Run-to-run spread"), so this bounds where that comes from: not from this module's seeding."""
    pytest.importorskip("tensorflow")
    import keras

    from edge_quq_export.model import compile_for_paper, tiny_cnn
    from edge_quq_export.outlier_exposure import finetune

    def once() -> np.ndarray:
        keras.utils.set_random_seed(0)
        model = tiny_cnn(hidden=16)
        compile_for_paper(model, 1e-3)
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (300, 28, 28, 1)).astype(np.float32)
        finetune(model, x, np.eye(10, dtype=np.float32)[rng.integers(0, 10, 300)], epochs=1, verbose=0)
        return np.concatenate([w.ravel() for w in model.get_weights()])

    assert np.array_equal(once(), once())


def test_finetune_of_a_loaded_model_repeats_exactly(tmp_path):
    """The full-size recipe fine-tunes a model loaded from a file (--from-model), whose Dropout layers took
    their seeds from an unseeded generator when load_model built them: without reseed_layers two fine-tunes of
    the same file gave different weights (the run-to-run spread of docs/export.md)."""
    pytest.importorskip("tensorflow")
    import keras

    from edge_quq_export.model import compile_for_paper, tiny_cnn
    from edge_quq_export.outlier_exposure import finetune

    keras.utils.set_random_seed(0)
    model = tiny_cnn(hidden=16)
    compile_for_paper(model, 1e-3)
    model.save(tmp_path / "tiny.keras")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (300, 28, 28, 1)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 300)]

    def once() -> np.ndarray:
        loaded = keras.models.load_model(tmp_path / "tiny.keras")
        finetune(loaded, x, y, epochs=1, verbose=0)
        return np.concatenate([w.ravel() for w in loaded.get_weights()])

    assert np.array_equal(once(), once())
