"""Where the camera loop's results go. Every sink gets the same FrameResult per processed frame, the same
stats dict at every stats interval, and close() at the end (which must flush).

    base.py       FrameResult, Sink (a context manager)
    outputs.py    URIs -> OutputSpec (parse_output), OutputSpec -> Sink (open_output), SinkSet
    files.py      JSON lines to stdout or a file, annotated video file, snapshots of ignored frames,
                  the stats file, the display window
    annotate.py   the overlay drawn once per frame for the video, the window and the HTTP stream
    http.py       http://HOST:PORT: MJPEG stream, page, JSON status
    mqtt.py       mqtt://...: Frigate / Home Assistant style topics
"""
from edge_quq.sinks.base import FrameResult, Sink, frame_record
from edge_quq.sinks.outputs import OutputOptions, OutputSpec, SinkSet, alias_outputs, open_output, parse_output

__all__ = ["FrameResult", "Sink", "frame_record", "OutputOptions", "OutputSpec", "SinkSet", "alias_outputs", "open_output",
           "parse_output"]
