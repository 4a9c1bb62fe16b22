"""Board health: CPU temperature and Raspberry Pi throttling, read from sysfs (vcgencmd as a fallback).

A Pi that is under-voltage or hot slows its CPU down and latency figures with it; the camera loop reports
these beside its latency so a slow board is explained, and warns when throttling is active.
"""
from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

THROTTLED_SYSFS = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")

# Bits of the Pi firmware's get_throttled word (documented with vcgencmd): 0..3 now, 16..19 since boot.
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
    16: "under_voltage_occurred",
    17: "arm_freq_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}


def cpu_temperature_c(root: str = "/sys/class/thermal") -> Optional[float]:
    """The CPU's thermal zone in °C (the 'cpu'/'soc' zone when named, else the first readable one)."""
    zones = sorted(glob.glob(f"{root}/thermal_zone*"))
    best: Optional[float] = None
    for z in zones:
        try:
            milli = int(Path(z, "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            kind = Path(z, "type").read_text().strip().lower()
        except OSError:
            kind = ""
        if any(k in kind for k in ("cpu", "soc", "x86_pkg")):
            return milli / 1000.0
        if best is None:
            best = milli / 1000.0
    return best


def throttled_word(sysfs: Path = THROTTLED_SYSFS) -> Optional[int]:
    """The Pi firmware's throttled flags, or None on boards that have none."""
    try:
        return int(sysfs.read_text().strip(), 16)
    except (OSError, ValueError):
        pass
    if shutil.which("vcgencmd"):
        try:
            out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=2).stdout
            return int(out.strip().split("=", 1)[1], 16)
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            return None
    return None


def decode_throttled(word: int) -> List[str]:
    return [name for bit, name in THROTTLE_BITS.items() if word & (1 << bit)]


def board_status() -> Dict[str, Any]:
    """{'temp_c': float|None, 'throttled': {'raw': '0x..', 'flags': [...], 'active': bool}|None}."""
    word = throttled_word()
    thr = None
    if word is not None:
        flags = decode_throttled(word)
        thr = {"raw": hex(word), "flags": flags, "active": bool(word & 0xF)}
    t = cpu_temperature_c()
    return {"temp_c": round(t, 1) if t is not None else None, "throttled": thr}


def throttle_warning(status: Dict[str, Any]) -> Optional[str]:
    thr = status.get("throttled")
    if thr and thr.get("active"):
        now = [f for f in thr["flags"] if not f.endswith("_occurred")]
        return f"board is throttling ({', '.join(now)}; get_throttled={thr['raw']}): latency is not representative; check power supply and cooling"
    return None
