"""One redaction function masks credentials in every URI shape a source or broker can take."""
from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from edge_quq.redact import redact, redact_obj


@pytest.mark.parametrize("uri,want", [
    ("http://admin:CamPass123@10.0.0.5/video.mjpg", "http://admin:***@10.0.0.5/video.mjpg"),
    ("rtsp://user:p%40ss:w0rd@cam.local:554/stream1", "rtsp://user:***@cam.local:554/stream1"),
    ("mqtts://bob:s3cret@broker:8883", "mqtts://bob:***@broker:8883"),
    ("mqtt://user:PW@host:99999", "mqtt://user:***@host:99999"),
    ("mqtt://:onlypw@host", "mqtt://:***@host"),
    ("https://cam/snap.jpg?user=a&password=hunter2&x=1", "https://cam/snap.jpg?user=a&password=***&x=1"),
    ("http://cam/video?token=abc.def-123", "http://cam/video?token=***"),
    ("rtsp://cam.local/stream", "rtsp://cam.local/stream"),
    ("csi://0", "csi://0"),
    ("/dev/video0", "/dev/video0"),
    ("file:///home/pi/a:b@c.mp4", "file:///home/pi/a:b@c.mp4"),  # a path, not user info
])
def test_uris(uri, want):
    assert redact(uri) == want


def test_in_free_text_and_structures():
    msg = "error: --mqtt mqtt://user:PW@host:99999: port must be 1-65535"
    assert "PW" not in redact(msg) and "mqtt://user:***@host:99999" in redact(msg)
    stats = {"source": "http://a:b@h/x", "sinks": ["mqtt://u:p@b"], "n": 3}
    assert redact_obj(stats) == {"source": "http://a:***@h/x", "sinks": ["mqtt://u:***@b"], "n": 3}


@pytest.mark.parametrize("pw", ["CamPass123", "with space?", "ümlaut", "a@b", "::", "p/w"])
def test_password_never_survives(pw):
    from urllib.parse import quote

    uri = f"http://admin:{quote(pw, safe='')}@cam:8080/video.mjpg"
    out = redact(uri)
    assert quote(pw, safe="") not in out and urlsplit(out).hostname == "cam"
