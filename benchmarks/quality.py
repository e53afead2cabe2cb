"""Does SHED find the planted bad data, and does its 10% beat random and the full pool?

    python benchmarks/quality.py --seeds 1 2 3 --out plots/quality.png

For each seed (it sets prepare.embedded.seed, cluster.seed, shapley.seed, sample.seed and train.seed) the
pipeline runs in a temporary workspace with the repository's params.yaml: prepare/embed/cluster/
shapley once, then sample+finetune+evaluate per method and size. The base model is built once.
Prints the AUROC of the cluster scores for separating mostly corrupted clusters (>50% planted
harmful members, per truth.jsonl) from the rest, eval accuracy per method and size (mean ± std
over seeds), wall times, and last one JSON line. `--set key=value` overrides params (tuning).
`--valuations retrain inrun` values each seed's clusters both ways (same prepare/embed/cluster): AUROC,
shapley-stage seconds and the QOCS/QWCS accuracies per valuation, side by side.

`--markdown PATH` also writes the result tables as Markdown, from the dict printed as the JSON line;
`--from-json FILE` renders them from a saved JSON line (or a saved log ending in one) and runs nothing:

    python benchmarks/quality.py --from-json docs/results/quality.json --markdown docs/results/quality.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import tables  # benchmarks/, the script's own folder

tables.quiet_offline_env()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# The base model is built once (base.seed fixed) and shared by all seeds; everything else varies.
SEEDED = ["prepare.embedded.seed", "cluster.seed", "shapley.seed", "sample.seed", "train.seed"]
SHARED = ["prepare", "embed", "cluster", "shapley"]
KEEP = Path(os.environ["SHED_QUALITY_KEEP"]) if os.environ.get("SHED_QUALITY_KEEP") else None  # debug: keep workspaces


def auroc(scores: pd.DataFrame, assignments: pd.DataFrame, truth: list[dict]) -> float:
    """How well a low score flags a mostly corrupted cluster (NaN if all clusters are of one kind)."""
    from sklearn.metrics import roc_auc_score

    bad = {t["id"] for t in truth if t["corrupted"]}
    share = assignments.assign(bad=assignments["id"].isin(bad)).groupby("cluster")["bad"].mean()
    labels = (share.reindex(scores["cluster"]).to_numpy() > 0.5).astype(int)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, -scores["score"].to_numpy()))


def harm_in_bad_clusters(assignments: pd.DataFrame, truth: list[dict]) -> float:
    """Share of the planted harmful records that sit in mostly corrupted clusters: how well the
    clustering alone isolates harm (the ceiling for any cluster-level score)."""
    bad = assignments["id"].isin({t["id"] for t in truth if t["corrupted"]})
    share = bad.groupby(assignments["cluster"]).transform("mean")
    return float((bad & (share > 0.5)).sum() / max(bad.sum(), 1))


def finetune_and_score(raw: dict, method: str, size: float, with_base: bool) -> tuple[dict, float]:
    """sample -> finetune -> evaluate in the current workspace; (metrics/eval.json, seconds)."""
    raw = tables.with_method(raw, method)
    tables.set_dotted(raw, "sample.subset_size", size)
    tables.set_dotted(raw, "evaluate.include_base", with_base)
    seconds = sum(tables.run_stage(stage, raw) for stage in ["sample", "finetune", "evaluate"])
    return json.loads(Path("metrics/eval.json").read_text()), seconds


def one_seed(seed: int, base_raw: dict, methods: list[str], sizes: list[float], base_dir: Path,
             valuations: list[str]) -> dict:
    """One seed's workspace: prepare/embed/cluster once; per valuation (shapley.method) the shapley stage
    and the score-driven samplers; the other samplers and the full pool once. Run names are
    `method@size`, with `/valuation` after a score-driven method when more than one valuation runs."""
    from shed import artifacts
    from shed.fileio import read_jsonl

    raw = json.loads(json.dumps(base_raw))
    for key in SEEDED:
        tables.set_dotted(raw, key, seed)
    out = {"seconds": {}, "acc": {}, "valuations": {}}
    with tempfile.TemporaryDirectory(prefix=f"shed-quality-{seed}-") as ws:
        ws = KEEP / f"seed{seed}" if KEEP else Path(ws)
        ws.mkdir(parents=True, exist_ok=True)
        os.chdir(ws)
        shutil.copytree(base_dir / "models/base", "models/base", dirs_exist_ok=True)
        for stage in SHARED[:-1]:
            out["seconds"][stage] = tables.run_stage(stage, raw)
        assignments, _ = artifacts.read_clusters()
        truth = read_jsonl(artifacts.TRUTH)
        out["harm_in_bad_clusters"] = harm_in_bad_clusters(assignments, truth)
        for valuation in valuations:
            vraw = tables.with_valuation(raw, valuation)
            seconds = tables.run_stage("shapley", vraw)
            value = auroc(pd.read_csv("data/shapley/scores.csv"), assignments, truth)
            out["valuations"][valuation] = {"auroc": value, "shapley_s": seconds}
            out["seconds"]["shapley" if len(valuations) == 1 else f"shapley/{valuation}"] = seconds
            print(f"  seed {seed} shapley ({valuation}): AUROC {value:.3f} ({seconds:.0f} s)", flush=True)
            runs = [(valuation, m, s) for m in methods if tables.scored(m) for s in sizes]
            if valuation == valuations[-1]:  # the rest read no scores
                runs += [(None, m, s) for m in methods if not tables.scored(m) for s in sizes] + [(None, "full", 1.0)]
            for v, method, size in runs:
                metrics, t = finetune_and_score(vraw, method, size, with_base="base" not in out["acc"])
                task = next(iter(metrics["finetuned"]))
                tag = f"/{v}" if v is not None and len(valuations) > 1 else ""
                name = f"{method}{tag}@{size:g}" if method != "full" else "full"
                out["acc"][name] = metrics["finetuned"][task]["acc"]
                if "base" in metrics:
                    out["acc"]["base"] = metrics["base"][task]["acc"]
                out["seconds"][name] = t
                print(f"  seed {seed} {name}: acc {out['acc'][name]:.4f} ({t:.0f} s)", flush=True)
        out["auroc"] = out["valuations"][valuations[0]]["auroc"]
        os.chdir(ROOT)
    return out


def summarize(runs: list[dict], key: str) -> dict:
    values = [r[key] if key in ("auroc", "harm_in_bad_clusters") else r["acc"][key] for r in runs]
    return stats(values)


def stats(values: list[float]) -> dict:
    values = np.array(values, dtype=float)
    return {"mean": round(float(np.nanmean(values)), 4), "std": round(float(np.nanstd(values)), 4),
            "values": [round(float(v), 4) for v in values]}


PREFERRED = ["qocs", "qwcs", "random", "dsir", "cluster_uniform", "length", "perplexity"]


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _size_label(size: float) -> str:
    return f"{size * 100:g}% of the pool" if size <= 1 else f"{size:g} records"


def markdown(result: dict, source: str | None) -> str:
    """The benchmark's tables as Markdown, from the dict it prints as its JSON line."""
    head, origin = tables.header("quality.py", source)
    acc, seeds = result["acc"], result["seeds"]
    by_method: dict[str, dict[float, dict]] = {}
    for key, stat in acc.items():
        if "@" in key:
            method, size = key.split("@")
            by_method.setdefault(method, {})[float(size)] = stat
    sizes = sorted({s for v in by_method.values() for s in v})
    methods = sorted(by_method, key=lambda m: (PREFERRED.index(m.split("/")[0]) if m.split("/")[0] in PREFERRED
                                               else len(PREFERRED), m))
    seeds_text = ", ".join(map(str, seeds))
    first_valuation = f"; shapley.method {next(iter(result['valuations']))}" if result.get("valuations") else ""
    lines = head + [
        f"Source: {origin}. Seeds {seeds_text} (mean ± std over seeds; eval accuracy on the embedded",
        "default's four-choice eval questions, chance 0.25).",
        "",
        "| method | " + " | ".join(_size_label(s) for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_pm(by_method[m][s]) if s in by_method[m] else "" for s in sizes) + " |")
    for key, label in (("full", "full pool"), ("base", "base model, not tuned")):
        if key in acc:
            lines.append(f"| {label} | {_pm(acc[key])} |" + " |" * (len(sizes) - 1))
    lines += [
        "",
        (("AUROC of the cluster scores (mostly corrupted clusters score low): per valuation below. "
          if len(result.get("valuations", {})) > 1 else
          f"AUROC of the cluster scores (mostly corrupted clusters score low{first_valuation}): {_pm(result['auroc'])}. ")
         + f"Share of the planted harmful records in mostly corrupted clusters: {_pm(result['harm_in_bad_clusters'])}."),
        "",
        "Per seed:",
        "",
        "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    valuations = result.get("valuations", {})
    if len(valuations) > 1:  # side by side: each valuation's AUROC and shapley-stage seconds
        lines[-4:-4] = [
            "| valuation (shapley.method) | AUROC | shapley stage, s |", "|---|---|---|",
            *(f"| {v} | {_pm(f['auroc'])} | {_pm(f['shapley_s'])} |" for v, f in valuations.items()), ""]
        rows = [(f"AUROC ({v})", f["auroc"]) for v, f in valuations.items()]
    else:
        rows = [("AUROC", result["auroc"])]
    rows += [("harmful in mostly corrupted clusters", result["harm_in_bad_clusters"])]
    ordered = [f"{m}@{s:g}" for s in sizes for m in methods if f"{m}@{s:g}" in acc]
    rows += [(k, acc[k]) for k in ordered + [k for k in ("full", "base") if k in acc]]
    rows += [(k, acc[k]) for k in acc if k not in ordered and k not in ("full", "base")]
    for label, stat in rows:
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in stat["values"]) + f" | {_pm(stat)} |")
    seconds = result.get("seconds", {})
    if seconds:
        lines += ["", "Wall time in seconds (mean per seed; `base` once, `total` the whole run):", "",
                  "| " + " | ".join(seconds) + " |", "|" + "---|" * len(seconds),
                  "| " + " | ".join(f"{v:g}" for v in seconds.values()) + " |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--methods", nargs="+", default=["qocs", "qwcs", "random"])
    parser.add_argument("--valuations", nargs="+", choices=tuple(tables.VALUATIONS),
                        help="shapley.method(s) measured side by side on each seed (default: the params' own)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--base-model", help="reuse this built models/base (same base params) instead of building one")
    parser.add_argument("--out", default=str(ROOT / "plots/quality.png"), help="PNG of accuracy against size")
    tables.add_arguments(parser)
    args = parser.parse_args()
    if tables.render_saved(args, markdown):
        return
    logging.basicConfig(level=logging.WARNING)
    raw = yaml.safe_load(Path(args.params).read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        tables.set_dotted(raw, key, yaml.safe_load(value))
    valuations = args.valuations or [raw.get("shapley", {}).get("method", "retrain")]
    out_png = Path(args.out).resolve()
    markdown_path = str(Path(args.markdown).resolve()) if args.markdown else None  # the run changes directory
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="shed-quality-base-") as base_dir:
        os.chdir(base_dir)
        if args.base_model:
            shutil.copytree(args.base_model, "models/base")
            base_seconds = 0.0
        else:
            base_seconds = tables.run_stage("base", raw)
            print(f"base model built in {base_seconds:.0f} s", flush=True)
        for seed in args.seeds:
            print(f"seed {seed}", flush=True)
            runs.append(one_seed(seed, raw, args.methods, args.sizes, Path(base_dir), valuations))
        os.chdir(ROOT)
    keys = [k for k in runs[0]["acc"]]
    acc = {k: summarize(runs, k) for k in keys}
    result = {
        "auroc": summarize(runs, "auroc"),
        "harm_in_bad_clusters": summarize(runs, "harm_in_bad_clusters"),
        "acc": acc,
        "seeds": args.seeds,
        "valuations": {v: {"auroc": stats([r["valuations"][v]["auroc"] for r in runs]),
                           "shapley_s": stats([r["valuations"][v]["shapley_s"] for r in runs])} for v in valuations},
        "seconds": {k: round(float(np.mean([r["seconds"][k] for r in runs])), 1) for k in runs[0]["seconds"]}
        | {"base": round(base_seconds, 1), "total": round(time.perf_counter() - start, 1)},
    }
    print(f"\nAUROC (mostly-corrupted clusters get low scores): {result['auroc']['mean']:.3f} "
          f"± {result['auroc']['std']:.3f}; harmful records in mostly corrupted clusters: "
          f"{result['harm_in_bad_clusters']['mean']:.2f}")
    print(f"{'run':<14}{'acc mean':>10}{'std':>8}   per seed")
    for k, v in acc.items():
        print(f"{k:<14}{v['mean']:>10.4f}{v['std']:>8.4f}   {v['values']}")
    print("mean seconds per seed:", ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
    from shed.plots import accuracy_png

    curves: dict[str, list] = {}
    for k, v in acc.items():
        if "@" in k:
            method, size = k.split("@")
            curves.setdefault(method, []).append((float(size), v["mean"], v["std"]))
    refs = {name: acc[name]["mean"] for name in ("full", "base") if name in acc}
    out_png.parent.mkdir(parents=True, exist_ok=True)
    accuracy_png(str(out_png), curves, {f"{k} (mean)": v for k, v in refs.items()},
                 title=f"embedded default, seeds {args.seeds}")
    print(json.dumps(result, sort_keys=True))
    if markdown_path:
        tables.write_markdown(markdown(result, None), markdown_path)


if __name__ == "__main__":
    main()
