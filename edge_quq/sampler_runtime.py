"""Samplers that run the bundle's exported head model (TFLite on XNNPACK, ONNX on MLAS).

The head model takes `features` [N, F] and one 0/1 keep mask per dropout block ([N, in_i]) and returns
probabilities [N, C]. One invoke carries T + 1 rows: row 0 has masks equal to the keep probability (the eval-mode output), rows
1..T are the MC samples, whose masks come from the same generator as the numpy sampler's, so both samplers
see identical masks for the same seed.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from edge_quq.backends import default_threads, make_tflite_interpreter
from edge_quq.errors import BackendError, OptionError
from edge_quq.head import HeadWeights
from edge_quq.sampler import SAMPLERS, HeadMoments, Sampler, draw_keep_masks, moments_from_samples


def _runtime_masks(rng: np.random.Generator, head: HeadWeights, t: int) -> List[np.ndarray]:
    """Masks for every block, with row 0 set to keep-probability 1-p: the model scales masks by 1/(1-p),
    so that row reproduces the eval-mode (no dropout) pass exactly."""
    masks = draw_keep_masks(rng, head, t)
    out = []
    fan_in = head.feature_size
    for m, k, rate in zip(masks, head.kernels, head.rates):
        if m is None:
            m = np.ones((t, fan_in), np.float32)
        out.append(np.concatenate([np.full((1, fan_in), 1.0 - rate, np.float32), m]))
        fan_in = k.shape[1]
    return out


def _match_inputs(names: List[str], count: int) -> Dict[str, int]:
    """Map 'features', 'mask0', 'mask1', ... to positions, tolerating converter prefixes/suffixes."""
    want = ["features"] + [f"mask{i}" for i in range(count - 1)]
    found: Dict[str, int] = {}
    for w in want:
        hits = [i for i, n in enumerate(names) if w in n]
        if len(hits) != 1:
            raise BackendError(f"head model inputs {names} do not name {w!r} exactly once")
        found[w] = hits[0]
    return found


def _check_temperature(head: HeadWeights, has_logits: bool, kind: str) -> None:
    """The exported head models bake in activation(logits) without the temperature; with a temperature the
    sampler needs their logits output to apply it, and refuses a model that lacks one."""
    if head.temperature != 1.0 and not has_logits:
        raise OptionError(f"sampler {kind!r} cannot apply the bundle's temperature {head.temperature:g}: the exported "
                          f"head model has no 'logits' output (re-export the bundle, or use --sampler numpy)")


def _tempered(head: HeadWeights, probs: np.ndarray, logits: Optional[np.ndarray]) -> np.ndarray:
    """The model's own probabilities without a temperature; activation(logits / T) with one."""
    if head.temperature == 1.0 or logits is None:
        return probs
    return head.probs_from_logits(np.asarray(logits, np.float32)).astype(np.float32)


class OnnxHeadSampler(Sampler):
    name = "onnx"

    def __init__(self, head: HeadWeights, seed: Optional[int] = None, bundle=None, threads: Optional[int] = None) -> None:
        super().__init__(head, seed, bundle, threads)
        if bundle is None or not bundle.head.onnx:
            raise OptionError("sampler 'onnx' needs a bundle with an exported ONNX head")
        try:
            import onnxruntime as ort  # type: ignore
        except ImportError as e:
            raise BackendError(f"onnxruntime is not installed ({e})") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        self.session = ort.InferenceSession(str(bundle.file(bundle.head.onnx)), sess_options=opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        self._inputs = _match_inputs(names, len(head.kernels) + 1)
        self._names = names
        outs = [o.name for o in self.session.get_outputs()]
        self._probs = next((o for o in outs if "prob" in o), outs[-1])
        self._logits = next((o for o in outs if "logit" in o), None)
        _check_temperature(head, self._logits is not None, "onnx")

    def run(self, features: np.ndarray, masks: List[np.ndarray]):
        feed = {self._names[self._inputs["features"]]: features}
        for i, m in enumerate(masks):
            feed[self._names[self._inputs[f"mask{i}"]]] = m
        wanted = [self._probs] + ([self._logits] if self._logits else [])
        out = self.session.run(wanted, feed)
        return out[0], (out[1] if self._logits else None)

    def sample(self, features: np.ndarray, num_iter: int) -> HeadMoments:
        x = np.asarray(features, np.float32).reshape(1, -1)
        masks = _runtime_masks(self.rng, self.head, num_iter)
        probs, logits = self.run(np.repeat(x, num_iter + 1, axis=0), masks)
        probs = _tempered(self.head, probs, logits)
        det = logits[0] if logits is not None else self.head.logits(x)[0]
        return moments_from_samples(probs[1:], self.head, det)


class TFLiteHeadSampler(Sampler):
    name = "tflite"

    def __init__(self, head: HeadWeights, seed: Optional[int] = None, bundle=None, threads: Optional[int] = None) -> None:
        super().__init__(head, seed, bundle, threads)
        if bundle is None or not bundle.head.tflite:
            raise OptionError("sampler 'tflite' needs a bundle with an exported TFLite head")
        self.interp, self.runtime = make_tflite_interpreter(str(bundle.file(bundle.head.tflite)), threads or default_threads(), True)
        details = self.interp.get_input_details()
        self._inputs = _match_inputs([d["name"] for d in details], len(head.kernels) + 1)
        self._rows = -1
        _check_temperature(head, any("logit" in o["name"] for o in self.interp.get_output_details()), "tflite")

    def _prepare(self, rows: int) -> None:
        if rows == self._rows:
            return
        details = self.interp.get_input_details()
        for d in details:
            self.interp.resize_tensor_input(d["index"], [rows, int(d["shape"][-1])])
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()
        outs = self.interp.get_output_details()
        self._probs = next((o for o in outs if "prob" in o["name"]), outs[-1])
        self._logits = next((o for o in outs if "logit" in o["name"]), None)
        self._rows = rows

    def run(self, features: np.ndarray, masks: List[np.ndarray]):
        self._prepare(features.shape[0])
        self.interp.set_tensor(self._in[self._inputs["features"]]["index"], features)
        for i, m in enumerate(masks):
            self.interp.set_tensor(self._in[self._inputs[f"mask{i}"]]["index"], m)
        self.interp.invoke()
        probs = self.interp.get_tensor(self._probs["index"])
        logits = self.interp.get_tensor(self._logits["index"]) if self._logits is not None else None
        return probs, logits

    def sample(self, features: np.ndarray, num_iter: int) -> HeadMoments:
        x = np.asarray(features, np.float32).reshape(1, -1)
        masks = _runtime_masks(self.rng, self.head, num_iter)
        probs, logits = self.run(np.ascontiguousarray(np.repeat(x, num_iter + 1, axis=0)), masks)
        probs = _tempered(self.head, probs, logits)
        det = logits[0] if logits is not None else self.head.logits(x)[0]
        return moments_from_samples(probs[1:], self.head, det)


SAMPLERS["onnx"] = OnnxHeadSampler
SAMPLERS["tflite"] = TFLiteHeadSampler
