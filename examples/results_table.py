"""Read the JSON lines of a camera run (`edge-quq camera --output jsonl:PATH`) into a table: per top class,
frames kept and ignored, and the median latency.

    python examples/results_table.py results.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(lambda: {"keep": 0, "ignore": 0, "ms": []})
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        rec = json.loads(line)  # one processed frame: docs/camera.md lists the fields
        row = rows[rec["top_label"]]
        row[rec["decision"]] += 1
        row["ms"].append(rec["timings_ms"]["total"])

print(f"{'top class':14}{'frames':>8}{'kept':>8}{'ignored':>9}{'ignored %':>11}{'ms p50':>9}")
for label, row in sorted(rows.items(), key=lambda kv: -len(kv[1]["ms"])):
    n = len(row["ms"])
    print(f"{label:14}{n:8d}{row['keep']:8d}{row['ignore']:9d}{100 * row['ignore'] / n:10.1f}%{statistics.median(row['ms']):9.2f}")
total = [r for row in rows.values() for r in row["ms"]]
ignored = sum(row["ignore"] for row in rows.values())
print(f"{'all':14}{len(total):8d}{len(total) - ignored:8d}{ignored:9d}{100 * ignored / max(len(total), 1):10.1f}%"
      f"{statistics.median(total) if total else 0:9.2f}")
