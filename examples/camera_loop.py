"""A camera loop in jetson-inference's imagenet.py shape: a source by URI, outputs by URI, the predictor in
the middle (capture -> classify -> render).

    python examples/camera_loop.py SOURCE OUTPUT [OUTPUT ...]
    python examples/camera_loop.py video.avi jsonl:results.jsonl video:annotated.avi
"""
import argparse
from contextlib import ExitStack

import edge_quq

parser = argparse.ArgumentParser(description="Classify frames; say which predictions to trust.")
parser.add_argument("source", help="csi://0, /dev/video0, rtsp://..., a video file, an image folder")
parser.add_argument("outputs", nargs="+", help="jsonl:PATH|-, video:PATH, snapshots:DIR, http://HOST:PORT, mqtt://HOST, display://0")
args = parser.parse_args()

net = edge_quq.Predictor.from_bundle()  # the embedded Fashion-MNIST bundle
with ExitStack() as stack:  # closes (flushes) every output and the source, however the loop ends
    source = stack.enter_context(edge_quq.open_source(args.source))
    outputs = [stack.enter_context(edge_quq.open_output(uri, video_fps=source.nominal_fps or 10.0)) for uri in args.outputs]
    for img in source:  # capture: BGR frames until the end of a file (or a failed read)
        prediction = net.predict(img)  # classify, with the keep/ignore decision
        for out in outputs:
            out.render(img, prediction)  # render: JSON line, annotated frame, live view, ...
        if any(out.quit for out in outputs):  # q or Esc in a display window
            break
