"""The notify protocol against a real datagram socket standing in for systemd's NOTIFY_SOCKET."""
from __future__ import annotations

import os

import socket

import pytest

from edge_quq.sdnotify import Notifier


@pytest.fixture()
def listener(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(1.0)
    yield path, s
    s.close()


def recv_all(s):
    out = []
    s.settimeout(0.05)
    try:
        while True:
            out.append(s.recv(4096).decode())
    except socket.timeout:
        pass
    return out


def test_ready_status_stopping(listener):
    path, s = listener
    n = Notifier(address=path, watchdog_usec=None)
    assert n.ready("model loaded") and n.status("42 frames") and n.stopping()
    assert recv_all(s) == ["READY=1\nSTATUS=model loaded", "STATUS=42 frames", "STOPPING=1"]


def test_watchdog_pings_at_half_the_interval(listener):
    path, s = listener
    n = Notifier(address=path, watchdog_usec=2_000_000)  # 2 s -> ping every 1 s
    assert n.watchdog(now=100.0)
    assert not n.watchdog(now=100.5)
    assert n.watchdog(now=101.0)
    assert recv_all(s) == ["WATCHDOG=1", "WATCHDOG=1"]


def test_abstract_namespace_socket():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0edge-quq-test-notify")
    try:
        assert Notifier(address="@edge-quq-test-notify").ready()
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_without_systemd_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready() and not n.watchdog() and not n.stopping()


def test_environment_and_watchdog_pid(monkeypatch, listener):
    path, _ = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process (not "1": in a container the runner can be PID 1)
    assert Notifier().watchdog_interval is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert Notifier().watchdog_interval == 2.0


def test_vanished_socket_never_raises(tmp_path):
    assert Notifier(address=str(tmp_path / "gone.sock")).ready() is False
