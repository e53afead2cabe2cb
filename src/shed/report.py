"""`shed report`: every experiment's eval accuracy as a Markdown table and a PNG per task
(accuracy against subset size, one line per method, full pool and base model as references).

    shed report                               # runs `dvc exp show --json`
    shed report --json exps.json --out reports

Rows are grouped by fine-tuned model, so one curated dataset fine-tuned on two models
(finetune.model != shapley.model: transferability) shows as two groups. Experiments with
identical params are counted once; those differing only in seeds are averaged (mean ± std).
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np

from shed.fileio import ShedError, write_text

log = logging.getLogger(__name__)

PARAMS = "params.yaml"
EVAL = "metrics/eval.json"
SAMPLE = "metrics/sample.json"


def _entries(exp_show: list) -> list[tuple[str, dict]]:
    """(name, data) of each baseline commit, each experiment, then the workspace (dvc 3.x layout)."""
    out, workspace = [], []
    for commit in exp_show:
        if commit.get("rev") == "workspace":
            workspace = [("workspace", commit["data"])] if commit.get("data") else []
        elif commit.get("data"):
            out.append((commit.get("name") or commit.get("rev", "?")[:7], commit["data"]))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("data"):
                    out.append((rev.get("name") or exp.get("name") or rev.get("rev", "?")[:7], rev["data"]))
    return out + workspace


def _file_data(section: dict | None, path: str) -> dict:
    return ((section or {}).get(path) or {}).get("data") or {}


def runs(exp_show: list) -> list[dict]:
    """One row per distinct finished experiment: its params and eval accuracies."""
    rows, seen = [], set()
    for name, data in _entries(exp_show):
        params = _file_data(data.get("params"), PARAMS)
        evals = _file_data(data.get("metrics"), EVAL)
        if not params or not evals.get("finetuned") or (name == "workspace" and rows):
            continue  # queued, failed, never evaluated; the workspace (metrics may predate params) only alone
        key = json.dumps(params, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        sample, sampled = params.get("sample", {}), _file_data(data.get("metrics"), SAMPLE)
        rows.append({
            "name": name, "method": sample.get("method", "?"),
            "fraction": float(sampled.get("fraction", sample.get("subset_size", 0.0))), "records": sampled.get("size"),
            "model": params.get("finetune", {}).get("model", "?"), "valued_with": params.get("shapley", {}).get("model", "?"),
            "acc": {t: m["acc"] for t, m in evals["finetuned"].items() if "acc" in m},
            "base": {t: m["acc"] for t, m in (evals.get("base") or {}).items() if "acc" in m},
        })
    return rows


def table(rows: list[dict]) -> list[dict]:
    """Rows averaged over seeds: one per (model, valued_with, method, fraction), sorted."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["valued_with"], r["method"], round(r["fraction"], 6))].append(r)
    out = []
    order = sorted(groups, key=lambda k: (k[0], k[1], k[2] == "full", k[2], k[3]))  # full pool last
    for model, valued, method, fraction in order:
        members = groups[(model, valued, method, fraction)]
        acc = defaultdict(list)
        base = defaultdict(list)
        for m in members:
            for t, v in m["acc"].items():
                acc[t].append(v)
            for t, v in m["base"].items():
                base[t].append(v)
        out.append({"model": model, "valued_with": valued, "method": method, "fraction": fraction,
                    "records": members[0]["records"], "runs": len(members),
                    "acc": {t: (float(np.mean(v)), float(np.std(v))) for t, v in sorted(acc.items())},
                    "base": {t: float(np.mean(v)) for t, v in sorted(base.items())}})
    return out


def markdown(summary: list[dict]) -> str:
    tasks = sorted({t for s in summary for t in s["acc"]})
    head = ["fine-tuned model", "valued with", "method", "size", "records", "runs", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["model"], s["valued_with"], s["method"], f"{s['fraction']:.3g}", str(s["records"] or ""), str(s["runs"])]
        for t in tasks:
            mean, std = s["acc"].get(t, (float("nan"), 0.0))
            cells.append(f"{mean:.4f}" + (f" ± {std:.4f}" if s["runs"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    bases = {(s["model"], t): v for s in summary for t, v in s["base"].items()}
    if bases:
        lines += ["", "Base model without fine-tuning: " + "; ".join(
            f"{model} {t} {v:.4f}" for (model, t), v in sorted(bases.items()))]
    return "\n".join(lines) + "\n"


def curves(summary: list[dict], task: str) -> tuple[dict, dict]:
    """Plot inputs for plots.accuracy_png: sampled methods as lines, full pool and base as references."""
    models = {s["model"] for s in summary}
    label = (lambda s, name: name if len(models) == 1 else f"{name} @ {s['model']}")
    lines, refs = defaultdict(list), {}
    for s in summary:
        if task not in s["acc"]:
            continue
        mean, std = s["acc"][task]
        if s["method"] == "full":
            refs[label(s, "full pool")] = mean
        else:
            lines[label(s, s["method"])].append((s["fraction"], mean, std))
        if task in s["base"]:
            refs[label(s, "base")] = s["base"][task]
    return dict(lines), refs


def load_exp_show(path: str | None) -> list:
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        result = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if result.returncode != 0:
            raise ShedError(f"dvc exp show --json failed: {result.stderr.strip()[-500:]}")
        text = result.stdout
    start = text.find("[")  # dvc may print notices before the JSON
    try:
        data = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError as exc:
        raise ShedError(f"{path or 'dvc exp show --json'}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise ShedError(f"{path or 'dvc exp show --json'}: expected a JSON list of commits")
    return data


def main(json_path: str | None = None, out: str = "reports") -> None:
    """The report of every finished experiment -> `out`/report.md and `out`/accuracy-<task>.png."""
    summary = table(runs(load_exp_show(json_path)))
    if not summary:
        raise ShedError("no evaluated experiment found (run `dvc exp run` or `dvc queue start` first)")
    from shed import plots

    out = Path(out)
    write_text(out / "report.md", "# Eval accuracy by method and subset size\n\n" + markdown(summary))
    for task in sorted({t for s in summary for t in s["acc"]}):
        lines, refs = curves(summary, task)
        plots.accuracy_png(str(out / f"accuracy-{task}.png"), lines, refs, title=f"{task}: accuracy against subset size")
    log.info("%d rows from %d experiments -> %s/report.md", len(summary), sum(s["runs"] for s in summary), out)
