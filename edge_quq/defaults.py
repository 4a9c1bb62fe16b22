"""Every default and every choice list of the decision, in one place.

The manifest parser, the exporter, the CLI help, the config template and the docs read these names;
nothing else spells the numbers. A bundle's manifest may override the decision defaults for its model.
"""
from __future__ import annotations

from typing import Dict, Tuple

# The seed paper's operating point (arXiv 2403.01076): T = 50 samples, threshold 0.5, z = 0.8
# (its conf_factor grid is 0.7/0.8/0.9, read as z), and the open "mixed" case ignored.
DECISION_DEFAULTS: Dict[str, object] = {
    "threshold": 0.5,
    "num_iter": 50,
    "z": 0.8,
    "mixed": "ignore",
}

# More dropout samples than this are refused up front: the reference sampler holds T x F masks (82 MB at
# T = 10 000, F = 2048), and the paper's own grid stops at T = 100.
MAX_NUM_ITER = 10_000

MIXED_POLICIES: Tuple[str, ...] = ("ignore", "keep")
BACKENDS: Tuple[str, ...] = ("auto", "tflite", "onnx")
CHANNEL_ORDERS: Tuple[str, ...] = ("bgr", "rgb")
# What may ignore a prediction besides a detector name of the bundle.
IGNORE_ON_WORDS: Tuple[str, ...] = ("mc", "any")
DEFAULT_IGNORE_ON = "mc"
# Input images above this many pixels are refused from their header, before decoding (a 12 MP photo fits; a
# 900 MP "decompression bomb" in a 1 MB PNG does not).
DEFAULT_MAX_PIXELS = 50_000_000
# Which detectors run per frame (--detectors). `gate`: only what the decision needs (the gate's detectors, the
# detector --ignore-on names, every thresholded one under --ignore-on any); `all`: every detector of the bundle
# and the gradient score; or detector names, computed on top of what the decision needs. The others are
# diagnostics: on a small backbone they cost more than the backbone itself (bench/results/e2e.md).
DETECTOR_SELECTION_WORDS: Tuple[str, ...] = ("gate", "all")
DEFAULT_DETECTOR_SELECTION = "gate"
# Whether a frame's detectors run beside the head sampler, one of the two on a second thread (--overlap). `auto`:
# when the detectors hold at least OVERLAP_MIN_BYTES (about what they read per frame) and a second CPU is there.
# Measured ad hoc (docs/detectors.md): on the MobileNetV2 bench bundle the two stages took 1.06 ms in turn and
# 0.63 ms at once; on the default bundle's small detectors (0.18 MB) 0.19 ms in turn and 0.21 at once, as waking
# a thread costs 20-90 us here.
OVERLAP_CHOICES: Tuple[str, ...] = ("auto", "on", "off")
OVERLAP_MIN_BYTES = 1 << 20


def default_help(key: str) -> str:
    """'(default: the bundle's; 0.5 when it has none)' for CLI help text, from the one table. The exporter
    chooses z per bundle (Z_CHOICE), so the table's value is only the fallback."""
    return f"(default: the bundle's; {DECISION_DEFAULTS[key]} when it has none)"

# --- decision policies (issue 14; docs/decisions.md) ------------------------------------------------------
# paper: the MC interval rule alone. gated: the rule plus the conformal OOD gate. risk: gated plus a
# Learn-then-Test keep threshold on a confidence score. A bundle with calibration data (gate.npz) defaults
# to its manifest's policy (gated as exported); one without it can only run `paper`.
POLICIES: Tuple[str, ...] = ("paper", "gated", "risk")
POLICY_WITHOUT_CALIBRATION = "paper"
# Why a prediction was ignored (Prediction.ignored_by); a detector name may also appear when --ignore-on
# names one (its fitted threshold alone, the pre-gate mechanism).
IGNORE_REASONS: Tuple[str, ...] = ("rule", "ood_gate", "risk", "drift")
# Gate and risk defaults the exporter writes into a manifest, and the fallbacks when a manifest lacks them.
# Rules that combine several detectors' p-values and stay valid under any dependence between them
# (edge_quq.conformal.combine). Spelled here so that bundle.py, which deploy/install.sh imports with the
# system Python (no numpy), can check a manifest without importing the math.
COMBINE_RULES: Tuple[str, ...] = ("calibrated_minp", "bonferroni", "hmp")

GATE_DEFAULTS: Dict[str, object] = {
    "policy": "gated",
    "alpha": 0.05,       # gate level: P(ignore | exchangeable ID input) <= alpha
    "delta": 0.05,       # risk: P(error among kept > target) <= delta over the calibration draw
    "combine": "calibrated_minp",  # the exact level alpha where Bonferroni spends less (conformal.py)
}
# How the exporter picks a gated bundle's default interval factor z (edge_quq_export.detectors.choose_default_z;
# docs/decisions.md "The default z"). Users never pass --z, so the rule's z is what sets the default policy's
# error among kept; 0.8 is the paper's pick for its own model, not for this one. The exporter certifies, on
# its calibration split, the smallest z whose error among kept (rule plus gate) stays at most `error_target`
# at the gate's delta, testing the grid from the widest interval down (fixed-sequence Learn-then-Test) and
# only where rule plus gate ignore at most `ignore_budget` of the calibration split.
Z_CHOICE: Dict[str, object] = {
    "error_target": 0.05,
    "ignore_budget": 0.08,
    "grid": tuple(round(0.5 + 0.1 * i, 1) for i in range(16)),  # 0.5 .. 2.0
}
# Confidence scores the exporter may pick for `risk` (higher = more confident after the sign in RISK_SCORE_SIGN).
RISK_SCORES: Tuple[str, ...] = ("max_prob", "predictive_entropy", "mean_variance", "mutual_information")
RISK_SCORE_SIGN: Dict[str, float] = {"max_prob": 1.0, "predictive_entropy": -1.0, "mean_variance": -1.0,
                                     "mutual_information": -1.0}

# --- drift alarm of streams (edge_quq.drift, `edge-quq camera`; docs/decisions.md) ----------------------------
# Defaults of the drift monitor; docs/decisions.md says where each number comes from.
DRIFT_DEFAULTS: Dict[str, object] = {
    "delta": 0.01,            # false-alarm probability bound (Ville), per fresh start
    "family": "power",
    "jump": 0.01,             # J of the jumper mixture (Vovk et al. 2021 use 0.01)
    "feed": "scene",
    "scene_distance": 0.25,   # L2 distance between L2-normalised features that counts as a new scene
    "scene_memory": 16,       # fed frames a new scene is compared with
    "interval": 1,            # at most one fed frame per this many frames (1: no limit)
    "clear_after": 30,        # fed frames without a crossing that clear the alarm
}
# --on-drift: flag (report the alarm only) or ignore (frames during an alarm are also ignored, "drift" in ignored_by).
ON_DRIFT: Tuple[str, ...] = ("flag", "ignore")
DEFAULT_ON_DRIFT = "flag"

# --- Home Assistant MQTT discovery (`edge-quq camera --mqtt-discovery`; edge_quq.sinks.ha_discovery) ----------
# Home Assistant's default discovery prefix; device: one message for the whole device (HA 2024.11+),
# component: one message per entity (older HA versions).
MQTT_DISCOVERY_PREFIX = "homeassistant"
MQTT_DISCOVERY_MODES: Tuple[str, ...] = ("device", "component")
DEFAULT_MQTT_DISCOVERY_MODE = "device"
