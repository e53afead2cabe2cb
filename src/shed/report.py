"""`shed report`: every experiment's eval accuracy as a Markdown table and a PNG per task
(accuracy against subset size, one line per method, full pool and base model as references).

    shed report                               # reads dvc.api.exp_show()
    shed report --json exps.json --out reports   # a saved dvc.api.exp_show() (a JSON list of rows)

Rows are grouped by fine-tuned model, so one curated dataset fine-tuned on two models
(finetune.model != shapley.model: transferability) shows as two groups. Experiments with
identical params are counted once; those differing only in seeds are averaged (mean ± std).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from shed.fileio import ShedError, read_json, write_text

log = logging.getLogger(__name__)

EVAL = "metrics/eval.json"
SAMPLE = "metrics/sample.json"
# dvc.api.exp_show flattens metrics to their keys, prefixed with the file only where two files share a key.
ACC = re.compile(rf"^(?:{re.escape(EVAL)}:)?(finetuned|base)\.(.+)\.acc$")


def param_keys() -> list[str]:
    """Every params.yaml key in dotted form (the config schema's fields)."""
    from shed.config import Params

    def walk(cls: type, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out += walk(type(default), f"{prefix}{f.name}.") if dataclasses.is_dataclass(default) \
                else [prefix + f.name]
        return out

    return walk(Params, "")


def _metric(row: dict, path: str, key: str):
    return row.get(f"{path}:{key}", row.get(key))


def runs(rows: list[dict]) -> list[dict]:
    """One row per distinct finished experiment: its params and eval accuracies. The workspace
    counts only when nothing else was evaluated (its metrics may predate its params)."""
    keys = param_keys()
    ordered = [r for r in rows if r.get("rev") != "workspace"] + [r for r in rows if r.get("rev") == "workspace"]
    out, seen = [], set()
    for row in ordered:
        params = {k: row[k] for k in keys if k in row}
        acc = {"finetuned": {}, "base": {}}
        for key, value in row.items():
            match = ACC.match(key)
            if match and key not in params and isinstance(value, (int, float)):
                acc[match[1]][match[2]] = float(value)
        if not params or not acc["finetuned"] or (row.get("rev") == "workspace" and out):
            continue  # queued, failed, never evaluated
        fingerprint = json.dumps(params, sort_keys=True, default=str)
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        fraction, size = _metric(row, SAMPLE, "fraction"), _metric(row, SAMPLE, "size")
        out.append({
            "name": row.get("Experiment") or str(row.get("rev", "?")), "method": params.get("sample.method", "?"),
            "fraction": float(fraction if fraction is not None else params.get("sample.subset_size", 0.0)),
            "records": int(size) if size is not None else None,
            "model": params.get("finetune.model", "?"), "valued_with": params.get("shapley.model", "?"),
            "acc": acc["finetuned"], "base": acc["base"],
        })
    return out


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

    def label(s: dict, name: str) -> str:
        return name if len(models) == 1 else f"{name} @ {s['model']}"

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


def load_rows(path: str | None) -> list[dict]:
    """Experiment rows: from `dvc.api.exp_show()` in this repository, or a saved list of them."""
    if path:
        data = read_json(path)
    else:
        import dvc.api
        from dvc.exceptions import DvcException

        try:
            data = dvc.api.exp_show()
        except DvcException as exc:
            raise ShedError(f"dvc.api.exp_show: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ShedError(f"{path or 'dvc.api.exp_show'}: expected a JSON list of experiment rows")
    return data


def main(json_path: str | None = None, out: str = "reports") -> None:
    """The report of every finished experiment -> `out`/report.md and `out`/accuracy-<task>.png."""
    summary = table(runs(load_rows(json_path)))
    if not summary:
        raise ShedError("no evaluated experiment found (run `dvc exp run` or `dvc queue start` first)")
    from shed import plots

    out = Path(out)
    write_text(out / "report.md", "# Eval accuracy by method and subset size\n\n" + markdown(summary))
    for task in sorted({t for s in summary for t in s["acc"]}):
        lines, refs = curves(summary, task)
        plots.accuracy_png(str(out / f"accuracy-{task}.png"), lines, refs, title=f"{task}: accuracy against subset size")
    log.info("%d rows from %d experiments -> %s/report.md", len(summary), sum(s["runs"] for s in summary), out)
