"""Home Assistant MQTT discovery of `edge-quq camera --mqtt URL --mqtt-discovery` (issue 18), against a real
Mosquitto broker: a test client subscribes the way Home Assistant does (the discovery prefix, then the state
topics a discovery payload names) and applies the `{{ value_json.x }}` templates itself.

Home Assistant itself needs a newer Python than this machine's, so the payloads are checked against the keys
its MQTT discovery documents for sensor and binary_sensor, not by a running Home Assistant."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from camera_util import Mosquitto, Subscriber, free_port, read_jsonl, run_camera, start_camera, stop, wait_for, write_folder, write_video

from edge_quq.errors import OptionError
from edge_quq.sinks import ha_discovery

FAST = ("-T", "10", "--threads", "1", "--seed", "0", "-q")
TEMPLATE = re.compile(r"^\{\{ value_json\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*) \}\}$")
OBJECT_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
# The keys Home Assistant documents for MQTT discovery (device-based payload, device and origin mappings,
# and the sensor / binary_sensor platforms' options).
ROOT_KEYS = {"dev", "o", "cmps", "availability_topic"}
DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "sw_version"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
ENTITY_KEYS = {"p", "unique_id", "state_topic", "value_template", "name", "icon", "device_class", "unit_of_measurement",
               "state_class", "options", "payload_on", "payload_off", "entity_category"}
DEVICE_CLASSES = {"sensor": {"enum", "duration", "temperature"}, "binary_sensor": {"problem"}}
UNITS = {"duration": {"ms", "s", "min", "h", "d"}, "temperature": {"°C", "°F", "K"}}


@pytest.fixture()
def broker(tmp_path):
    pytest.importorskip("paho.mqtt")
    b = Mosquitto(tmp_path)
    yield b
    print(b.diagnose())  # shown with a failing test's captured output
    b.stop()


def render(template: str, payload: str) -> str:
    """What Home Assistant's value_template makes of a payload, for the `{{ value_json.a.b }}` form only: the
    JSON value at that path rendered with str() (Jinja's way), null as "None" (HA's MQTT "unknown")."""
    m = TEMPLATE.match(template)
    assert m, f"not the simple form: {template!r}"
    value = json.loads(payload)
    for key in m.group(1).split("."):
        assert isinstance(value, dict) and key in value, f"{template} on {payload[:200]}: no {key!r} (a template error in HA)"
        value = value[key]
    return "None" if value is None else str(value)


def check_entity(key: str, c: dict, platform: str) -> None:
    assert set(c) <= ENTITY_KEYS, set(c) - ENTITY_KEYS
    assert {"unique_id", "state_topic", "value_template", "name"} <= set(c)
    assert platform in DEVICE_CLASSES and OBJECT_ID.match(c["unique_id"])
    if "device_class" in c:
        assert c["device_class"] in DEVICE_CLASSES[platform]
        if c["device_class"] in UNITS:
            assert c["unit_of_measurement"] in UNITS[c["device_class"]]
        if c["device_class"] == "enum":
            assert c["options"] and "state_class" not in c and "unit_of_measurement" not in c
    if platform == "binary_sensor":
        assert {"payload_on", "payload_off"} <= set(c)
    assert c.get("state_class") in (None, "measurement")
    assert c.get("icon") is None or c["icon"].startswith("mdi:")
    assert c.get("entity_category") in (None, "diagnostic")


def check_device_payload(payload: str, device: str) -> dict:
    d = json.loads(payload)
    assert set(d) <= ROOT_KEYS and {"dev", "o", "cmps"} <= set(d)
    assert set(d["dev"]) <= DEVICE_KEYS and d["dev"]["identifiers"] and d["dev"]["name"] == device
    assert set(d["o"]) <= ORIGIN_KEYS and d["o"]["name"]
    assert d["availability_topic"] == f"edge-quq/{device}/available"
    for key, c in d["cmps"].items():
        assert OBJECT_ID.match(key)
        check_entity(key, c, c["p"])
    return d


# -- the payload builder, alone ------------------------------------------------------------------------------
def test_payload_has_every_entity_with_stable_ids():
    (topic, payload), = ha_discovery.discovery_messages("porch-cam", "edge-quq/porch-cam")
    assert topic == "homeassistant/device/edge_quq_porch-cam/config"
    d = check_device_payload(payload, "porch-cam")
    c = d["cmps"]
    assert {k: v["p"] for k, v in c.items()} == {
        "last_label": "sensor", "last_decision": "sensor", "last_ignored": "binary_sensor", "ignore_rate": "sensor",
        "fps": "sensor", "latency_p50": "sensor", "cpu_temp": "sensor", "throttled": "binary_sensor", "drift": "binary_sensor"}
    # The state topics the camera publishes, and nothing else.
    assert {v["state_topic"] for v in c.values()} == {f"edge-quq/porch-cam/{t}" for t in ("result", "stats", "drift")}
    # Same name, same ids: a restart or a reinstall finds the same device and entities in Home Assistant.
    assert ha_discovery.discovery_messages("porch-cam", "edge-quq/porch-cam") == [(topic, payload)]
    assert [v["unique_id"] for v in c.values()] == [f"edge_quq_porch-cam_{k}" for k in c]
    assert c["cpu_temp"]["device_class"] == "temperature" and c["cpu_temp"]["unit_of_measurement"] == "°C"
    assert c["last_decision"]["options"] == ["keep", "ignore"]


def test_per_component_fallback_carries_device_and_origin_in_each():
    msgs = ha_discovery.discovery_messages("cam_2", "site/cam_2", prefix="ha", mode="component")
    assert len(msgs) == len(ha_discovery.ENTITIES)
    for topic, payload in msgs:
        d = json.loads(payload)
        platform = topic.split("/")[1]
        assert topic == f"ha/{platform}/{d['unique_id']}/config"
        assert d["dev"]["identifiers"] == ["edge_quq_cam_2"] and d["o"]["name"] == "edge-quq"
        assert "p" not in d and d["availability_topic"] == "site/cam_2/available"
        check_entity(d["unique_id"], {k: v for k, v in d.items() if k not in ROOT_KEYS}, platform)
    assert sorted(ha_discovery.removal_topics("cam_2", "ha")) == sorted(["ha/device/edge_quq_cam_2/config"] + [t for t, _ in msgs])


@pytest.mark.parametrize("device", ["porch cam", "cam/1", "küche", "", "a.b"])
def test_device_names_outside_the_object_id_set_are_refused(device):
    with pytest.raises(OptionError, match="letters, digits"):
        ha_discovery.discovery_messages(device, "edge-quq/x")


@pytest.mark.parametrize("prefix", ["", "ha/#", "/ha", "ha/"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(OptionError, match="discovery prefix"):
        ha_discovery.discovery_messages("cam", "edge-quq/cam", prefix)


def test_state_fields_flatten_what_the_templates_read():
    stats = {"ignore_rate": 0.125, "latency_ms": {"total": {"p50": 2.5}}, "board": {"temp_c": 51.2, "throttled": {"active": True}}}
    assert ha_discovery.state_fields(stats) == {"ignore_pct": 12.5, "latency_p50_ms": 2.5, "temp_c": 51.2, "throttled": True}
    assert ha_discovery.state_fields({"ignore_rate": None, "latency_ms": {}, "board": {}}) == {
        "ignore_pct": None, "latency_p50_ms": None, "temp_c": None, "throttled": None}


def test_config_file_accepts_the_options(tmp_path):
    from edge_quq.cli import camera
    from edge_quq.config import ConfigError, load_config

    cfg = tmp_path / "config"
    cfg.write_text('mqtt-discovery = "homeassistant"\nmqtt-discovery-mode = "component"\n')
    assert load_config(camera, cfg) == {"mqtt_discovery": "homeassistant", "mqtt_discovery_mode": "component"}
    cfg.write_text('mqtt-discovery-mode = "entity"\n')
    with pytest.raises(ConfigError, match="mqtt-discovery-mode"):
        load_config(camera, cfg)
    # Removal is a one-off act on the command line; in the service's file it would run at every start.
    cfg.write_text('mqtt-discovery-remove = true\n')
    with pytest.raises(ConfigError, match="unknown key 'mqtt-discovery-remove'"):
        load_config(camera, cfg)


# -- the real command and a real broker ------------------------------------------------------------------------
def _run_with_states(tmp_path: Path, broker: Mosquitto, *args: str) -> Subscriber:
    """Run the camera to its end on a video with a corrupt stretch; the state topics it published."""
    write_video(tmp_path / "v.avi", n=120, corrupt_range=(40, 80))
    states = Subscriber(broker.port, "edge-quq/#")
    try:
        r = run_camera("--source", str(tmp_path / "v.avi"), "--mqtt", broker.url, *args, *FAST)
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: states.on("/available") and states.on("/available")[-1][2] == "offline", 10)
    finally:
        states.close()
    return states


def test_discovery_payload_and_the_states_it_names(tmp_path, broker):
    out = tmp_path / "out.jsonl"
    states = _run_with_states(tmp_path, broker, "--mqtt-device", "cam1", "--mqtt-discovery", "--jsonl", str(out),
                              "--stats-interval", "0.2", "--max-fps", "60")
    # Home Assistant starting now gets the configuration from the broker: retained, valid JSON.
    ha = Subscriber(broker.port, "homeassistant/#")
    try:
        assert wait_for(lambda: ha.messages, 10)
    finally:
        ha.close()
    assert [(m[1], m[3]) for m in ha.messages] == [("homeassistant/device/edge_quq_cam1/config", True)]
    d = check_device_payload(ha.messages[0][2], "cam1")

    recs = read_jsonl(out)
    labels = {x["label"] for x in recs if x["label"] is not None}
    assert {x["decision"] for x in recs} == {"keep", "ignore"} and labels
    has_thermal = Path("/sys/class/thermal/thermal_zone0/temp").exists()
    for key, c in d["cmps"].items():
        got = [render(c["value_template"], m[2]) for m in states.messages if m[1] == c["state_topic"]]
        assert got, f"{key}: nothing on {c['state_topic']}"
        known = [v for v in got if v != "None"]
        if c["p"] == "binary_sensor":
            assert set(known) <= {c["payload_on"], c["payload_off"]}, (key, set(known))
        elif c.get("device_class") == "enum":
            assert set(known) <= set(c["options"])
        elif "unit_of_measurement" in c:
            assert all(isinstance(float(v), float) for v in known)
        else:  # the last kept label: a class name of the bundle
            assert set(known) <= labels
        # Every value is there, except what this x86 machine has not: no Pi firmware, maybe no thermal zone.
        if key == "throttled" or (key == "cpu_temp" and not has_thermal):
            assert known == [], (key, known)
        else:
            assert known, f"{key}: only unknown values"
    # The binary sensor follows the decision of the last frame; the label sensor keeps the last kept label.
    results = [json.loads(m[2]) for m in states.messages if m[1] == "edge-quq/cam1/result"]
    last_kept = None
    for p in results:
        frame = next(x for x in recs if x["frame"] == p["frame"])
        last_kept = frame["label"] if frame["decision"] == "keep" else last_kept
        assert p["last_kept_label"] == last_kept


def test_republished_when_home_assistant_comes_online(tmp_path, broker):
    write_folder(tmp_path / "imgs", 10)
    proc = start_camera("--source", str(tmp_path / "imgs"), "--loop", "--max-fps", "20", "--mqtt", broker.url,
                        "--mqtt-device", "cam2", "--mqtt-discovery", "ha", *FAST)
    ha = Subscriber(broker.port, "ha/#")
    try:
        topic = "ha/device/edge_quq_cam2/config"
        assert wait_for(lambda: ha.on(topic), 60), ha.messages
        ha.client.publish("ha/status", "offline")
        ha.client.publish("ha/status", "online")  # Home Assistant's birth message after it (re)started
        assert wait_for(lambda: len(ha.on(topic)) == 2, 10), ha.messages
        assert ha.on(topic)[0][2] == ha.on(topic)[1][2]
        ha.client.publish("ha/status", "offline")
        assert not wait_for(lambda: len(ha.on(topic)) > 2, 1)
        assert stop(proc) < 10 and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        ha.close()


def _retained(port: int, topic: str) -> list:
    """What a client subscribing now gets from the broker's retained store."""
    sub = Subscriber(port, topic)
    try:
        wait_for(lambda: False, 1.0)  # retained messages arrive right after SUBACK; give them a second
        return [m for m in sub.messages if m[3]]
    finally:
        sub.close()


def test_removal_deletes_the_device_in_both_layouts(tmp_path, broker):
    write_folder(tmp_path / "imgs", 4)
    for mode in ("device", "component"):
        r = run_camera("--source", str(tmp_path / "imgs"), "--mqtt", broker.url, "--mqtt-device", "cam3", "--mqtt-discovery",
                       "--mqtt-discovery-mode", mode, *FAST)
        assert r.returncode == 0, r.stderr
    assert len(_retained(broker.port, "homeassistant/#")) == 1 + len(ha_discovery.ENTITIES)
    watch = Subscriber(broker.port, "homeassistant/#")
    try:
        # No model, no source opened: the source need not even exist.
        r = run_camera("--source", str(tmp_path / "nothing-here"), "--mqtt", broker.url, "--mqtt-device", "cam3",
                       "--mqtt-discovery-remove", timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Home Assistant discovery removed" in r.stderr
        live = lambda: [m for m in watch.messages if not m[3]]  # noqa: E731 - after the retained ones
        assert wait_for(lambda: len(live()) == 1 + len(ha_discovery.ENTITIES), 10), watch.messages
    finally:
        watch.close()
    assert {m[2] for m in live()} == {""}  # the empty payload deletes the device in Home Assistant
    assert sorted(m[1] for m in live()) == sorted(ha_discovery.removal_topics("cam3"))
    assert _retained(broker.port, "homeassistant/#") == []


def test_broker_down_at_start_gets_discovery_when_it_comes_up(tmp_path):
    pytest.importorskip("paho.mqtt")
    write_folder(tmp_path / "imgs", 10)
    port = free_port()
    stats_file = tmp_path / "stats.json"
    proc = start_camera("--source", str(tmp_path / "imgs"), "--loop", "--max-fps", "20", "--mqtt", f"mqtt://127.0.0.1:{port}",
                        "--mqtt-device", "late", "--mqtt-discovery", "--stats-interval", "0.3", "--stats-file", str(stats_file), *FAST)
    b = None

    def mqtt_failing() -> bool:
        try:
            return json.loads(stats_file.read_text())["sink_errors"]["mqtt"]["failing"]
        except (OSError, ValueError, KeyError):
            return False

    try:
        # The loop runs, and has tried the broker that is not there yet.
        assert wait_for(mqtt_failing, 120) and proc.poll() is None
        b = Mosquitto(tmp_path, port=port)
        ha = Subscriber(port, "homeassistant/#")
        states = Subscriber(port, "edge-quq/late/stats")
        try:
            assert wait_for(lambda: ha.messages, 60), b.diagnose()  # paho's reconnect backoff is at most 30 s
            assert wait_for(lambda: states.messages, 10)
        finally:
            ha.close()
            states.close()
        d = check_device_payload(ha.messages[0][2], "late")
        assert render(d["cmps"]["fps"]["value_template"], states.messages[-1][2]) != "None"
        assert stop(proc) < 10 and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if b is not None:
            b.stop()
    assert "cannot connect to broker" in proc.stderr.read()


@pytest.mark.parametrize("extra", [(), ("--mqtt-discovery-remove",)])
def test_bad_device_name_is_one_error_line_and_publishes_nothing(tmp_path, broker, extra):
    write_folder(tmp_path / "imgs", 2)
    sub = Subscriber(broker.port, "#")
    try:
        r = run_camera("--source", str(tmp_path / "imgs"), "--mqtt", broker.url, "--mqtt-device", "porch cam",
                       "--mqtt-discovery", *extra, *FAST, timeout=60)
        wait_for(lambda: False, 0.5)
    finally:
        sub.close()
    assert r.returncode == 2
    assert r.stderr.startswith("error: --mqtt-device 'porch cam': ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sub.messages == []


def test_removal_with_no_broker_is_one_error_line_exit_1(tmp_path):
    pytest.importorskip("paho.mqtt")
    r = run_camera("--source", str(tmp_path), "--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--mqtt-device", "cam",
                   "--mqtt-discovery-remove", timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --mqtt-discovery-remove: cannot connect to broker mqtt://127.0.0.1:")


def test_discovery_without_an_mqtt_output_is_refused(tmp_path):
    write_folder(tmp_path / "imgs", 2)
    r = run_camera("--source", str(tmp_path / "imgs"), "--mqtt-discovery", *FAST, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --mqtt-discovery needs an MQTT output (--mqtt URL or --output mqtt://...)"
