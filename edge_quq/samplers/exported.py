"""Samplers that run the bundle's exported head model (TFLite on XNNPACK, ONNX on MLAS).

The head model takes `features` [R, F] and one 0/1 keep mask per dropout block ([R, in_i]) and returns
probabilities (and logits) [R, C]. For each sample, T + 1 rows: the first has masks equal to the keep
probability (the eval-mode output), the next T are the MC samples, whose masks come from the shared stream
(draw_keep_masks), so these samplers see the numpy sampler's masks for the same seed. A batch of N samples
is one invoke of N * (T + 1) rows.

`TFLiteHeadModel` / `OnnxHeadModel` run a head model file on its own (export/parity.py uses them).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_quq.backends import default_threads, make_tflite_interpreter
from edge_quq.errors import BackendError, OptionError
from edge_quq.head import HeadWeights
from edge_quq.samplers.base import HeadMoments, Sampler, full_keep_masks, moments_from_probs

if TYPE_CHECKING:
    from edge_quq.bundle import Bundle

Outputs = Tuple[np.ndarray, Optional[np.ndarray]]


def _runtime_masks(rng: np.random.Generator, head: HeadWeights, n: int, t: int) -> List[np.ndarray]:
    """Masks for every block and n samples of 1 + t rows: row 0 of each sample has keep-probability 1-p
    (the model scales masks by 1/(1-p), so that row reproduces the eval-mode pass exactly)."""
    fans = [head.feature_size] + head.hidden_sizes
    per = [full_keep_masks(rng, head, t) for _ in range(n)]
    return [np.concatenate([np.concatenate([np.full((1, f), 1.0 - r, np.float32), p[b]]) for p in per])
            for b, (f, r) in enumerate(zip(fans, head.rates))]


def _match_inputs(names: List[str], mask_names: Sequence[str]) -> Dict[str, int]:
    """Map 'features' and the manifest's mask input names to positions, tolerating converter prefixes/suffixes."""
    found: Dict[str, int] = {}
    for w in ["features", *mask_names]:
        hits = [i for i, n in enumerate(names) if w in n]
        if len(hits) != 1:
            raise BackendError(f"head model inputs {names} do not name {w!r} exactly once")
        found[w] = hits[0]
    return found


def default_mask_names(blocks: int) -> Tuple[str, ...]:
    return tuple(f"mask{i}" for i in range(blocks))


def _check_temperature(head: HeadWeights, has_logits: bool, kind: str) -> None:
    """The exported head models bake in activation(logits) without the temperature; with a temperature the
    sampler needs their logits output to apply it, and refuses a model that lacks one."""
    if head.temperature != 1.0 and not has_logits:
        raise OptionError(f"sampler {kind!r} cannot apply the bundle's temperature {head.temperature:g}: the exported "
                          f"head model has no 'logits' output (re-export the bundle, or use --sampler numpy)")


class OnnxHeadModel:
    """An exported ONNX head model: run(features [R, F], masks) -> (probs, logits or None)."""

    def __init__(self, path: Path, mask_names: Sequence[str], threads: Optional[int] = None) -> None:
        try:
            import onnxruntime as ort  # type: ignore
        except ImportError as e:
            raise BackendError(f"onnxruntime is not installed ({e})") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._names = [i.name for i in self.session.get_inputs()]
        self._inputs = _match_inputs(self._names, mask_names)
        self._masks = list(mask_names)
        outs = [o.name for o in self.session.get_outputs()]
        self._probs = next((o for o in outs if "prob" in o), outs[-1])
        self._logits = next((o for o in outs if "logit" in o), None)
        self.has_logits = self._logits is not None

    def run(self, features: np.ndarray, masks: Sequence[np.ndarray]) -> Outputs:
        feed = {self._names[self._inputs["features"]]: np.asarray(features, np.float32)}
        for name, m in zip(self._masks, masks):
            feed[self._names[self._inputs[name]]] = np.asarray(m, np.float32)
        wanted = [self._probs] + ([self._logits] if self._logits else [])
        out = self.session.run(wanted, feed)
        return out[0], (out[1] if self._logits else None)


class TFLiteHeadModel:
    """An exported TFLite head model (XNNPACK): run(features [R, F], masks) -> (probs, logits or None)."""

    def __init__(self, path: Path, mask_names: Sequence[str], threads: Optional[int] = None) -> None:
        self.interp, self.runtime = make_tflite_interpreter(str(path), threads or default_threads(), True)
        self._inputs = _match_inputs([d["name"] for d in self.interp.get_input_details()], mask_names)
        self._masks = list(mask_names)
        self._rows = -1
        self.has_logits = any("logit" in o["name"] for o in self.interp.get_output_details())

    def _prepare(self, rows: int) -> None:
        if rows == self._rows:
            return
        for d in self.interp.get_input_details():
            self.interp.resize_tensor_input(d["index"], [rows, int(d["shape"][-1])])
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()
        outs = self.interp.get_output_details()
        self._probs = next((o for o in outs if "prob" in o["name"]), outs[-1])
        self._logits = next((o for o in outs if "logit" in o["name"]), None)
        self._rows = rows

    def run(self, features: np.ndarray, masks: Sequence[np.ndarray]) -> Outputs:
        self._prepare(features.shape[0])
        self.interp.set_tensor(self._in[self._inputs["features"]]["index"], np.ascontiguousarray(features, np.float32))
        for name, m in zip(self._masks, masks):
            self.interp.set_tensor(self._in[self._inputs[name]]["index"], np.ascontiguousarray(m, np.float32))
        self.interp.invoke()
        probs = self.interp.get_tensor(self._probs["index"])
        logits = self.interp.get_tensor(self._logits["index"]) if self._logits is not None else None
        return probs, logits


def _tempered(head: HeadWeights, probs: np.ndarray, logits: Optional[np.ndarray]) -> np.ndarray:
    """The model's own probabilities without a temperature; activation(logits / T) with one."""
    if head.temperature == 1.0 or logits is None:
        return probs
    return head.probs_from_logits(np.asarray(logits, np.float32)).astype(np.float32)


class _ExportedHeadSampler(Sampler):
    """Runs the bundle's exported head model of kind `name` (the bundle and threads are its own arguments)."""

    model_class: type = OnnxHeadModel
    same_stream = True

    def __init__(self, head: HeadWeights, seed: Optional[int] = None, *, bundle: "Optional[Bundle]" = None,
                 threads: Optional[int] = None, path: Optional[Path] = None) -> None:
        """The head model comes from the bundle's manifest, or from `path` (a model file exported for `head`)."""
        super().__init__(head, seed)
        names: Sequence[str] = default_mask_names(len(head.kernels))
        if path is None:
            file = getattr(bundle.head, self.name, None) if bundle is not None else None
            if not file:
                raise OptionError(f"sampler {self.name!r} needs a bundle with an exported {self.name.upper()} head")
            path, names = bundle.file(file), (bundle.head.mask_inputs or names)
        self.model = self.model_class(path, names, threads)
        _check_temperature(head, self.model.has_logits, self.name)

    def sample_rows(self, x: np.ndarray, num_iter: int) -> HeadMoments:
        n, t = len(x), num_iter
        masks = _runtime_masks(self.rng, self.head, n, t)
        probs, logits = self.model.run(np.repeat(x, t + 1, axis=0), masks)
        probs = _tempered(self.head, probs, logits).reshape(n, t + 1, -1)
        det = logits.reshape(n, t + 1, -1)[:, 0] if logits is not None else self.head.logits(x)
        return moments_from_probs(probs[:, 1:], self.head, det)


class OnnxHeadSampler(_ExportedHeadSampler):
    name = "onnx"
    model_class = OnnxHeadModel


class TFLiteHeadSampler(_ExportedHeadSampler):
    name = "tflite"
    model_class = TFLiteHeadModel
