"""Real data, real model, real benchmarks, offline on a CPU; the last line is one JSON object.

    python benchmarks/real_data.py [--shared ../shared] [--limit 10] [--clusters 500]

1. prepare + embed + cluster the 5,000-record Alpaca pool (dev set: MMLU val minus the questions
   that also appear in MMLU test; eval: ARC-Challenge test), read in place from <shared>/data, with wall-clock
   time and throughput per stage.
2. SmolLM2-135M-Instruct (`shed fetch-model`) scored by the project on the offline tasks
   mmlu_local (MMLU test CSVs) and arc_challenge_local (ARC-Challenge test JSONL), first --limit
   questions of each.
3. The same tasks, files and model through lm-eval's own CLI; the scores must be equal.

`--markdown PATH` also writes the tables as Markdown from the printed dict; `--from-json FILE`
renders them from a saved JSON line and runs nothing:

    python benchmarks/real_data.py --from-json docs/results/real_data.json --markdown docs/results/real_data.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tables  # noqa: E402 (benchmarks/, the script's own folder)

from shed.config import load_params  # noqa: E402
from shed.fetch import DEST, fetch_smollm2  # noqa: E402
from shed.fileio import read_jsonl, setup_logging  # noqa: E402

TASKS = ["mmlu_local", "arc_challenge_local"]


def write_params(shared: Path, args) -> None:
    data = shared / "data"
    Path("params.yaml").write_text(json.dumps({
        "prepare": {"pool": str(data / "instruction_pools/alpaca_5000.json"), "dev": str(data / "mmlu/val"),
                    "eval": str(data / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl"),
                    "dev_exclude": [str(data / "mmlu")]},  # MMLU val repeats 27 MMLU test questions
        "embed": {"batch_size": args.embed_batch_size, "max_seq_length": args.embed_max_seq_length},
        "cluster": {"C": args.clusters},
        "evaluate": {"tasks": TASKS, "batch_size": args.batch_size, "limit": args.limit,
                     "mmlu_dir": str(data / "mmlu"), "arc_file": str(data / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl")},
    }), encoding="utf-8")  # JSON is YAML


CPU_SECONDS: dict[str, float] = {}  # process CPU time per step: on a shared machine, wall time also counts the others


def timed(fn, *args):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    CPU_SECONDS[fn.__module__.rsplit(".", 1)[-1]] = round(time.process_time() - cpu, 2)
    return out, round(time.perf_counter() - start, 2)


def token_stats(pool: list[dict], params) -> dict:
    """How long the embedded texts are in MiniLM tokens: what the embedding time scales with."""
    import numpy as np
    from transformers import AutoTokenizer

    from shed.embedding import resolve_model
    from shed.records import record_text

    tok = AutoTokenizer.from_pretrained(resolve_model(params.embed.model), model_max_length=1 << 20)
    lengths = np.array([len(ids) for ids in tok([record_text(r, params.embed.fields) for r in pool])["input_ids"]])
    limit = params.embed.max_seq_length or 256
    return {"tokens_mean": round(float(lengths.mean()), 1), "tokens_p90": int(np.percentile(lengths, 90)),
            "tokens_embedded_mean": round(float(np.minimum(lengths, limit).mean()), 1), "max_seq_length": limit}


def data_stages(params) -> dict:
    from shed.stages import cluster, embed, prepare

    _, t_prepare = timed(prepare.main, params)
    pool = read_jsonl(prepare.OUT_DIR + "/pool.jsonl")
    records = len(pool)
    _, t_embed = timed(embed.main, params)
    _, t_cluster = timed(cluster.main, params)
    total = t_prepare + t_embed + t_cluster
    return {"records": records, "dev_questions": len(read_jsonl(prepare.OUT_DIR + "/dev.jsonl")),
            "prepare_s": t_prepare, "embed_s": t_embed, "embed_records_per_s": round(records / t_embed, 1),
            "cluster_s": t_cluster, "clusters": params.cluster.C, "data_total_s": round(total, 2),
            "data_records_per_s": round(records / total, 1), "cpu_s": dict(CPU_SECONDS), "cpu_cores": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2), **token_stats(pool, params)}


def project_scores(params, model_dir: Path) -> tuple[dict, float]:
    from shed.models import load_causal_lm
    from shed.scoring import LmEvalScorer
    from shed.stages.evaluate import check_file_tasks

    start = time.perf_counter()
    metadata = check_file_tasks(params)  # validates the files and refuses dev/eval overlap
    model, tokenizer = load_causal_lm(str(model_dir))
    scorer = LmEvalScorer(tokenizer, params.evaluate.tasks, params.evaluate.batch_size, params.evaluate.limit, metadata)
    return scorer(model), round(time.perf_counter() - start, 2)


def cli_scores(params, model_dir: Path, gguf: str, out_dir: Path) -> tuple[dict, float]:
    cfg = params.evaluate
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
           "--model_args", f"pretrained={model_dir},gguf_file={gguf},dtype=float32",
           "--include_path", str(ROOT / "src/shed/tasks"), "--tasks", ",".join(cfg.tasks),
           "--metadata", json.dumps({"mmlu_dir": cfg.mmlu_dir, "arc_file": cfg.arc_file}),
           "--limit", str(cfg.limit), "--batch_size", str(cfg.batch_size), "--output_path", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = round(time.perf_counter() - start, 2)
    if result.returncode:
        raise SystemExit(f"lm_eval CLI failed:\n{result.stderr[-3000:]}")
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]
    return {task: {k.split(",")[0]: v for k, v in m.items() if k.split(",")[0] in {"acc", "acc_norm"}}
            for task, m in results.items()}, seconds


def markdown(figures: dict, source: str | None) -> str:
    """The benchmark's tables as Markdown, from the dict it prints as its JSON line."""
    head, origin = tables.header("real_data.py", source)
    d = figures["data"]
    lines = head + [
        f"Source: {origin}. Alpaca 5k pool, MMLU val as the dev set, files read in place.",
        "",
        "Data stages (wall seconds):",
        "",
        "| records | dev questions | prepare | embed | cluster | total | records/s (embed) | records/s (total) | clusters |",
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {d['records']:,} | {d['dev_questions']:,} | {d['prepare_s']:g} | {d['embed_s']:g} | {d['cluster_s']:g} | "
        f"{d['data_total_s']:g} | {d['embed_records_per_s']:g} | {d['data_records_per_s']:g} | {d['clusters']} |"),
        "",
        (f"MiniLM tokens per record: mean {d['tokens_mean']:g}, 90th percentile {d['tokens_p90']}, "
        f"mean embedded {d['tokens_embedded_mean']:g} (max_seq_length {d['max_seq_length']})."),
    ]
    machine = []
    if "cpu_s" in d:
        machine.append("process CPU seconds " + ", ".join(f"{k} {v:g}" for k, v in d["cpu_s"].items()))
    if "cpu_cores" in d:
        machine.append(f"{d['cpu_cores']} cores")
    if "load_average_1m" in d:
        machine.append(f"1-minute load average {d['load_average_1m']:g} at the end")
    if machine:
        lines += ["", "Machine: " + "; ".join(machine) + "."]
    if "project" in figures:
        lines += ["", (f"SmolLM2-135M-Instruct scored on the first {figures['limit']} questions of each task, by the "
                  "project and by lm-eval's own CLI:"), "",
                  "| task | metric | project | lm-eval CLI |", "|---|---|---|---|"]
        for task, metrics in figures["project"].items():
            for metric, value in metrics.items():
                if metric == "n":
                    continue
                theirs = figures.get("lm_eval_cli", {}).get(task, {}).get(metric)
                lines.append(f"| {task} | {metric} | {value:g} | {'' if theirs is None else f'{theirs:g}'} |")
        lines += ["", (f"Equal to the CLI: {'yes' if figures.get('equal_to_cli') else 'no'}. Scoring time: project "
                  f"{figures.get('project_score_s', float('nan')):g} s, CLI {figures.get('cli_score_s', float('nan')):g} s.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="folder holding data/ (read in place)")
    parser.add_argument("--limit", type=int, default=10, help="questions per task (CPU: ~2 s each, twice)")
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--embed-batch-size", type=int, default=64)
    parser.add_argument("--embed-max-seq-length", type=int, default=0, help="0 = MiniLM's own 256 tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    parser.add_argument("--skip-model", action="store_true", help="only the data stages")
    tables.add_arguments(parser)
    args = parser.parse_args()
    if tables.render_saved(args, markdown):
        return
    markdown_path = Path(args.markdown).resolve() if args.markdown else None  # main() changes directory
    setup_logging()
    shared = Path(args.shared).resolve()
    model_dir = ROOT / DEST
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="shed-real-") as tmp:
        os.chdir(tmp)
        write_params(shared, args)
        params = load_params("params.yaml")
        figures["data"] = data_stages(params)
        if not args.skip_model:
            gguf = fetch_smollm2(model_dir).name
            ours, figures["project_score_s"] = project_scores(params, model_dir)
            theirs, figures["cli_score_s"] = cli_scores(params, model_dir, gguf, Path(tmp) / "lm_eval_out")
            figures["limit"] = args.limit
            figures["project"] = {t: {k: round(v, 6) for k, v in m.items()} for t, m in ours.items()}
            figures["lm_eval_cli"] = {t: {k: round(v, 6) for k, v in m.items()} for t, m in theirs.items()}
            figures["equal_to_cli"] = all(abs(ours[t][k] - theirs[t][k]) < 1e-9 for t in theirs for k in theirs[t])
    print(json.dumps(figures, sort_keys=True))
    if markdown_path:
        tables.write_markdown(markdown(json.loads(json.dumps(figures, sort_keys=True)), None), str(markdown_path))


if __name__ == "__main__":
    main()
