"""Home Assistant MQTT discovery for `edge-quq camera --mqtt URL --mqtt-discovery [PREFIX]` (issue 18).

Pure functions: what is published where, built from the device name and the state topics MqttSink already
publishes (PREFIX/DEVICE/result, stats, drift, available). MqttSink sends the messages; tests read them.

Two layouts, both documented by Home Assistant's MQTT integration:
    device      one retained message on <prefix>/device/<node_id>/config with `dev`, `o` and `cmps`
                (device-based discovery, Home Assistant 2024.11 and newer)
    component   one retained message per entity on <prefix>/<component>/<object_id>/config, each carrying
                the device and origin (every Home Assistant version with MQTT discovery)

Every value template is the simple `{{ value_json.a.b }}` form: HA renders the JSON value with Python's
str(), so a JSON true is "True" (the binary sensors' payload_on), and null is "None", which HA's MQTT
sensor and binary_sensor read as "unknown".
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from edge_quq import __version__
from edge_quq.defaults import DEFAULT_MQTT_DISCOVERY_MODE as DEFAULT_MODE
from edge_quq.defaults import MQTT_DISCOVERY_MODES as MODES
from edge_quq.defaults import MQTT_DISCOVERY_PREFIX as DEFAULT_PREFIX
from edge_quq.errors import OptionError

OBJECT_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
ORIGIN = {"name": "edge-quq", "sw_version": __version__}
ON_OFF = {"payload_on": "True", "payload_off": "False"}
DIAGNOSTIC = {"entity_category": "diagnostic"}

# (key, platform, state topic name, template path, entity options). The key is the component id inside
# `cmps` and the last part of every unique_id: renaming one orphans that entity in users' installs.
ENTITIES: Tuple[Tuple[str, str, str, str, Dict[str, Any]], ...] = (
    ("last_label", "sensor", "result", "last_kept_label", {"name": "Last kept label", "icon": "mdi:tag"}),
    ("last_decision", "sensor", "result", "decision",
     {"name": "Last decision", "device_class": "enum", "options": ["keep", "ignore"], "icon": "mdi:check-decagram"}),
    ("last_ignored", "binary_sensor", "result", "decision",
     {"name": "Last frame ignored", "payload_on": "ignore", "payload_off": "keep", "icon": "mdi:eye-off"}),
    ("ignore_rate", "sensor", "stats", "ha.ignore_pct",
     {"name": "Ignore rate", "unit_of_measurement": "%", "state_class": "measurement", "icon": "mdi:percent"}),
    ("fps", "sensor", "stats", "fps_recent",
     {"name": "FPS", "unit_of_measurement": "fps", "state_class": "measurement", "icon": "mdi:speedometer", **DIAGNOSTIC}),
    ("latency_p50", "sensor", "stats", "ha.latency_p50_ms",
     {"name": "Latency p50", "device_class": "duration", "unit_of_measurement": "ms", "state_class": "measurement", **DIAGNOSTIC}),
    ("cpu_temp", "sensor", "stats", "ha.temp_c",
     {"name": "CPU temperature", "device_class": "temperature", "unit_of_measurement": "°C", "state_class": "measurement",
      **DIAGNOSTIC}),
    ("throttled", "binary_sensor", "stats", "ha.throttled", {"name": "Throttled", "device_class": "problem", **ON_OFF, **DIAGNOSTIC}),
    ("drift", "binary_sensor", "drift", "alarm", {"name": "Drift alarm", "device_class": "problem", "icon": "mdi:chart-bell-curve", **ON_OFF}),
)


def check_object_id(device: str, label: str = "--mqtt-device") -> str:
    """The device name, if Home Assistant accepts it inside discovery topics and unique_ids."""
    if not OBJECT_ID.match(device or ""):
        raise OptionError(f"{label} {device!r}: Home Assistant discovery needs a device name of letters, digits, "
                          f"'_' and '-' only (set --mqtt-device)")
    return device


def check_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "#+\0") or prefix.strip("/") != prefix:
        raise OptionError(f"--mqtt-discovery {prefix!r}: the discovery prefix must be non-empty, without MQTT "
                          f"wildcards (# +) or a leading or trailing '/'")
    return prefix


def node_id(device: str) -> str:
    return f"edge_quq_{check_object_id(device)}"


def template(path: str) -> str:
    return "{{ value_json.%s }}" % path


def device_block(device: str) -> Dict[str, Any]:
    return {"identifiers": [node_id(device)], "name": device, "manufacturer": "edge-quq",
            "model": "edge-quq camera", "sw_version": __version__}


def components(device: str, base: str) -> Dict[str, Dict[str, Any]]:
    """`cmps`: every entity with its platform, unique_id, state topic (under `base`) and template."""
    nid = node_id(device)
    return {key: {"p": platform, "unique_id": f"{nid}_{key}", "state_topic": f"{base}/{topic}",
                  "value_template": template(path), **opts}
            for key, platform, topic, path, opts in ENTITIES}


def discovery_messages(device: str, base: str, prefix: str = DEFAULT_PREFIX, mode: str = DEFAULT_MODE) -> List[Tuple[str, str]]:
    """[(topic, JSON payload)] to publish retained for one camera; `base` is MqttSink's PREFIX/DEVICE."""
    check_prefix(prefix)
    if mode not in MODES:
        raise OptionError(f"--mqtt-discovery-mode must be one of {', '.join(MODES)}, got {mode!r}")
    shared = {"dev": device_block(device), "o": dict(ORIGIN), "availability_topic": f"{base}/available"}
    cmps = components(device, base)
    if mode == "device":
        return [(f"{prefix}/device/{node_id(device)}/config", json.dumps({**shared, "cmps": cmps}, ensure_ascii=False))]
    out = []
    for c in cmps.values():
        c = dict(c)
        platform = c.pop("p")
        out.append((f"{prefix}/{platform}/{c['unique_id']}/config", json.dumps({**shared, **c}, ensure_ascii=False)))
    return out


def removal_topics(device: str, prefix: str = DEFAULT_PREFIX) -> List[str]:
    """Every discovery topic either layout uses: an empty retained payload on each deletes the device."""
    return [t for mode in MODES for t, _ in discovery_messages(device, "-", prefix, mode)]


def status_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """Where Home Assistant says `online` after it starts (its birth message): time to publish again."""
    return f"{prefix}/status"


def state_fields(stats: Mapping[str, Any]) -> Dict[str, Optional[Any]]:
    """The stats values the templates need, flat (the stats object nests them or leaves them out)."""
    rate = stats.get("ignore_rate")
    board = stats.get("board") or {}
    thr = board.get("throttled")
    total = (stats.get("latency_ms") or {}).get("total") or {}
    return {"ignore_pct": None if rate is None else round(100.0 * rate, 2), "latency_p50_ms": total.get("p50"),
            "temp_c": board.get("temp_c"), "throttled": None if not thr else bool(thr.get("active"))}
