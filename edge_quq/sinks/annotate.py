"""The overlay drawn on frames for the video file, the window and the HTTP stream."""
from __future__ import annotations

import numpy as np

KEEP_BGR = (60, 200, 60)
IGNORE_BGR = (40, 40, 230)
MIN_WIDTH = 320  # small model-sized frames are scaled up so the text stays legible


def annotate(r) -> np.ndarray:
    import cv2  # noqa: PLC0415

    img = r.image
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    scale = 1.0
    if img.shape[1] < MIN_WIDTH:
        scale = MIN_WIDTH / img.shape[1]
        img = cv2.resize(img, (MIN_WIDTH, int(round(img.shape[0] * scale))), interpolation=cv2.INTER_NEAREST)
    else:
        img = img.copy()
    p = r.prediction
    color = KEEP_BGR if p.keep else IGNORE_BGR
    h, w = img.shape[:2]
    if r.roi is not None:
        x, y, rw, rh = (int(round(v * scale)) for v in r.roi)
        cv2.rectangle(img, (x, y), (x + rw - 1, y + rh - 1), color, 2)
    else:
        cv2.rectangle(img, (0, 0), (w - 1, h - 1), color, 4)
    t = p.top_index
    line1 = f"{p.label} {p.mean[t]:.2f}" if p.keep else f"IGNORE ({p.top_label}? {p.mean[t]:.2f}+-{p.std[t]:.2f})"
    line2 = f"#{r.index}  {p.timings_ms.get('total', 0.0):.1f} ms  {r.fps:.1f} fps"
    line3 = why_text(p, r.drift)
    fs = max(0.45, w / 700)
    th = max(1, int(round(fs * 2)))
    bar = int(66 * fs) + 10
    cv2.rectangle(img, (0, 0), (w, bar), (0, 0, 0), -1)
    cv2.putText(img, line1, (6, int(20 * fs) + 4), cv2.FONT_HERSHEY_SIMPLEX, fs, color, th, cv2.LINE_AA)
    cv2.putText(img, line2, (6, int(42 * fs) + 4), cv2.FONT_HERSHEY_SIMPLEX, fs * 0.8, (230, 230, 230), max(1, th - 1), cv2.LINE_AA)
    alarm = r.drift is not None and r.drift.get("alarm")
    cv2.putText(img, line3, (6, int(62 * fs) + 4), cv2.FONT_HERSHEY_SIMPLEX, fs * 0.7, IGNORE_BGR if alarm else (200, 200, 200),
                max(1, th - 1), cv2.LINE_AA)
    return img


def why_text(p, drift) -> str:
    """The policy, why the frame was ignored, the drift state and the detector flags, in one short line
    (most important first: a small frame cuts the end off)."""
    parts = [p.policy]
    if p.ignored_by:
        parts.append("by " + ",".join(p.ignored_by))
    if drift is not None:
        parts.append(f"DRIFT since #{drift.get('since_frame')}" if drift.get("alarm") else "drift ok")
    if p.flagged:
        parts.append("flag " + ",".join(p.flagged) if len(p.flagged) <= 2 else f"{len(p.flagged)} flags")
    return "  ".join(parts)
