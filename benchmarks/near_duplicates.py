"""Semantic near-duplicates in a real pool: how many records cluster.dedup_threshold leaves out, with example
pairs; the last line printed is one JSON object.

    python benchmarks/near_duplicates.py [--shared ../shared] [--clusters 250] [--thresholds 0.95,0.9] \
        [--embed-models static:all-MiniLM-L6-v2,all-MiniLM-L6-v2]
    python benchmarks/near_duplicates.py --from-json docs/results/near_duplicates.json \
        --markdown docs/results/near_duplicates.md

prepare (the 5,000 Alpaca records of <shared>/data/instruction_pools/alpaca_5000.json, read in place) once,
embed once per --embed-models entry (`static:all-MiniLM-L6-v2` by default), then the cluster stage (seed 0) once
per threshold, in-process in a temporary directory. Per threshold: the near-duplicates listed in data/clusters/duplicates.csv, and --examples
pairs spread over their similarities (the lowest, the highest and evenly between), each with both records'
instructions and outputs (cut to --chars characters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import tables  # noqa: E402 (benchmarks/, the script's own folder)

tables.quiet_offline_env()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from shed.fileio import read_jsonl, setup_logging  # noqa: E402


def cut(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def examples(duplicates: pd.DataFrame, by_id: dict[str, dict], count: int, chars: int) -> list[dict]:
    """`count` pairs at evenly spaced ranks of similarity, lowest first (ties: the first id)."""
    ranked = duplicates.sort_values(["similarity", "id"], kind="stable").reset_index(drop=True)
    picks = sorted({int(round(i)) for i in np.linspace(0, len(ranked) - 1, min(count, len(ranked)))})
    out = []
    for i in picks:
        row = ranked.iloc[i]
        pair = {"similarity": float(row["similarity"])}
        for role, record_id in (("duplicate", row["id"]), ("kept", row["kept_id"])):
            record = by_id[record_id]
            pair[role] = {"id": record_id, "instruction": cut(record["instruction"] + " " + record["input"], chars),
                          "output": cut(record["output"], chars)}
        out.append(pair)
    return out


def measure(args) -> dict:
    raw = {"prepare": {"pool": str(Path(args.shared) / "data/instruction_pools/alpaca_5000.json")},
           "cluster": {"C": args.clusters}}
    seconds = {"prepare": tables.run_stage("prepare", raw)}
    by_id = {r["id"]: r for r in read_jsonl("data/prepared/pool.jsonl")}
    models = {}
    for model in args.embed_models:
        tables.set_dotted(raw, "embed.model", model)
        seconds[f"embed {model}"] = tables.run_stage("embed", raw)
        rows = models[model] = {}
        for threshold in args.thresholds:
            tables.set_dotted(raw, "cluster.dedup_threshold", threshold)
            seconds[f"cluster {model} {threshold}"] = tables.run_stage("cluster", raw)
            duplicates = pd.read_csv("data/clusters/duplicates.csv", dtype={"id": str, "kept_id": str})
            rows[str(threshold)] = {"duplicates": len(duplicates),
                                    "fraction": round(len(duplicates) / len(by_id), 4),
                                    "examples": examples(duplicates, by_id, args.examples, args.chars)}
    return {"benchmark": "near_duplicates", "pool": "alpaca_5000.json", "records": len(by_id),
            "clusters": args.clusters, "models": models, "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def markdown(result: dict, source: str | None) -> str:
    lines, origin = tables.header("near_duplicates.py", source)
    lines += [f"# Near-duplicates in {result['pool']}", "",
              f"{result['records']} records, cluster.C = {result['clusters']} (seed 0); from {origin}.", "",
              "| embed.model | cluster.dedup_threshold | left out | share of the pool |", "| --- | --- | --- | --- |"]
    lines += [f"| `{model}` | {t} | {row['duplicates']} | {row['fraction']:.2%} |"
              for model, rows in result["models"].items() for t, row in rows.items()]
    for model, rows in result["models"].items():
        for t, row in rows.items():
            lines += ["", f"## `{model}` at {t}: pairs, lowest similarity first", "",
                      "| similarity | left out | kept |", "| --- | --- | --- |"]
            for pair in row["examples"]:
                cell = {role: f"{pair[role]['instruction']} → {pair[role]['output']}".replace("|", "\\|")
                        for role in ("duplicate", "kept")}
                lines.append(f"| {pair['similarity']:.4f} | {cell['duplicate']} | {cell['kept']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the folder holding data/")
    parser.add_argument("--embed-models", type=lambda s: s.split(","), default=["static:all-MiniLM-L6-v2"],
                        help="comma-separated embed.model values, each measured in turn")
    parser.add_argument("--clusters", type=int, default=250)
    parser.add_argument("--thresholds", type=lambda s: [float(t) for t in s.split(",")], default=[0.95, 0.9])
    parser.add_argument("--examples", type=int, default=4, help="pairs shown per threshold")
    parser.add_argument("--chars", type=int, default=90, help="characters of each field shown")
    tables.add_arguments(parser)
    args = parser.parse_args()
    if tables.render_saved(args, markdown):
        return
    setup_logging()
    args.shared = os.path.abspath(args.shared)
    with tempfile.TemporaryDirectory(prefix="shed-dedup-") as tmp:
        os.chdir(tmp)
        result = measure(args)
    if args.markdown:
        tables.write_markdown(markdown(result, None), args.markdown)
    print(json.dumps(result, sort_keys=True, ensure_ascii=False))


if __name__ == "__main__":
    main()
