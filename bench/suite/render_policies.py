"""Markdown and figures of the suite's issue-14 section (results["policies"])."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from bench.suite.plots import heatmap

POLICY_FIGURES = ("policy_ignore_rates.png", "drift_frames_to_alarm.png")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(v) -> str:
    return "-" if v is None or v[0] is None else f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _met(m) -> str:
    return {True: "**met**", False: "**missed**", None: "not measured at this size"}[m]


def _value(v) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.5g}"  # 0.98998 must not print as 0.99 beside a missed 99% target
    return str(v)


def _candidates(s: dict) -> str:
    c = s.get("candidate_gates") or []
    return "" if not c else "; candidate combined gates " + ", ".join(f"`gated[{'+'.join(x)}]`" for x in c) + " (paper rule + that set)"


def verdict_lines(p: dict) -> List[str]:
    return [f"{t['target']}: {_met(t['met'])} ({_value(t['value'])})." for t in p["targets"]]


def markdown(r: dict) -> List[str]:
    p = r.get("policies")
    if not p:
        return ["## Decision policies (issue 14)", "", "Not run (no detectors in the bundle, or --no-policies).", ""]
    s = p["settings"]
    md = ["## Decision policies (issue 14)", "",
          f"Calibration/test split of the clean set (seeded): {s['n_calibration']} calibration, {s['n_test']} test images. "
          f"Gate: conformal p-values against the calibration split's detector scores, alpha = {s['alpha']}; single-detector gates "
          f"`gate:NAME` (paper rule + that detector's gate), combined gate `gated` (paper rule + {s['combine']} of "
          f"{', '.join(s['gate_detectors'])}){_candidates(s)}. `maxprob@paper-coverage`: MC-mean max probability above the threshold that keeps "
          f"the paper rule's share of the calibration split. `risk@X%`: combined gate, then the LTT threshold "
          f"(delta = {s['risk_delta']}) on {s['risk_score']}, calibrated on the calibration images the rule and the gate keep.", "",
          "### Against the issue's targets", "",
          "Clean and far-OOD targets: the policies as the bundle ships them (next section); guarantees: the random splits.", "",
          _table(["target", "result", "measured"],
                                                          [[t["target"], _met(t["met"]), _value(t["value"])] for t in p["targets"]]), ""]
    md += _md_shipped(p)
    md += ["### Clean test split (95% bootstrap intervals over test images)", "",
           _table(["policy", "coverage %", "95% CI", "error among kept %", "95% CI", "kept"], _rate_rows(p["clean"])), "",
           "Risk thresholds on the main split: " + "; ".join(f"{k}: {_value(v)}" for k, v in p["calibration"]["risk"].items()), ""]
    sp = p["splits"]
    md += [f"### Over {sp['splits']} random calibration/test splits ({sp['n_calibration']} / {sp['n_test']})", "",
           f"Gate false-ignore rate on in-distribution test images. `> binomial`: share of splits above "
           f"{100 * sp['alpha_binomial_limit']:.2f}% (alpha plus the 95% binomial margin of {sp['n_test']} test images); "
           f"`> binomial + cal.`: above {100 * sp['alpha_binomial_and_calibration_limit']:.2f}% (the margin also counting the "
           "calibration draw, which moves the rate of a fixed split by about sqrt(alpha / n)).", "",
           _table(["gate", "mean rate %", "max rate %", "> binomial %", "> binomial + cal. %"],
                  [[k, _pct(v["mean_rate"]), _pct(v["max_rate"]), _pct(v["exceed_binomial"]), _pct(v["exceed_binomial_and_calibration"])]
                   for k, v in sp["gate"].items()]), "",
           "Risk: a split violates the target when the error among its kept test images is above the target; that "
           "includes the test half's own sampling noise (and the two halves of one pool of images are anti-correlated), "
           "so the second column counts only violations beyond the one-sided 95% binomial margin of the kept count.", "",
           _table(["risk policy", "violated in % of splits (must be <= delta)", "beyond binomial margin %", "unreachable splits",
                   "mean error kept %", "mean coverage %", "min coverage %"],
                  [[k, _pct(v["violation_rate"]), _pct(v.get("violation_beyond_binomial_margin")), v["unreachable_splits"],
                    _pct(v["mean_error_kept"]), _pct(v["mean_coverage"]), _pct(v["min_coverage"])] for k, v in sp["risk"].items()]), ""]
    md += _md_population(p)
    return md + _md_shift(p) + _md_drift(p, r)


def _md_population(p: dict) -> List[str]:
    pop = p.get("population")
    if not pop:
        return []
    return [f"### The risk guarantee on {pop['resamples']} i.i.d. calibration draws", "",
            f"The clean set as the population: each calibration set is {pop['n_calibration']} draws with replacement from it "
            "(exactly LTT's i.i.d. premise), the gate and the threshold are calibrated on the draw, and the error among kept is "
            "computed on the whole population, so no test-sample noise enters. Violated: the population's error among kept "
            "is above the target (must happen in at most delta of the draws).", "",
            _table(["risk policy", "violated in % of draws", "95% CI", "mean coverage %"],
                   [[k, _pct(v["violation_rate"]), _ci(v["violation_ci95"]), _pct(v["mean_coverage"])] for k, v in pop["risk"].items()]), ""]


def _rate_rows(tab: dict) -> List[List[str]]:
    return [[k, _pct(v["coverage"]), _ci(v["coverage_ci95"]), _pct(v["error_kept"]), _ci(v["error_kept_ci95"]), v["kept"]]
            for k, v in tab.items()]


def _md_shipped(p: dict) -> List[str]:
    sh = p.get("shipped")
    if not sh:
        return []
    pols = list(sh["clean"])
    md = ["### As the bundle ships them (no options)", "",
          f"The bundle's own gate ({p['settings']['combine']} of {', '.join(p['settings']['gate_detectors'])}, alpha "
          f"{sh['alpha']}) against its own calibration data (gate.npz, not from the test set), and `risk@X%` with the threshold "
          "LTT picks from the bundle's stored table, on the whole clean test set: what `edge-quq predict` does with no options "
          "(`gated`) and with `--target-error X`. 95% bootstrap intervals over test images. Risk thresholds: "
          + "; ".join(f"{k}: {_value(v)}" for k, v in sh["risk"].items()), "",
          _table(["policy", "coverage %", "95% CI", "error among kept %", "95% CI", "kept"], _rate_rows(sh["clean"])), "",
          "Far-OOD sets, ignored %:", "",
          _table(["policy"] + list(sh["far"]), [[k] + [_pct(sh["far"][s][k]["ignore_rate"]) for s in sh["far"]] for k in pols]), ""]
    rows = [[f"{name} {sev}"] + [f"{_pct(v[k]['ignore_rate'])} / {_pct(v[k]['error_kept'])}" for k in pols]
            for name, sevs in sh["shifted"].items() for sev, v in sevs.items() if sev == max(sevs, key=int)]
    return md + ["Corruptions at the highest severity, ignored % / error among kept %:", "", _table(["set"] + pols, rows), ""]


def _md_shift(p: dict) -> List[str]:
    pols = list(p["clean"])
    md = ["### Far-OOD sets: ignored %", "", "Every kept far-OOD prediction is wrong (no class applies), so only the ignore rate is shown.", "",
          _table(["policy"] + list(p["far"]), [[k] + [_pct(p["far"][s][k]["ignore_rate"]) for s in p["far"]] for k in pols]), ""]
    md += ["### Corruptions: ignored % / error among kept %", ""]
    rows = []
    for name, sevs in p["shifted"].items():
        for sev, v in sevs.items():
            rows.append([f"{name} {sev}"] + [f"{_pct(v[k]['ignore_rate'])} / {_pct(v[k]['error_kept'])}" for k in pols])
    return md + [_table(["set"] + pols, rows), ""]


def _md_drift(p: dict, r: dict) -> List[str]:
    d, s = p["drift"], p["settings"]
    fa = d["false_alarms"]
    md = ["### Drift alarm", "",
          f"DriftMonitor at its defaults (delta_drift = {s['drift_delta']}, scene feed on backbone features), fed per frame with "
          f"drift_pvalues of the `{s['drift_detector']}` detector's conformal p-value ({s['drift_calibration']} calibration scores "
          f"from the calibration split). A stream is a seeded random order of a set's images, watched for at most "
          f"{s['drift_max_frames']} frames; frames to alarm counts every frame shown (fed or not). `-`: no alarm at that quantile.", "",
          f"Clean streams: {fa['frames']} frames each, {fa['seeds']} seeds, each with a fresh draw of {fa['n_calibration']} "
          f"calibration images and a random order of the other {fa['pool']} (cycled when the stream is longer): alarm in "
          f"{fa['seeds_with_alarm']} of {fa['seeds']} seeds (no-alarm rate {_pct(fa['no_alarm_rate'])}%; alarm frames "
          f"{fa['alarm_frames']}); {_pct(fa['mean_fed_fraction'])}% of frames fed.", ""]
    cells = r["corruptions"]["cells"]
    sevs = sorted({sv for v in d["frames_to_alarm"].values() for sv in v}, key=int)
    rows = []
    for name, v in d["frames_to_alarm"].items():
        acc = cells.get(name, {}).get(sevs[-1], {}).get("acc_plain")
        rows.append([name] + [f"{v[sv]['median'] or '-'} / {v[sv]['p90'] or '-'}" if sv in v else "" for sv in sevs] + [_pct(acc)])
    md += [_table(["corruption"] + [f"sev {sv}: median / p90" for sv in sevs] + [f"accuracy % at sev {sevs[-1]}"], rows), ""]
    c = p["cost"]
    md += ["### Cost of the decision (bench/bench_gate.py)", "",
           f"{c['detectors']} detectors, {c['calibration']} calibration scores, combined by {c.get('rule', 'bonferroni')}, "
           f"{c['repeats']} calls; microseconds per sample "
           "(median / mean / p99 / best block mean):", "",
           _table(["step", "p50", "mean", "p99", "best"],
                  [[k, v["p50_us"], v["mean_us"], v["p99_us"], v["best_us"]] for k, v in c.items() if isinstance(v, dict)]), ""]
    return md


def figures(r: dict, out: Path) -> None:
    p = r.get("policies")
    if not p:
        return
    import matplotlib.pyplot as plt

    pols = list(p["clean"])
    sets = ["clean test"] + list(p["far"]) + [f"{n} 5" for n in p["shifted"] if "5" in p["shifted"][n]]
    m = np.array([[1 - p["clean"][k]["coverage"]] + [p["far"][s][k]["ignore_rate"] for s in p["far"]]
                  + [p["shifted"][n]["5"][k]["ignore_rate"] for n in p["shifted"] if "5" in p["shifted"][n]] for k in pols], float)
    heatmap(m, pols, sets, "Ignored (%) per policy: clean, far-OOD, corruptions at severity 5", out / POLICY_FIGURES[0], 0.0, 1.0,
            (0.45 * len(sets) + 4, 0.35 * len(pols) + 2.5), fontsize=6, rotation=60)

    fta = p["drift"]["frames_to_alarm"]
    fig, ax = plt.subplots(figsize=(7, 5))
    cap = p["settings"]["drift_max_frames"]
    cmap = plt.get_cmap("tab20")
    for i, (name, v) in enumerate(fta.items()):
        ks = sorted(v, key=int)
        ax.plot([int(k) for k in ks], [v[k]["median"] if v[k]["median"] is not None else cap for k in ks], marker="o", ms=3, lw=1,
                color=cmap(i % 20), ls="-" if i < 10 else "--", label=name)
    ax.axhline(20, color="k", ls="--", lw=0.8)
    ax.set_yscale("log"); ax.set_xlabel("severity"); ax.set_ylabel(f"median frames to alarm (no alarm: {cap})")
    ax.set_title("Drift alarm on corrupted streams"); ax.legend(fontsize=6, ncol=2); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(out / POLICY_FIGURES[1], dpi=120); plt.close(fig)
