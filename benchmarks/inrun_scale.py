"""In-run valuation at scale: the shapley stage with shapley.method inrun on many proxies, its wall and CPU
seconds and peak memory; the last line printed is one JSON object.

    python benchmarks/inrun_scale.py --model tiny --clusters 3000        # the embedded default's tiny Llama
    shed fetch-model && python benchmarks/inrun_scale.py --model smollm2 --clusters 200   # SmolLM2-135M
    python benchmarks/inrun_scale.py --from-json docs/results/inrun_scale.jsonl --markdown docs/results/inrun_scale.md

tiny: the embedded pool at 10 x C records, the base model of --base-model (default models/base; built by
`shed base` in the workspace when missing, timed apart), the repository's params otherwise.
smollm2: the first 10 x C records of <shared>/data/instruction_pools/alpaca_5000.json (read in place), the
model of `shed fetch-model` (models/smollm2), dev = --dev MMLU validation questions evenly spaced over
the subjects (<shared>/data/mmlu, written into the workspace as JSONL), train.max_length --max-length.
Both embed with static MiniLM (the embedding is not what is measured) and cluster with FAISS; each stage
runs as `shed <stage>` in its own process (benchmarks/scale.py's run_stage). `--set key=value` overrides a
param (e.g. shapley.k=1); the JSON line records every override.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

import tables  # benchmarks/, the script's own folder
from scale import ALPACA, run_stage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
MMLU = ROOT.parent / "shared/data/mmlu"
SMOLLM2 = ROOT / "models/smollm2"


def mmlu_dev(path: Path, count: int) -> None:
    """`count` MMLU validation questions, evenly spaced over the subjects (in name order), as our dev JSONL."""
    from shed.mcdata import mmlu_rows

    rows = mmlu_rows(MMLU, split="val")
    rows = [rows[i * len(rows) // count] for i in range(min(count, len(rows)))]
    path.write_text("".join(json.dumps({k: r[k] for k in ("question", "choices", "answer")}) + "\n" for r in rows),
                    encoding="utf-8")


def workspace_params(args, ws: Path) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings = {"embed.model": "static:all-MiniLM-L6-v2", "embed.backend": "torch", "cluster.C": args.clusters,
                "cluster.algorithm": "faiss", "shapley.method": "inrun"}
    if args.model == "tiny":
        settings.update({"prepare.embedded.pool_size": 10 * args.clusters, "shapley.model": "models/base",
                         "finetune.model": "models/base"})
    else:
        mmlu_dev(ws / "dev.jsonl", args.dev)
        settings.update({"prepare.pool": str(ALPACA), "prepare.max_records": 10 * args.clusters,
                         "prepare.dev": "dev.jsonl", "shapley.model": str(SMOLLM2), "finetune.model": str(SMOLLM2),
                         "train.max_length": args.max_length, "train.template": "alpaca"})
    for item in args.set:
        key, value = item.split("=", 1)
        settings[key] = yaml.safe_load(value)
    for key, value in settings.items():
        tables.set_dotted(raw, key, value)
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return settings


def run(args) -> dict:
    ws = Path(args.workdir) / f"inrun-{args.model}-C{args.clusters}"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    if args.model == "smollm2" and not (SMOLLM2 / "config.json").is_file():
        raise SystemExit(f"{SMOLLM2}: no model; run `shed fetch-model` first")
    settings = workspace_params(args, ws)
    stages = {}
    if args.model == "tiny":
        base = Path(args.base_model)
        if (base / "config.json").is_file():
            shutil.copytree(base, ws / "models/base")
        else:
            stages["base"] = run_stage(ws, "base")
    for stage in ("prepare", "embed", "cluster", "shapley"):
        stages[stage] = run_stage(ws, stage)
        print(json.dumps({stage: stages[stage]}), flush=True)
    metrics = json.loads((ws / "metrics/shapley.json").read_text())
    cluster = json.loads((ws / "metrics/cluster.json").read_text())
    return {"benchmark": "inrun_scale", "model": args.model, "clusters": cluster["clusters"],
            "records": json.loads((ws / "metrics/prepare.json").read_text())["pool"],
            "dev_questions": len((ws / "data/prepared/dev.jsonl").read_text().splitlines()), "settings": settings,
            "k": metrics["runs"], "steps": metrics["steps"],
            "shapley_s": stages["shapley"]["s"], "shapley_cpu_s": stages["shapley"]["cpu_s"],
            "shapley_peak_mb": stages["shapley"]["peak_mb"], "stages": stages, "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "workspace": str(ws)}


def markdown(results: list[dict], source: str | None) -> str:
    head, origin = tables.header("inrun_scale.py", source)
    lines = head + [
        f"Source: {origin}. The shapley stage with shapley.method inrun (one LoRA fit per run, k runs); seconds "
        "are wall time (CPU seconds in brackets), memory the stage's peak resident set.", "",
        "| model | proxies (C) | records | dev questions | k | steps | shapley s | peak MB | recipe changes | load average |",
        "|" + "---|" * 10]
    for r in results:
        changes = ", ".join(f"{k} {v}" for k, v in r["settings"].items()
                            if k.startswith(("shapley.", "train.")) and k not in ("shapley.method", "shapley.model"))
        lines.append(f"| {r['model']} | {r['clusters']:,} | {r['records']:,} | {r['dev_questions']} | {r['k']} | "
                     f"{r['steps']} | {r['shapley_s']:g} ({r['shapley_cpu_s']:g}) | {r['shapley_peak_mb']:,} | "
                     f"{changes} | {', '.join(f'{x:g}' for x in r['load_average'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--base-model", default=str(ROOT / "models/base"), help="tiny: a built models/base")
    parser.add_argument("--dev", type=int, default=64, help="smollm2: MMLU validation questions in the dev set")
    parser.add_argument("--max-length", type=int, default=256, help="smollm2: train.max_length")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/shed-inrun-scale")
    tables.add_arguments(parser)
    args = parser.parse_args()
    if args.from_json:
        tables.write_markdown(markdown(tables.read_json_lines(args.from_json), args.from_json), args.markdown)
        return
    start = time.perf_counter()
    result = run(args)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    if args.markdown:
        tables.write_markdown(markdown([result], None), args.markdown)


if __name__ == "__main__":
    main()
