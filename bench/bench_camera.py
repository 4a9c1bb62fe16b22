"""The camera loop's throughput and memory, with the real command on a looping folder of Fashion-MNIST frames.

    python bench/bench_camera.py [--frames N] [--out bench/results]

Configurations, run one after another in one process tree so the figures compare like with like: results only
(--jsonl to a file), + annotated video, + HTTP view with one MJPEG client reading, + all of these. For each: the
loop's FPS (processed frames / wall time from first to last frame), per-stage p50/p99 from the final stats, and
RSS from the JSON lines at frame 500, 5,000 and the last. The source is a folder read as fast as the loop takes
it (no camera limits), so FPS here is the loop's ceiling on this machine, not a camera's rate.
Writes camera.json and camera.md into --out.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import click

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_folder(folder: Path, n: int) -> None:
    import cv2

    from edge_quq_export.datasets import load_fashion_mnist

    x = load_fashion_mnist("test", FASHION)[0][:n]
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(cv2.resize(img, (112, 112)), cv2.COLOR_GRAY2BGR))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mjpeg_reader(url: str, stop: threading.Event, counter: List[int]) -> None:
    for _ in range(100):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                while not stop.is_set():
                    chunk = r.read(65536)
                    if not chunk:
                        return
                    counter[0] += chunk.count(b"--frame")
            return
        except OSError:
            time.sleep(0.2)


def run(cfg: str, folder: Path, frames: int, work: Path) -> Dict[str, Any]:
    out, stats = work / f"{cfg}.jsonl", work / f"{cfg}.stats.json"
    args = [sys.executable, "-m", "edge_quq", "camera", "--source", str(folder), "--loop", "--frames", str(frames), "--jsonl", str(out),
            "--stats-file", str(stats), "--stats-interval", "5", "-q"]
    port = None
    if cfg in ("video", "all"):
        args += ["--video-out", str(work / f"{cfg}.avi")]
    if cfg in ("http", "all"):
        port = free_port()
        args += ["--serve", f"127.0.0.1:{port}"]
    stop, counter = threading.Event(), [0]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reader = None
    if port:
        reader = threading.Thread(target=mjpeg_reader, args=(f"http://127.0.0.1:{port}/stream.mjpg", stop, counter), daemon=True)
        reader.start()
    err = proc.communicate(timeout=3600)[1]
    stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"{cfg}: exit {proc.returncode}\n{err}")
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    st = json.loads(stats.read_text())
    wall = recs[-1]["ts"] - recs[0]["ts"]
    rss = {n: recs[n - 1]["rss_mb"] for n in (500, 5000, len(recs)) if n <= len(recs)}
    out.unlink()
    return {
        "config": cfg, "frames": len(recs), "fps": round((len(recs) - 1) / wall, 1) if wall > 0 else None,
        "latency_ms": st["latency_ms"], "rss_mb_at_frame": rss, "rss_growth_500_to_last_mb": round(rss[len(recs)] - rss[500], 2),
        "peak_rss_mb": st["peak_rss_mb"], "mjpeg_frames_received": counter[0] if port else None,
    }


@click.command(help=__doc__.split("\n\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--frames", type=int, default=10000, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "bench" / "results", show_default=True)
@click.option("--configs", default="jsonl,video,http,all", show_default=True)
def main(frames: int, out: Path, configs: str) -> None:
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        write_folder(work / "imgs", 100)
        rows = [run(c, work / "imgs", frames, work) for c in configs.split(",")]
    meta = {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_end": list(os.getloadavg()), "frames": frames, "bundle": "embedded default (Fashion-MNIST), default settings"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "camera.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = ["# Camera loop throughput and memory", "",
             f"Machine: {meta['machine']}, {meta['cpus']} cores, python {meta['python']}; load average at the end {[round(v, 2) for v in meta['load_average_end']]} "
             "(the machine is shared with other jobs: compare rows of this run with each other, not across runs).",
             f"Source: a folder of 100 Fashion-MNIST test images (112x112) with --loop, {frames} frames per configuration; {meta['bundle']}.", "",
             "| config | FPS | total p50 ms | total p99 ms | backbone p50 | head p50 | RSS @500 MB | RSS @5000 MB | RSS @last MB | growth 500->last MB | MJPEG frames read |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat, rss = r["latency_ms"], r["rss_mb_at_frame"]
        lines.append(f"| {r['config']} | {r['fps']} | {lat['total']['p50']} | {lat['total']['p99']} | {lat['backbone']['p50']} | {lat['head']['p50']} | "
                     f"{rss.get(500)} | {rss.get(5000)} | {rss[r['frames']]} | {r['rss_growth_500_to_last_mb']:+.2f} | {r['mjpeg_frames_received'] or '-'} |")
    lines += ["", "Latency percentiles cover the last 1,000 frames of each run (the loop's window). The latency is the",
              "predictor's (preprocess to decision); FPS also pays for capture, sinks and JSON lines."]
    (out / "camera.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
