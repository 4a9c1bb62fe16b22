"""Classify every image of a folder and say which predictions to trust.

    python examples/classify_folder.py [FOLDER]     (default: the sample images shipped with edge_quq)
"""
import sys
from pathlib import Path

import edge_quq

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else edge_quq.SAMPLES_DIR
files = sorted(p for p in folder.iterdir() if p.is_file())

predictor = edge_quq.Predictor.from_bundle()  # no path: the embedded Fashion-MNIST bundle
for path, p in zip(files, predictor.predict_many(files)):
    if not isinstance(p, edge_quq.Prediction):  # an unreadable file: reported, the others still run
        print(f"{path.name:24} error: {p.error}")
        continue
    t = p.top_index
    # keep: the label can be trusted; ignore: the model is unsure (a person should look)
    print(f"{path.name:24} {p.decision:6} {p.label or '-':12} top {p.top_label} {p.mean[t]:.2f} ± {p.std[t]:.2f}")
