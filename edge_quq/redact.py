"""Credentials never leave the process: every URI that is printed, logged, stored or published goes
through `redact`.

`http://admin:CamPass123@cam/video.mjpg` -> `http://admin:***@cam/video.mjpg`. The user name stays (it
helps tell cameras apart); the password, and secrets in the query string (`?password=`, `token=`, `key=`,
...), become `***`. Also used on free text such as error messages, which often quote the URI they failed on.
"""
from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@  (password: anything up to the last @ before the host part)
_USERINFO = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*):(?P<pw>[^\s/]*)@(?=[^\s@/]*(?:[/\s?#]|$))")
# user info without a password that still looks like a token (rtsp://TOKEN@host): left as is, a user name.
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|pass|token|access_token|auth|key|api_key|apikey|secret|sig|signature)=)(?P<val>[^&#\s]*)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every URI password and query-string secret replaced by ***."""
    if not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m.group('pre')}:{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("key") + (MASK if m.group("val") else ""), out)


def redact_obj(obj: object) -> object:
    """A JSON-ready structure with every string redacted (for stats files, status pages and MQTT payloads)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj
