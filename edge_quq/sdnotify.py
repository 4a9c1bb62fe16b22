"""systemd's notify protocol without libsystemd: one datagram per state change on $NOTIFY_SOCKET.

Type=notify units wait for READY=1; WatchdogSec= expects WATCHDOG=1 at least every $WATCHDOG_USEC
microseconds (we ping at half that); STOPPING=1 tells systemd a stop is in progress. Outside systemd
(no NOTIFY_SOCKET) every call is a no-op, so the camera loop can call it unconditionally.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Optional


class Notifier:
    def __init__(self, address: Optional[str] = None, watchdog_usec: Optional[int] = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: Optional[str] = addr or None
        if watchdog_usec is None:
            raw = os.environ.get("WATCHDOG_USEC")
            pid = os.environ.get("WATCHDOG_PID")
            # WATCHDOG_PID, when set, names the process the watchdog is meant for (not a child of ours).
            if raw and (not pid or pid == str(os.getpid())):
                try:
                    watchdog_usec = int(raw)
                except ValueError:
                    watchdog_usec = None
        self.watchdog_interval: Optional[float] = (watchdog_usec / 2e6) if watchdog_usec else None
        self._last_ping = 0.0
        self._sock: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str:
        assert self.address is not None
        # A leading '@' means the Linux abstract namespace, spelled with a NUL byte in the address.
        return "\0" + self.address[1:] if self.address.startswith("@") else self.address

    def send(self, message: str) -> bool:
        """Send one notification; False (never an exception) when it cannot be delivered."""
        if not self.enabled:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8"), self._target())
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self, now: Optional[float] = None) -> bool:
        """Ping the watchdog if due. Call it only when a frame was actually processed: a stalled loop
        stops pinging and systemd restarts it."""
        if self.watchdog_interval is None:
            return False
        t = time.monotonic() if now is None else now
        if t - self._last_ping < self.watchdog_interval:
            return False
        self._last_ping = t
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
