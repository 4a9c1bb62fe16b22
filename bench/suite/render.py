"""Markdown and PNG rendering of the suite's results dict (report.json is the source of truth)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from bench.suite import render_policies
from bench.suite.core import SCORE_LABELS
from bench.suite.plots import heatmap

FIGURES = ("risk_coverage.png", "reliability.png", "ignore_vs_severity.png", "corruption_f1.png", "ood_auroc.png",
           "corruption_examples.png")


def _f(v, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _label(s: str) -> str:
    return SCORE_LABELS.get(s, s.replace("det_", "detector: "))


def verdict(results: dict) -> List[str]:
    """Plain sentences: does the paper's rule beat thresholding max probability at equal coverage?"""
    out = []
    wins, losses, ties = 0, 0, 0
    for r in results["grid"]:
        lo, hi = r["rule_minus_maxprob_plain_ci95"]
        if lo is None:
            continue
        if hi < 0:
            wins += 1
        elif lo > 0:
            losses += 1
        else:
            ties += 1
    out.append(f"Across the {len(results['grid'])} (z, T) cells, the paper's rule has a lower selective risk than keeping the same "
               f"number of samples by plain max probability in {wins}, a higher one in {losses}, and no difference "
               f"distinguishable by a 95% paired bootstrap interval in {ties}.")
    sweep = results["selective"]["rule_sweep"]
    diffs = [s["risk"] - s["risk_max_prob_plain"] for s in sweep if s["risk"] is not None and s["risk_max_prob_plain"] is not None
             and 0.05 < s["coverage"] < 0.999]
    if diffs:
        out.append(f"Over the z sweep (T={results['selective']['T']}), the rule's risk minus plain max-prob's risk at the same coverage "
                   f"ranges from {min(diffs) * 100:+.2f} to {max(diffs) * 100:+.2f} points (mean {np.mean(diffs) * 100:+.2f}).")
    aurc = results["selective"]["aurc"]
    best = min(aurc, key=lambda k: aurc[k] if aurc[k] is not None else 9)
    out.append(f"Lowest AURC: {_label(best)} ({aurc[best]:.5f}); plain max probability: {aurc['max_prob_plain']:.5f}.")
    return out


def write_markdown(r: dict) -> str:
    md: List[str] = []
    for section in (_md_header, _md_sizes, _md_grid, _md_corruptions, _md_e2e, _md_selective, _md_ood, _md_calibration,
                    render_policies.markdown):
        md += section(r)
    return "\n".join(md) + "\n"


def _md_header(r: dict) -> List[str]:
    """Title, command, bundle, samples, machine and the verdict."""
    s = r["settings"]
    md = [f"# Benchmark suite report ({r['dataset']})", "",
          f"Command: `{r['command']}`  ", f"Wall time: {r['wall_seconds']} s; quick mode: {r['quick']}; seed {r['seed']}.  ",
          f"Bundle: `{r['bundle']['name']}` (manifest sha256 `{r['bundle']['manifest_sha256'][:16]}...`), backbone: "
          f"{r['bundle']['backbone_backend']}; decision defaults {r['bundle']['decision_defaults']}.  ",
          f"Samples: clean {r['clean']['n']}, per corrupted set {s['corrupt_samples']}, per far-OOD set {s['ood_samples']}; "
          f"bootstrap resamples {s['bootstrap_reps']}.  ",
          f"Machine: {r['machine'].get('platform')}, {r['machine'].get('cpus')} CPUs, load average at start "
          f"{r['machine'].get('load_average_start')} / end {r['machine'].get('load_average_end')}; numpy {r['machine'].get('numpy')}, "
          f"onnxruntime {r['machine'].get('onnxruntime')}, ai-edge-litert {r['machine'].get('ai_edge_litert', '-')}, "
          f"OpenCV {r['machine'].get('opencv')}.  ", f"Timings (s): {r.get('timings_s')}", ""]
    md += ["## Verdict", ""] + ["- " + v for v in verdict(r)] + [""]
    if r.get("policies"):
        md += ["Decision policies (issue 14) against the issue's targets:", ""]
        md += ["- " + v for v in render_policies.verdict_lines(r["policies"])] + [""]
    return md


def _md_sizes(r: dict) -> List[str]:
    """Tables I-II: model size and accuracy, float vs int8 (when the run measured them)."""
    md: List[str] = []
    if r.get("sizes"):
        md += ["## Table I: model size, float vs int8", "",
               _table(["model", "file", "bytes", "KiB"], [[x["model"], x["file"], x["bytes"], f"{x['bytes'] / 1024:.1f}"] for x in r["sizes"]["rows"]]), ""]
    if r.get("accuracy"):
        a = r["accuracy"]
        fl = a["float"].get("accuracy", a["float"].get("error"))
        man = a.get("bundle_manifest") or {}
        acc = lambda d: _f(d.get("accuracy", d.get("error"))) if d else "-"
        md += ["## Table II: accuracy, float vs int8", "",
               f"Same {a['float'].get('n', '')} test samples for every row; the manifest column is the full test set at export.", "",
               _table(["model", "accuracy (this run)", "accuracy (bundle manifest)"],
                      [["float32 Keras", _f(fl), _f(man.get("float"))],
                       ["int8 TFLite backbone + head, no dropout", acc(a.get("int8_tflite")), _f(man.get("int8_tflite"))],
                       ["int8 ONNX backbone + head, no dropout", acc(a.get("int8_onnx")), _f(man.get("int8_onnx"))]]), ""]
    return md


def _md_grid(r: dict) -> List[str]:
    """Tables III-V: the z x T grid."""
    md: List[str] = []
    md += ["## Tables III-V: the z x T grid on the clean test set", "",
           "micro-F1 over the kept samples (multi-hot: the classes the rule keeps a sample as, vs the one-hot label), "
           "number ignored I, Misclassified(%) = MI / I (ignored samples the plain int8 model gets wrong), with 95% "
           "percentile-bootstrap intervals. Last columns: selective risk (error rate among kept) of the rule and of plain "
           "max probability keeping the same number of samples, and the paired-bootstrap 95% interval of their difference "
           "(negative = the rule is better).", ""]
    rows = []
    for g in r["grid"]:
        ci = g["micro_f1_kept_ci95"]
        ici = g["ignored_ci95"]
        d = g["rule_minus_maxprob_plain_ci95"]
        rows.append([g["z"], g["T"], f"{_f(g['micro_f1_kept'])} [{_f(ci[0])}, {_f(ci[1])}]", f"{g['ignored']} [{ici[0]}, {ici[1]}]",
                     _f(g["misclassified_pct"], 2), _pct(g["selective_risk_rule"]), _pct(g["risk_at_same_coverage"]["max_prob_plain"]),
                     f"[{_pct(d[0])}, {_pct(d[1])}]"])
    md += [_table(["z", "T", "micro-F1 kept [95% CI]", "ignored I [95% CI]", "Misclassified(%)", "risk rule %", "risk max-prob %",
                   "rule - max-prob (pts) 95% CI"], rows), ""]
    return md


def _md_corruptions(r: dict) -> List[str]:
    """Tables VI-XIII: corruptions."""
    md: List[str] = []
    c = r["corruptions"]
    cells = c["cells"]
    md += [f"## Tables VI-XIII: corruptions (z={c['z']}, T={c['T']})", "",
           "Per corruption type at severities 1 and 5: micro-F1 without UQ (plain int8 model, classes with probability > threshold), "
           "micro-F1 with UQ (kept samples), number ignored, Misclassified(%)." +
           (" Corruptions are this project's numpy/OpenCV re-implementation on 28x28 gray (docs/bench.md lists the unfaithful ones)."
            if c["synthetic"] else " Corruptions: CIFAR-100-C files."), ""]
    for sev in ("1", "5"):
        rows = [[name, _f(v[sev]["f1_plain"]), _f(v[sev]["f1_uq"]), v[sev]["ignored"], _f(v[sev]["misclassified_pct"], 2)]
                for name, v in cells.items() if sev in v]
        md += [f"### Severity {sev}", "", _table(["corruption", "F1 without UQ", "F1 with UQ", "# ignored", "Misclassified(%)"], rows), ""]
    sevs = sorted({k for v in cells.values() for k in v}, key=int)
    md += ["### Ignore rate (%) against severity", "",
           _table(["corruption"] + [f"sev {k}" for k in sevs], [[n] + [_pct(v[k]["ignore_rate"]) for k in sevs] for n, v in cells.items()]),
           "", _table(["mean over types"] + [f"sev {k}" for k in sevs],
                      [["ignore rate %"] + [_pct(float(np.mean([v[k]["ignore_rate"] for v in cells.values()]))) for k in sevs],
                       ["accuracy plain %"] + [_pct(float(np.mean([v[k]["acc_plain"] for v in cells.values()]))) for k in sevs],
                       ["accuracy kept %"] + [_pct(float(np.nanmean([v[k]["acc_uq_kept"] if v[k]["acc_uq_kept"] is not None else np.nan for v in cells.values()]))) for k in sevs]]),
           "", "Figures: `ignore_vs_severity.png`, `corruption_f1.png`, `corruption_examples.png`.", ""]
    return md


def _md_e2e(r: dict) -> List[str]:
    """Table XIV, copied from the latency report."""
    md: List[str] = []
    e2e = r.get("e2e")
    md += ["## Table XIV: inference time of one sample, plain vs UQ", ""]
    if e2e is None:
        md += [f"Missing: the end-to-end latency report `{r['e2e_source']}` did not exist when this report was made "
               "(another bench script writes it; re-run the suite after it).", ""]
    else:
        md += [f"From `{r['e2e_source']}` as it was when this report was made (copied whole into report.json under `e2e`; "
               "the latency bench's own report explains its method and load).", "", _e2e_summary(e2e), ""]
    return md


def _md_selective(r: dict) -> List[str]:
    """Selective prediction and the rule swept over z."""
    md: List[str] = []
    sel = r["selective"]
    md += [f"## Selective prediction (clean test set, T={sel['T']})", "",
           "AURC = mean selective risk over all coverages (lower is better). Each score keeps the samples it trusts most; its "
           "prediction is the plain argmax for scores of the plain pass, the MC-mean argmax for MC scores. Figure: `risk_coverage.png`.", "",
           _table(["score", "AURC", "accuracy at full coverage"],
                  [[_label(k), _f(v, 5), _pct(sel["accuracy_full_coverage"][k])] for k, v in sorted(sel["aurc"].items(), key=lambda kv: kv[1])]), "",
           "The paper's rule swept over z: coverage and risk of the rule vs max probability keeping as many samples.", "",
           _table(["z", "coverage %", "risk rule %", "risk max-prob plain %", "risk max-prob MC %"],
                  [[x["z"], _pct(x["coverage"]), _pct(x["risk"]), _pct(x["risk_max_prob_plain"]), _pct(x["risk_max_prob_mc"])]
                   for x in sel["rule_sweep"] if x["z"] in (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)]), ""]
    return md


def _md_ood(r: dict) -> List[str]:
    """OOD detection: far and shifted sets, the rule as a detector."""
    md: List[str] = []
    o = r["ood"]
    md += ["## OOD detection", "",
           f"In-distribution: {o['id']} ({o['n_id']} samples). OpenOOD v1.5 convention: OOD is the positive class for AUROC and "
           "AUPR-out, ID for AUPR-in; FPR@95 = share of ID samples flagged at the threshold that catches 95% of the OOD set. "
           "All numbers in %.", ""]
    for name, tab in o["far"].items():
        md += [f"### Far-OOD: {name} ({o.get('far_sizes', {}).get(name, o['n_far'])} samples)", "", _ood_rows(tab), ""]
    for sev, tab in o["shifted_mean_by_severity"].items():
        if sev in ("1", "3", "5"):
            md += [f"### Shifted: corruptions at severity {sev}, mean over the types", "", _ood_rows(tab), ""]
    md += ["Per corrupted set: report.json `ood.shifted_by_set`. Figure: `ood_auroc.png`.", "",
           "The paper's rule as a detector (share of each set it ignores):", "",
           _table(["set", "ignored %"], [[k, _pct(v)] for k, v in o["rule_ignore_rate"].items()]), ""]
    return md


def _md_calibration(r: dict) -> List[str]:
    """Calibration on the clean test set."""
    md: List[str] = []
    md += ["## Calibration (clean test set)", "",
           "ECE with 15 equal-width bins of the head's own confidence (its largest output); NLL, Brier and a second ECE on the "
           "outputs normalised to sum to 1 (a sigmoid head's outputs need not). Figure: `reliability.png`.", "",
           _table(["probabilities", "accuracy %", "mean confidence", "ECE (max output)", "ECE (normalised)", "NLL", "Brier"],
                  [[k, _pct(v["accuracy"]), _f(v["mean_confidence"]), _f(v["ece_max_output"]), _f(v["ece_normalised"]),
                    _f(v["nll_normalised"]), _f(v["brier_normalised"])] for k, v in r["calibration"].items()]), ""]
    return md

def _ood_rows(tab: Dict[str, dict]) -> str:
    rows = [[_label(k), _pct(v["auroc"]), _pct(v["aupr_in"]), _pct(v["aupr_out"]), _pct(v["fpr95"])]
            for k, v in sorted(tab.items(), key=lambda kv: -(kv[1]["auroc"] or 0))]
    return _table(["score", "AUROC", "AUPR-in", "AUPR-out", "FPR@95"], rows)


def _e2e_summary(e2e) -> str:
    """Table XIV from the latency report's `summary` (per model: plain, naive whole-network MC, head-only UQ
    per sampler); the raw JSON when it has no summary in that shape."""
    import json

    summ = e2e.get("summary") if isinstance(e2e, dict) else None
    rows = []
    if isinstance(summ, dict):
        for model, v in summ.items():
            if not isinstance(v, dict) or "uq_ms_T50" not in v:
                continue
            for sampler, ms in v["uq_ms_T50"].items():
                rows.append([model, _f(v.get("plain_ms"), 1), _f(v.get("naive_ms_T50"), 1), sampler, _f(ms, 1),
                             _f((v.get("ratio_uq_plain_T50") or {}).get(sampler), 3), _f((v.get("speedup_vs_naive_T50") or {}).get(sampler), 1)])
    if rows:
        return _table(["model", "plain ms", "MC over the whole network, T=50, ms (the paper's way)", "head sampler", "UQ T=50 ms",
                       "UQ / plain (the latency report's ratio)", "speed-up vs whole-network MC"], rows)
    text = json.dumps(e2e, indent=1)
    return "```\n" + (text if len(text) < 4000 else text[:4000] + "\n... (truncated; full report in report.json)") + "\n```"


def write_figures(r: dict, figs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # risk-coverage
    sel = r["selective"]
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("tab20")
    for i, (name, cv) in enumerate(sel["curves"].items()):
        ax.plot(cv["coverage"], np.array(cv["risk"], float) * 100, lw=0.8 if name.startswith("det_") else 1.3,
                ls="--" if name.startswith("det_") else "-", color=cmap(i % 20), label=f"{_label(name)} (AURC {sel['aurc'][name]:.4f})")
    sw = [x for x in sel["rule_sweep"] if x["risk"] is not None]
    ax.plot([x["coverage"] for x in sw], [100 * x["risk"] for x in sw], "k--o", ms=3, label="paper's rule, z swept")
    for g in r["grid"]:
        if g["T"] == sel["T"]:
            ax.plot(g["coverage"], 100 * g["selective_risk_rule"], "r*", ms=10)
    ax.set_xlabel("coverage"); ax.set_ylabel("selective risk (%)"); ax.set_title("Risk-coverage (red stars: z in {0.7,0.8,0.9})")
    ax.set_xlim(0.5, 1.0); ax.legend(fontsize=6); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(out / "risk_coverage.png", dpi=120); plt.close(fig)

    # reliability
    cal = r["calibration"]
    fig, axes = plt.subplots(1, len(cal), figsize=(4 * len(cal), 4), squeeze=False)
    for ax, (name, v) in zip(axes[0], cal.items()):
        rb = v["reliability"]
        edges = np.linspace(0, 1, len(rb["count"]) + 1)
        acc = np.array([a if n else np.nan for a, n in zip(rb["accuracy"], rb["count"])], float)
        ax.bar(edges[:-1], acc, width=np.diff(edges), align="edge", edgecolor="k", alpha=0.7)
        ax.plot([0, 1], [0, 1], "r--")
        ax.set_title(f"{name}\nECE {v['ece_max_output']:.4f}", fontsize=9); ax.set_xlabel("confidence"); ax.set_ylabel("accuracy")
    fig.tight_layout(); fig.savefig(out / "reliability.png", dpi=120); plt.close(fig)

    # ignore rate and F1 vs severity
    cells = r["corruptions"]["cells"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, v in cells.items():
        ks = sorted(v, key=int)
        ax.plot([int(k) for k in ks], [100 * v[k]["ignore_rate"] for k in ks], marker="o", ms=3, lw=1, label=name)
    ax.set_xlabel("severity"); ax.set_ylabel("ignored (%)"); ax.set_title("Ignore rate against severity"); ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3); fig.tight_layout(); fig.savefig(out / "ignore_vs_severity.png", dpi=120); plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = list(cells)
    xs = np.arange(len(names))
    for i, (sev, key, lab) in enumerate((("1", "f1_plain", "sev 1 without UQ"), ("1", "f1_uq", "sev 1 with UQ"),
                                          ("5", "f1_plain", "sev 5 without UQ"), ("5", "f1_uq", "sev 5 with UQ"))):
        vals = [cells[n].get(sev, {}).get(key) for n in names]
        ax.bar(xs + (i - 1.5) * 0.2, [np.nan if v is None else v for v in vals], 0.2, label=lab)
    ax.set_xticks(xs); ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7); ax.set_ylabel("micro-F1"); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(out / "corruption_f1.png", dpi=120); plt.close(fig)

    # OOD AUROC per score and set
    o = r["ood"]
    sets = list(o["far"]) + [f"shift sev {s}" for s in ("1", "3", "5") if s in o["shifted_mean_by_severity"]]
    tabs = [o["far"][k] for k in o["far"]] + [o["shifted_mean_by_severity"][s] for s in ("1", "3", "5") if s in o["shifted_mean_by_severity"]]
    scores = list(tabs[0])
    m = np.array([[t[s]["auroc"] if t[s]["auroc"] is not None else np.nan for t in tabs] for s in scores], float)
    heatmap(m, [_label(s) for s in scores], sets, "OOD AUROC (%)", out / "ood_auroc.png", 0.3, 1.0,
            (1.2 * len(sets) + 3, 0.35 * len(scores) + 2))

    # corruption examples
    ex = figs.get("examples") or {}
    names = sorted({n for n, _ in ex}, key=lambda n: list(cells).index(n) if n in cells else 0)
    if names:
        sev_cols = sorted({s for _, s in ex})
        fig, axes = plt.subplots(len(sev_cols), len(names), figsize=(max(2.0, len(names) * 0.9), len(sev_cols) * 1.0 + 0.4),
                                 squeeze=False)
        for j, n in enumerate(names):
            for i, s in enumerate(sev_cols):
                ax = axes[i, j]
                if (n, s) in ex:
                    ax.imshow(ex[(n, s)], cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([]); ax.set_yticks([])
                if i == 0:
                    ax.set_title(n.replace("_", "\n"), fontsize=5)
                if j == 0:
                    ax.set_ylabel(f"sev {s}", fontsize=6)
        fig.tight_layout(); fig.savefig(out / "corruption_examples.png", dpi=120); plt.close(fig)
    render_policies.figures(r, out)
