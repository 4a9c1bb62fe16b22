"""mqtt://... (--mqtt URL): results and stats to an MQTT broker, the way Frigate and Home Assistant users expect.

Topics under PREFIX/DEVICE (default edge-quq/<hostname>):
    available   "online" (retained) once connected; "offline" (retained) as the broker's last will, and on a
                clean stop
    result      one JSON object on every change of decision or class (every frame with --mqtt-every-frame)
    stats       the periodic stats object (LoopStats.to_dict(), the same as the stats file)
    drift       the drift state {ts, frame, alarm, log10_martingale, since_frame} (retained, QoS 1), published
                on the first frame, whenever the alarm is raised or cleared, and again after a reconnect;
                nothing without a drift monitor

With --mqtt-discovery [PREFIX] it also publishes Home Assistant's discovery message(s) (edge_quq.sinks.ha_discovery)
retained on every connect, and again whenever Home Assistant says `online` on PREFIX/status (it restarted and
forgot what it had not kept); `remove_discovery` deletes them.

Connection failures (broker unreachable, wrong password, TLS to a plain port) never stop the run: they are
said once on stderr (again every few minutes while they last), counted in the stats' sink_errors (which
`edge-quq health` reports), and paho keeps retrying.

The broker never slows the loop: paho's network thread (loop_start) connects, reconnects with backoff and
sends; publish() only queues. Results and stats are QoS 0: while the broker is away they are dropped, not
piled up in memory, and the next change or stats interval brings subscribers up to date.
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import unquote, urlsplit

from edge_quq.errors import EdgeQuqError, OptionError
from edge_quq.redact import redact
from edge_quq.sinks import ha_discovery
from edge_quq.sinks.base import Failures, FrameResult, Sink, _stderr
from edge_quq.result import dumps

SCHEMES = {"mqtt": (1883, False), "tcp": (1883, False), "mqtts": (8883, True), "ssl": (8883, True)}
ENV_USER, ENV_PASSWORD = "EDGE_QUQ_MQTT_USERNAME", "EDGE_QUQ_MQTT_PASSWORD"


def parse_broker_url(url: str, label: str = "") -> Dict[str, Any]:
    """mqtt://[user[:password]@]host[:port] (mqtts:// for TLS); OptionError naming what does not parse."""
    label = redact(label or f"--mqtt {url}")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise OptionError(f"{label}: not a broker URL ({redact(str(e))}); expected mqtt://[user:password@]host[:port]") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise OptionError(f"{label}: scheme must be mqtt:// or mqtts:// (got {scheme + '://' if scheme else 'none'})")
    if not parts.hostname:
        raise OptionError(f"{label}: no broker host; expected mqtt://[user:password@]host[:port]")
    if parts.path not in ("", "/") or parts.query:
        raise OptionError(f"{label}: unexpected path or query; the topic prefix is --mqtt-prefix")
    default_port, tls = SCHEMES[scheme]
    user = unquote(parts.username) if parts.username else os.environ.get(ENV_USER)
    password = unquote(parts.password) if parts.password else os.environ.get(ENV_PASSWORD)
    return {"host": parts.hostname, "port": port or default_port, "tls": tls, "username": user, "password": password}


def _check_topic_part(name: str, value: str) -> str:
    if not value or any(c in value for c in "#+\0"):
        raise OptionError(f"--mqtt-{name} {value!r}: must be non-empty and free of MQTT wildcards (# +)")
    return value.strip("/")


def default_device() -> str:
    return socket.gethostname().split(".")[0] or "edge-quq"


class MqttSink(Sink):
    name = "mqtt"

    def __init__(self, url: str, prefix: str = "edge-quq", device: Optional[str] = None, every_frame: bool = False,
                 ca_file: Optional[str] = None, keepalive: int = 30, label: str = "", log: Callable[[str], None] = _stderr,
                 discovery: Optional[str] = None, discovery_mode: str = ha_discovery.DEFAULT_MODE) -> None:
        cfg = parse_broker_url(url, label)
        self.failures = Failures(self.name, log)
        self.broker = f"{'mqtts' if cfg['tls'] else 'mqtt'}://{cfg['host']}:{cfg['port']}"
        self._was_connected = False
        mqtt = _paho(label)
        device = device or default_device()
        self.base = f"{_check_topic_part('prefix', prefix)}/{_check_topic_part('device', device)}"
        # Refused here, before any connection: a bad device name publishes nothing at all.
        self.discovery = [] if discovery is None else ha_discovery.discovery_messages(device, self.base, discovery, discovery_mode)
        self.topic_ha_status = None if discovery is None else ha_discovery.status_topic(discovery)
        self._last_kept_label: Optional[str] = None
        self.topic_available = f"{self.base}/available"
        self.topic_result = f"{self.base}/result"
        self.topic_stats = f"{self.base}/stats"
        self.topic_drift = f"{self.base}/drift"
        self._last_alarm: Optional[bool] = None
        self.every_frame = every_frame
        self.url = redact(url)
        self._last_key: Optional[Tuple[str, Optional[int]]] = None
        self.connected = threading.Event()
        self.published = 0
        self.not_sent = 0  # publishes refused while disconnected
        self.connects = 0
        self._closing = False
        self._mqtt = mqtt
        c = _client(mqtt, cfg, ca_file, f"edge-quq-{self.base.replace('/', '-')}-{os.getpid()}")
        c.will_set(self.topic_available, "offline", qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_queued_messages_set(100)  # bounds what waits in paho's queue while the socket is slow
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        # connect_async + loop_start: the first connection also happens in paho's thread, so a broker that is
        # down at start-up delays nothing; it is retried with the backoff above.
        c.connect_async(cfg["host"], cfg["port"], keepalive=keepalive)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.failures.failed(f"broker {self.broker} refused the connection: {reason_code} (retrying)")
            return
        self.connects += 1
        self._was_connected = True
        self._last_key = None  # what changed while away is published with the next frame
        self._last_alarm = None
        self.connected.set()
        self.failures.ok()
        client.publish(self.topic_available, "online", qos=1, retain=True)
        if self.topic_ha_status is not None:
            client.subscribe(self.topic_ha_status, qos=1)
            self._publish_discovery(client)

    def _publish_discovery(self, client: Any) -> None:
        for topic, payload in self.discovery:
            client.publish(topic, payload, qos=1, retain=True)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == self.topic_ha_status and msg.payload == b"online":
            # Home Assistant (re)started: discovery again, and the states it has not seen with the next frame
            self._publish_discovery(client)
            self._last_key = None
            self._last_alarm = None

    def _on_connect_fail(self, client, userdata) -> None:
        # TCP refused or unreachable, DNS, or a TLS handshake that failed (mqtts:// to a plain port)
        self.failures.failed(f"cannot connect to broker {self.broker} (unreachable, refused, or TLS failed; retrying)")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()
        if self._was_connected and reason_code.is_failure and not self._closing:
            self._was_connected = False
            self.failures.failed(f"lost the broker {self.broker}: {reason_code} (reconnecting)")

    def _publish(self, topic: str, payload: str, qos: int = 0, retain: bool = False) -> None:
        if not self.connected.is_set():
            self.not_sent += 1
            return
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == self._mqtt.MQTT_ERR_SUCCESS:
            self.published += 1
        else:
            self.not_sent += 1

    def result_payload(self, r: FrameResult) -> Dict[str, Any]:
        p = r.prediction
        t = p.top_index
        return {
            "ts": round(r.time, 3),
            "frame": r.index,
            "decision": p.decision,
            "label": p.label,
            "class_index": p.class_index,
            "top_label": p.top_label,
            "top_index": t,
            "score": round(p.mean[t], 4),
            "interval": [round(p.lower[t], 4), round(p.upper[t], 4)],
            "rule": p.rule,
            "ignored_by": list(p.ignored_by),
            "policy": p.policy,
            "ood_p": None if p.ood_p is None else round(p.ood_p, 6),
            "drift_alarm": None if r.drift is None else r.drift.get("alarm"),
            "latency_ms": round(p.timings_ms.get("total", 0.0), 3),
            "last_kept_label": self._last_kept_label,  # the label of the latest kept frame, this one or earlier
        }

    def emit(self, r: FrameResult) -> None:
        p = r.prediction
        key = (p.decision, p.class_index if p.keep else None)
        if p.keep:
            self._last_kept_label = p.label
        if self.every_frame or key != self._last_key:
            self._last_key = key
            self._publish(self.topic_result, dumps(self.result_payload(r)))
        d = r.drift
        if d is not None and d.get("alarm") != self._last_alarm and self.connected.is_set():
            self._last_alarm = d.get("alarm")
            payload = {"ts": round(r.time, 3), "frame": r.index, **d}
            self._publish(self.topic_drift, dumps(payload), qos=1, retain=True)

    def stats(self, stats: Dict[str, Any]) -> None:
        # "ha": the few values Home Assistant's templates read, flat (edge_quq.sinks.ha_discovery.state_fields)
        self._publish(self.topic_stats, dumps({**stats, "ha": ha_discovery.state_fields(stats)}))

    def close(self) -> None:
        self._closing = True
        # A clean stop says offline itself (the will is only for crashes); give it a moment to leave.
        if self.connected.is_set():
            info = self.client.publish(self.topic_available, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=1.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


def _paho(label: str = "") -> Any:
    try:
        import paho.mqtt.client as mqtt  # noqa: PLC0415
    except ImportError:
        raise OptionError(f"{label or '--mqtt'}: needs paho-mqtt: pip install 'edge-quq[mqtt]'") from None
    return mqtt


def _client(mqtt: Any, cfg: Dict[str, Any], ca_file: Optional[str], client_id: str) -> Any:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if cfg["username"]:
        c.username_pw_set(cfg["username"], cfg["password"])
    if cfg["tls"]:
        c.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
    return c


class BrokerError(EdgeQuqError):
    """The broker could not be reached or did not take the messages (a run-time failure: exit 1)."""

    exit_code = 1


def remove_discovery(url: str, device: Optional[str] = None, discovery: str = ha_discovery.DEFAULT_PREFIX,
                     ca_file: Optional[str] = None, label: str = "", timeout: float = 10.0) -> list:
    """--mqtt-discovery-remove: an empty retained payload on every discovery topic of `device` (both layouts),
    which makes Home Assistant delete the device and its entities. Returns the topics; BrokerError when the
    broker cannot be reached or does not acknowledge them within `timeout` seconds."""
    cfg = parse_broker_url(url, label)
    device = device or default_device()
    topics = ha_discovery.removal_topics(device, discovery)  # a bad name or prefix is refused before connecting
    mqtt = _paho(label)
    broker = f"{'mqtts' if cfg['tls'] else 'mqtt'}://{cfg['host']}:{cfg['port']}"
    c = _client(mqtt, cfg, ca_file, f"edge-quq-remove-{device}-{os.getpid()}")
    try:
        if c.connect(cfg["host"], cfg["port"], keepalive=30) != mqtt.MQTT_ERR_SUCCESS:
            raise OSError("connect failed")
    except (OSError, ssl.SSLError) as e:
        raise BrokerError(f"--mqtt-discovery-remove: cannot connect to broker {broker}: {redact(str(e))}") from None
    c.loop_start()
    try:
        infos = [c.publish(t, b"", qos=1, retain=True) for t in topics]
        end = time.monotonic() + timeout
        for info in infos:
            try:
                info.wait_for_publish(timeout=max(0.0, end - time.monotonic()))
            except (RuntimeError, ValueError):  # not queued: the connection went away
                pass
            if not info.is_published():
                raise BrokerError(f"--mqtt-discovery-remove: broker {broker} did not acknowledge the removal within "
                                  f"{timeout:g} s (refused the connection?)")
    finally:
        c.disconnect()
        c.loop_stop()
    return topics
