"""Does SHED find planted harm in a real instruction pool? A real-pool twin of benchmarks/quality.py.

    python benchmarks/real_quality.py --model tiny --pool-size 300 --seeds 1      # quick CPU check, tiny base
    shed fetch-model && python benchmarks/real_quality.py                          # SmolLM2-135M, 1,000 records
    python benchmarks/real_quality.py --finetune --limit 200                       # + the paper's Table 2 (a GPU)
    python benchmarks/real_quality.py --finetune --tasks arc_easy --limit 200 --heldout 200  # downstream, a CPU
    python benchmarks/real_quality.py --from-json FILE --markdown docs/results/real_quality.md

The pool (benchmarks/planting.py, whose docstring has the protocol; pure and deterministic by seed): Alpaca
records from <shared>/data/instruction_pools/alpaca_5000.json, held-out dev records set apart, packaged as five
sources of different origin (plain, assistant, exam, forum, wiki), with harm planted per protocol: concentrated
(--bad-sources of the styled sources are bad: --bad-rate 0.85 of their records corrupted, --background-rate 0.02
of every other source's) or scattered (--scattered-rate 0.2 of all records). --kinds picks the corruptions by
name or by family: loss (mismatched, truncated, shuffled, refusal: they raise the record's loss under a base
model; the default), fluent (generic, wrong_facts, other_question, restatement: fluent, on-format responses of
the original's length that do not answer) or mixed (all eight).

The pool is written to pool.jsonl {instruction, input, output} and what was planted to truth.jsonl {id,
source, bad_source, corrupted, kind, alpaca_index}, outside data/: prepare never sees it, and `id` is the
id prepare gives the record (shed.data.record_id of its instruction, input and output).

The pipeline, per seed and protocol, in a temporary workspace: params.yaml (the repository's, then the
settings below, then --set), each stage run in-process (shed.stages.<name>.main) as benchmarks/quality.py
does. prepare (pool.jsonl; the dev set: --dev alpaca = the held-out Alpaca records, value loglik = their
reference responses' mean per-token log-likelihood; --dev mmlu = --dev-size MMLU validation questions drawn
by seed, minus those that MMLU test repeats; --dev both runs each, reported apart), embed (--embed static:
static:all-MiniLM-L6-v2, or minilm: the torch model; --fields record = instruction, input and output, or
output = the response alone), cluster (C = --clusters, default pool/20), shapley (--valuations, default
inrun; --model smollm2 = models/smollm2 from `shed fetch-model`, or tiny = the embedded default's tiny
Llama, --base-model, built once when missing; its tokenizer is poor on Alpaca text, but the path is the
same), then sample with each --methods at --subset (10%). Seeds set cluster.seed, shapley.seed,
sample.seed and train.seed, and the pool and dev set.

Metrics, per seed, then mean ± std over seeds per protocol and dev set (and valuation, when several):
- cluster_auroc: a cluster is corrupted when more than half its members are; how well a low score flags it.
- record_auroc: each record inherits its cluster's score; how well a low score flags a corrupted record
  (what a cluster-level valuation can say about scattered harm).
- proxy_auroc and proxy_rank: the proxies' own scores against what was planted in them (is a corrupted proxy
  valued low; each corruption kind's mean percentile rank of score, "clean" for the uncorrupted proxies).
- harm_in_bad_clusters: the share of corrupted records inside corrupted clusters, the ceiling that any
  cluster-level score can reach; pool_harmful_share: the pool's corrupted share.
- per method: harmful_share of its subset (against the pool's), kind_share (each planted kind's share of the
  subset), vs_random (that share over random's; the target for concentrated harm is qocs <= 1/3), selection_s
  (the sample stage) and valuation_s (the shapley stage, which qocs and qwcs also need).
- with --finetune: per method (and the full pool), the finetune stage (LoRA on the subset) and the evaluate
  stage on --tasks (ARC-Easy, ARC-Challenge, MMLU test from <shared>/data), --limit questions each (0 = all),
  and with --heldout N the mean per-token log-likelihood of N clean Alpaca responses in neither the pool nor
  the dev set (evaluate.heldout; planting.heldout_records), and the base model once. ARC-Easy has no offline lm-eval task of its own here: prepare.eval is set to
  ARC-Easy-Test.jsonl and the project task shed_eval scores it with ARC's prompt ("Question: ...\\nAnswer:",
  log-likelihood of each choice), as lm-eval's arc_easy does; ARC-Challenge is arc_challenge_local
  (evaluate.arc_file) and MMLU mmlu_local (evaluate.mmlu_dir), zero-shot.

Cost, memory and the CPU recipe's limits: docs/results.md, "Every record valued in a real pool". The tiny
model (--model tiny) runs the same path in minutes. With --finetune on a GPU, pass a real fine-tuning
recipe with --set (e.g. train.epochs=3, train.max_length=512): the train block serves the valuation and
the fine-tunes.

A subset that another method or dev set already selected in the same workspace (same dataset sha256) is not
fine-tuned again; methods that read neither the scores nor the dev set are sampled once per workspace.
Progress goes to stderr; the last line on stdout is one JSON object. `--markdown PATH` writes its tables
(benchmarks/tables.py); `--from-json FILE` renders them from a saved line and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import tables  # benchmarks/, the script's own folder

tables.quiet_offline_env()

import harm  # noqa: E402
from harm import (cluster_auroc, cluster_shares, harm_in_bad_clusters, harmful_share, proxy_reading,  # noqa: E402
                  record_auroc)
from planting import (FAMILIES, KINDS, LOSS_KINDS, PROTOCOLS, dev_records, family_of, heldout_records,  # noqa: E402
                      plant, resolve_kinds)

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared/data"
ALPACA = SHARED / "instruction_pools/alpaca_5000.json"
MMLU = SHARED / "mmlu"
ARC_EASY = SHARED / "arc/ARC-Easy/ARC-Easy-Test.jsonl"
ARC_CHALLENGE = SHARED / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl"
SMOLLM2 = ROOT / "models/smollm2"
KEEP = Path(os.environ["SHED_QUALITY_KEEP"]) if os.environ.get("SHED_QUALITY_KEEP") else None  # debug: keep workspaces

# A method is a sample.method, with "+<sample.within>" for qocs and qwcs (e.g. qocs+loss; +blend3: within blend
# over value, loss and relevance, tables.BLENDS) and QFCS's sample.exclude as two digits (qfcs60: 0.6, whatever
# --set sample.exclude says); "@members" ranks the clusters by their members' within signal instead of their value
# (sample.cluster_score members; qocs+blend3@members); qocs@meanloss and qocs+blendlr@members are references: QOCS
# on clusters scored by their members' mean base-model loss, or their loss and relevance (no valuation).
METHODS = ("qocs", "qwcs", "qocs+value", "qwcs+value", "qocs+loss", "qwcs+loss", "qocs+blend", "qwcs+blend",
           "qocs+relevance", "qwcs+relevance", "qocs+blend3", "qwcs+blend3", "qfcs+blend3",
           "qocs+ifd", "qocs@meanloss", "qfcs", "qfcs+value", "qfcs+blend", "qocs+blendlr",
           "random", "cluster_uniform", "length", "perplexity", "ifd", "dsir")
DEFAULT_METHODS = ("qocs", "qwcs", "qocs+value", "qwcs+value", "qocs+loss", "qwcs+loss", "qocs+blend", "qwcs+blend",
                   "qwcs+relevance", "qocs+blend3", "qwcs+blend3", "qfcs60+blend3", "qocs+blend3@members",
                   "qwcs+blend3@members", "qfcs60+blend3@members", "qocs+blendlr@members", "qocs@meanloss", "random",
                   "cluster_uniform", "length", "perplexity", "ifd", "dsir")
VALUATIONS, scored = tables.VALUATIONS, tables.scored
DEV_READERS = {"dsir"}  # read the dev set
TASKS = {"shed_eval": "arc_easy", "arc_challenge_local": "arc_challenge", "mmlu_local": "mmlu"}
# --model smollm2 on a CPU: one in-run fit over the proxies per valuation, 128 tokens, dev gradients once per 4
# steps and 8 dev items per gradient pass (64 at once ran out of 24 GB); see "Cost" in the docstring.
SMOLLM2_CPU = {"train.template": "qa", "train.max_length": 128, "train.epochs": 1, "shapley.k": 1,
               "shapley.dev_every": 4, "shapley.dev_chunk": 8, "shapley.dev_epochs": 4}

# --- the MMLU dev set ------------------------------------------------------------------------------

def mmlu_dev(seed: int, count: int) -> list[dict]:
    """`count` MMLU validation questions {question, choices, answer} drawn by seed, in file order, none of
    them also an MMLU test question (real MMLU val repeats 27; evaluate would refuse them)."""
    from shed.mcdata import mmlu_rows, question_key

    test = {question_key(r["question"], r["choices"]) for r in mmlu_rows(MMLU, split="test")}
    rows = [r for r in mmlu_rows(MMLU, split="val") if question_key(r["question"], r["choices"]) not in test]
    picked = np.sort(np.random.default_rng([seed, 5]).choice(len(rows), size=min(count, len(rows)), replace=False))
    return [{k: rows[i][k] for k in ("question", "choices", "answer")} for i in picked]


# --- metrics ----------------------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    values = np.array(values, dtype=float)
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if len(finite) else float("nan")
    std = float(finite.std()) if len(finite) else float("nan")
    return {"mean": _round(mean), "std": _round(std), "values": [_round(v) for v in values]}


def _round(x: float):
    return round(float(x), 4) if np.isfinite(x) else None  # JSON has no NaN


def record_reading(table, cluster_of: dict[str, int], harmful: set[str], kind_of: dict[str, str],
                   score_of: dict[int, float]) -> dict:
    """What the valued records' own scores say (data/shapley/record_scores.csv): with every record valued,
    record_auroc is the AUROC of each record's own score, else of its cluster's score (inherited); per kind
    against the clean records; and the reference signals on the same records: response tokens (a low count
    flags harm) and, where the valuation measured it, the base-model loss (a high loss flags harm)."""
    ids = table["id"].astype(str).tolist()
    every = set(ids) == set(cluster_of)
    own = dict(zip(ids, table["score"].astype(float))) if every else {i: score_of[c] for i, c in cluster_of.items()}
    out = {"record_auroc": harm.record_level_auroc(own, harmful),
           "record_auroc_inherited": record_auroc(score_of, cluster_of, harmful),
           "record_auroc_by_kind": harm.kind_auroc(own, kind_of), "records_valued": len(ids)}
    if every:
        tokens = dict(zip(ids, table["tokens"].astype(float)))
        out["reference_auroc"] = {"length": harm.record_level_auroc(tokens, harmful)}
        loss = table["loss"].astype(float)
        if loss.notna().all():
            out["reference_auroc"]["perplexity"] = harm.record_level_auroc(dict(zip(ids, -loss)), harmful)
            out["reference_by_kind"] = {"perplexity": harm.kind_auroc(dict(zip(ids, -loss)), kind_of)}
    return out


def within_auroc(harmful: set[str], cluster_of: dict[str, int]) -> tuple[float, float]:
    """AUROCs of the record order the sample stage just drew by (sample.within in ./params.yaml; its signals from
    this process's caches): of a record taken last for a planted record, and of a cluster's score by that order
    (`sampling.member_scores`, what sample.cluster_score members ranks clusters by) for a corrupted cluster."""
    from shed.config import load_params
    from shed.sampling import member_scores
    from shed.stages import sample

    params = load_params("params.yaml")
    inputs = sample.read_inputs(params)
    keys = sample.within_keys(params.sample, inputs)
    clusters = member_scores(sample.cluster_members(inputs.assignments), keys)
    return (harm.record_level_auroc({i: -k for i, k in keys.items()}, harmful),
            cluster_auroc(clusters, cluster_of, harmful))


def qocs_by_mean_loss(table, assignments, subset: float) -> list[str]:
    """The reference row qocs@meanloss: QOCS over clusters scored by minus their members' mean base-model loss
    (record_scores.csv's loss column), members nearest the centroid first."""
    from shed.sampling import qocs, resolve_size

    loss = dict(zip(table["id"].astype(str), table["loss"].astype(float)))
    frame = assignments.assign(loss=[loss[str(i)] for i in assignments["id"]])
    scores = {int(c): -float(g["loss"].mean()) for c, g in frame.groupby("cluster")}
    members = {int(c): g.sort_values("distance", kind="stable")["id"].astype(str).tolist()
               for c, g in frame.groupby("cluster")}
    return qocs(scores, members, resolve_size(subset, len(frame)))


# --- running the pipeline ---------------------------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def settings(args, model_dir: str) -> dict:
    """The dotted params every workspace gets (before the seed's and --set)."""
    out = {
        "prepare.pool": "pool.jsonl", "prepare.dev": "dev.jsonl", "prepare.eval": str(ARC_EASY) if args.finetune else "embedded",
        "prepare.dev_exclude": [], "prepare.max_records": 0, "prepare.duplicates": "error", "prepare.empty": "error",
        "embed.model": "static:all-MiniLM-L6-v2" if args.embed == "static" else "all-MiniLM-L6-v2",
        "embed.backend": "torch",
        "embed.fields": ["output"] if args.fields == "output" else ["instruction", "input", "output"],
        "cluster.C": args.clusters or max(2, args.pool_size // 20),
        "shapley.model": model_dir, "shapley.value": "loglik", "finetune.model": model_dir,
        "sample.subset_size": args.subset,
        "evaluate.tasks": [t for t, label in TASKS.items() if label in args.tasks], "evaluate.mmlu_dir": str(MMLU),
        "evaluate.arc_file": str(ARC_CHALLENGE), "evaluate.limit": args.limit,
        "evaluate.heldout": "heldout.jsonl" if args.finetune and args.heldout else "",
    }
    if args.model == "smollm2":  # the CPU-sized recipe (module docstring, "Cost")
        out.update(SMOLLM2_CPU)
    for item in args.set:
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def finetune_and_score(raw: dict, digest: str, cache: dict, with_base: bool) -> tuple[dict, float]:
    """finetune + evaluate on the curated dataset now in the workspace: ({task label: acc}, seconds). A subset
    already fine-tuned in this workspace (same sha256) is not fine-tuned again: its first run's figures are
    returned. With `with_base`, the base model is scored too, kept under cache["base"]."""
    from shed import artifacts

    if digest not in cache:
        tables.set_dotted(raw, "evaluate.include_base", with_base)
        seconds = tables.run_stage("finetune", raw) + tables.run_stage("evaluate", raw)
        metrics = json.loads(Path(artifacts.metrics("evaluate")).read_text())
        read = lambda block: {TASKS.get(t, t): round(float(m["acc"] if "acc" in m else m["loglik"]), 4)  # noqa: E731
                              for t, m in block.items()}
        if "base" in metrics:
            cache["base"] = read(metrics["base"])
        cache[digest] = (read(metrics["finetuned"]), seconds)
    return cache[digest]


def one_workspace(protocol: str, seed: int, args, base_raw: dict, alpaca: list[dict]) -> dict[str, dict]:
    """One seed and protocol: plant, then per dev set (and valuation) prepare .. sample (.. evaluate).
    Returns {result key: this seed's figures}."""
    from shed import artifacts

    raw = json.loads(json.dumps(base_raw))
    for key in ("cluster.seed", "shapley.seed", "sample.seed", "train.seed"):
        tables.set_dotted(raw, key, seed)
    for key, value in args.settings.items():
        tables.set_dotted(raw, key, value)
    pool, truth = plant(alpaca, protocol, seed, args.pool_size, args.dev_size, args.bad_sources, args.bad_rate,
                        args.background_rate, args.scattered_rate, tuple(args.kinds))
    harmful = {t["id"] for t in truth if t["corrupted"]}
    kind_of = {t["id"]: t["kind"] for t in truth}
    out: dict[str, dict] = {}
    selections: dict[tuple, dict] = {}  # methods that read neither scores nor dev: sampled once per workspace
    tuned: dict = {}  # dataset sha256 -> accuracies (and "base")
    with tempfile.TemporaryDirectory(prefix=f"shed-real-quality-{protocol}-{seed}-") as tmp:
        ws = KEEP / f"{protocol}-seed{seed}" if KEEP else Path(tmp)
        ws.mkdir(parents=True, exist_ok=True)
        os.chdir(ws)
        try:
            # The forward valuation keeps losses per record id and model state: workspaces of one seed share its
            # base model's losses and dev-set fits, and score only the records their pools do not share.
            (ws / artifacts.FORWARD_RUNS).parent.mkdir(parents=True, exist_ok=True)
            (ws / artifacts.FORWARD_RUNS).symlink_to(args.cache, target_is_directory=True)
            write_jsonl(ws / "pool.jsonl", pool)
            write_jsonl(ws / "truth.jsonl", truth)
            if args.finetune and args.heldout:
                write_jsonl(ws / "heldout.jsonl", heldout_records(alpaca, seed, args.pool_size, args.dev_size, args.heldout))
            clustered = False
            for dev in args.devs:
                write_jsonl(ws / "dev.jsonl", dev_records(alpaca, seed, args.pool_size, args.dev_size) if dev == "alpaca"
                            else mmlu_dev(seed, args.dev_size))
                stage_s = {"prepare": tables.run_stage("prepare", raw)}
                prepared = {r["id"] for r in artifacts.read_pool()}
                if prepared != {t["id"] for t in truth}:
                    raise SystemExit("prepare's pool ids differ from the truth file's: the planting is broken")
                if not clustered:
                    stage_s["embed"] = tables.run_stage("embed", raw)
                    stage_s["cluster"] = tables.run_stage("cluster", raw)
                    clustered = True
                assignments, _ = artifacts.read_clusters()
                cluster_of = dict(zip(assignments["id"].astype(str), assignments["cluster"].astype(int)))
                for valuation in args.valuations:
                    key = f"{protocol}/{dev}" + (f"/{args.family}" if args.family != "loss" else "") \
                        + (f"/{valuation}" if len(args.valuations) > 1 else "")
                    vraw = tables.with_valuation(raw, valuation)
                    valuation_s = tables.run_stage("shapley", vraw)
                    scores = artifacts.read_scores()
                    score_of = {int(c): float(s) for c, s in zip(scores["cluster"], scores["score"])}
                    proxy_auroc, proxy_rank = proxy_reading(
                        {str(i): float(v) for i, v in zip(scores["proxy_id"], scores["score"])}, kind_of)
                    records = record_reading(artifacts.read_record_scores(), cluster_of, harmful, kind_of, score_of)
                    shapley_metrics = json.loads(Path(artifacts.metrics("shapley")).read_text())
                    records["length_spearman"] = shapley_metrics.get("length_spearman")
                    row = {"cluster_auroc": cluster_auroc(score_of, cluster_of, harmful), **records,
                           "harm_in_bad_clusters": harm_in_bad_clusters(cluster_of, harmful),
                           "proxy_auroc": proxy_auroc, "proxy_rank": proxy_rank,
                           "pool_harmful_share": harmful_share(list(cluster_of), harmful),
                           "corrupted_clusters": sum(s > 0.5 for s in cluster_shares(cluster_of, harmful).values()),
                           "clusters": len(score_of), "valuation_s": round(valuation_s, 1),
                           "harmful_share": {}, "kind_share": {}, "selection_s": {}, "acc": {}, "tune_s": {},
                           "within_auroc": {}, "within_cluster_auroc": {},
                           "stage_s": dict(stage_s)}
                    log(f"  {key} seed {seed}: shapley {valuation_s:.0f} s, cluster AUROC {row['cluster_auroc']:.3f}, "
                        f"record AUROC {row['record_auroc']:.3f}, harm in bad clusters {row['harm_in_bad_clusters']:.2f}")
                    for method in args.methods + (["full"] if args.finetune and not args.no_full_pool else []):
                        cache_key = None if scored(method) else (method, dev) if method in DEV_READERS else (method,)
                        if cache_key in selections:
                            got = selections[cache_key]
                        elif method == "qocs@meanloss":
                            start = time.perf_counter()
                            chosen = qocs_by_mean_loss(artifacts.read_record_scores(), assignments, args.subset)
                            got = {"harmful_share": harmful_share(chosen, harmful),
                                   "selection_s": round(time.perf_counter() - start, 2),
                                   "kind_share": harm.kind_shares(chosen, kind_of)}
                            if args.finetune:  # the reference subset as the curated dataset, tuned like the others
                                origins = artifacts.read_rows(chosen)
                                digest = artifacts.write_curated([origins[i] for i in chosen], {"method": method})
                                got["acc"], got["tune_s"] = finetune_and_score(vraw, digest, tuned, "base" not in tuned)
                            selections[cache_key] = got
                        else:
                            mraw = tables.with_method(vraw, method)
                            tables.set_dotted(mraw, "sample.subset_size", 1.0 if method == "full" else args.subset)
                            seconds = tables.run_stage("sample", mraw)
                            chosen = artifacts.read_curated_ids()
                            got = {"harmful_share": harmful_share(chosen, harmful), "selection_s": round(seconds, 2)}
                            got["kind_share"] = harm.kind_shares(chosen, kind_of)
                            within = method.partition("+")[2].partition("@")[0]
                            if scored(method) and within and within not in row["within_auroc"]:
                                row["within_auroc"][within], row["within_cluster_auroc"][within] = \
                                    within_auroc(harmful, cluster_of)
                            if args.finetune:
                                digest = json.loads(Path(artifacts.MANIFEST).read_text())["sha256"]
                                got["acc"], got["tune_s"] = finetune_and_score(mraw, digest, tuned, "base" not in tuned)
                            if cache_key is not None:
                                selections[cache_key] = got
                        if method != "full":
                            row["harmful_share"][method] = got["harmful_share"]
                            row["kind_share"][method] = got["kind_share"]
                            row["selection_s"][method] = got["selection_s"]
                        if args.finetune:
                            row["acc"][method], row["tune_s"][method] = got["acc"], round(got["tune_s"], 1)
                        log(f"  {key} seed {seed} {method}: harmful {got['harmful_share']:.3f} "
                            f"(pool {row['pool_harmful_share']:.3f}), {got['selection_s']:.1f} s"
                            + (f", acc {got['acc']}" if args.finetune else ""))
                    if args.finetune:
                        row["acc"]["base"] = tuned["base"]
                    if "random" in row["harmful_share"]:
                        rand = row["harmful_share"]["random"]
                        row["vs_random"] = {m: (v / rand if rand else float("nan")) for m, v in row["harmful_share"].items()}
                    out[key] = row
        finally:
            os.chdir(ROOT)
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Mean ± std over seeds of one result key's figures."""
    first = per_seed[0]
    out = {k: stats([r[k] for r in per_seed]) for k in
           ("cluster_auroc", "record_auroc", "harm_in_bad_clusters", "pool_harmful_share", "corrupted_clusters",
            "clusters", "valuation_s") if k in first}
    for k in ("record_auroc_inherited", "length_spearman"):
        if k in first:
            out[k] = stats([r[k] if r[k] is not None else float("nan") for r in per_seed])
    for block in ("record_auroc_by_kind", "reference_auroc", "within_auroc", "within_cluster_auroc"):
        if first.get(block):
            out[block] = {m: stats([r[block].get(m, float("nan")) for r in per_seed])
                          for m in sorted({m for r in per_seed for m in r[block]})}
    if first.get("reference_by_kind"):
        out["reference_by_kind"] = {ref: {k: stats([r["reference_by_kind"][ref].get(k, float("nan")) for r in per_seed])
                                          for k in first["reference_by_kind"][ref]} for ref in first["reference_by_kind"]}
    if "proxy_auroc" in first:
        out["proxy_auroc"] = stats([r["proxy_auroc"] for r in per_seed])
        kinds = sorted({k for r in per_seed for k in r["proxy_rank"]})
        out["proxy_rank"] = {k: stats([r["proxy_rank"].get(k, float("nan")) for r in per_seed]) for k in kinds}
    for block in ("harmful_share", "selection_s", "vs_random", "tune_s"):
        if first.get(block):
            out[block] = {m: stats([r[block][m] for r in per_seed]) for m in first[block]}
    if first.get("kind_share"):  # per method and planted kind
        out["kind_share"] = {m: {k: stats([r["kind_share"][m].get(k, float("nan")) for r in per_seed])
                                 for k in sorted({k for r in per_seed for k in r["kind_share"][m]})}
                             for m in first["kind_share"]}
    if first["acc"]:
        out["acc"] = {m: {t: stats([r["acc"][m][t] for r in per_seed]) for t in first["acc"][m]} for m in first["acc"]}
    out["stage_s"] = {s: stats([r["stage_s"].get(s, float("nan")) for r in per_seed])
                      for s in sorted({s for r in per_seed for s in r["stage_s"]})}
    return out


def targets(summary: dict, protocol: str) -> dict:
    """The issue's targets for source-concentrated harm, on the means."""
    if protocol != "concentrated":
        return {}
    out = {"cluster_auroc>=0.9": bool((summary["cluster_auroc"]["mean"] or 0) >= 0.9)}
    # the orders that read the valuation (blendlr, the reference without it, does not)
    ranked = {name: r["mean"] for name, r in summary.get("within_cluster_auroc", {}).items()
              if r["mean"] is not None and "value" in tables.BLENDS.get(name, [name])}
    if ranked:
        best = max(sorted(ranked), key=ranked.get)
        out[f"cluster_auroc(@members, {best})>=0.9"] = bool(ranked[best] >= 0.9)
    share = summary.get("harmful_share", {})
    if "qocs" in share and "random" in share:
        out["qocs_share<=random/3"] = bool(share["qocs"]["mean"] <= share["random"]["mean"] / 3)
    return out


def _is_stat(x) -> bool:
    return isinstance(x, dict) and set(x) == {"mean", "std", "values"}


def _blank(x, seeds: int):
    """`x`'s shape with every {mean, std, values} over `seeds` missing seeds (what a run did not measure)."""
    if _is_stat(x):
        return stats([np.nan] * seeds)
    return {k: _blank(v, seeds) for k, v in x.items()} if isinstance(x, dict) else x


def _join(a, b, seeds_a: int = 1, seeds_b: int = 1):
    """Two seed lists' figures of one key as one: every {mean, std, values} joined (values appended, mean and std
    recomputed), recursively; a figure one side lacks (a method it did not run) counts as missing on its seeds,
    so that values stay aligned by seed."""
    if _is_stat(a):
        return stats([np.nan if v is None else v for v in a["values"] + b["values"]])
    if isinstance(a, dict):
        return {k: _join(a[k] if k in a else _blank(b[k], seeds_a), b[k] if k in b else _blank(a[k], seeds_b),
                         seeds_a, seeds_b) for k in list(a) + [k for k in b if k not in a]}
    return a


def merge_seeds(runs: list[dict]) -> dict:
    """Saved runs of the same settings over disjoint seeds (e.g. one run per seed) as one run over all of them."""
    out = json.loads(json.dumps(runs[0]))
    for r in runs[1:]:
        if set(r["seeds"]) & set(out["seeds"]):
            raise SystemExit(f"cannot join runs sharing seeds: {out['seeds']} and {r['seeds']}")
        if set(r["results"]) != set(out["results"]):
            raise SystemExit(f"cannot join runs of other results: {sorted(out['results'])} and {sorted(r['results'])}")
        out["results"] = {k: _join(v, r["results"][k], len(out["seeds"]), len(r["seeds"]))
                          for k, v in out["results"].items()}
        out["seeds"] = out["seeds"] + r["seeds"]
        out["seconds"] = {k: v for k, v in {**out["seconds"], **r["seconds"]}.items() if k != "total"} | {
            "total": round(out["seconds"]["total"] + r["seconds"]["total"], 1)}
    for key, r in out["results"].items():
        out["targets"][key] = targets(r, key.split("/")[0])
    return out


def merge(runs: list[dict]) -> dict:
    """Several saved runs as one result: runs of the same keys over other seeds are joined first
    (`merge_seeds`); then runs of one seed list are put side by side. Runs that embed other fields than the
    first have their keys (and wall seconds) marked with the fields, e.g. "concentrated/alpaca/output"."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(json.dumps(sorted(r["results"]) + r["settings"]["embed_fields"]), []).append(r)
    runs = [merge_seeds(group) if len(group) > 1 else group[0] for group in groups.values()]
    first = runs[0]
    for r in runs[1:]:
        if r["seeds"] != first["seeds"]:
            raise SystemExit(f"cannot merge runs over different seeds: {first['seeds']} and {r['seeds']}")
    fields = first["settings"]["embed_fields"]
    out = json.loads(json.dumps(first))
    out["results"], out["targets"], out["seconds"] = {}, {}, {}
    s = out["settings"]
    for r in runs:
        mark = "" if r["settings"]["embed_fields"] == fields else "/" + "+".join(r["settings"]["embed_fields"])
        for key, value in r["results"].items():
            out["results"][key + mark] = value
            out["targets"][key + mark] = r["targets"].get(key, {})
        for key, value in r["seconds"].items():
            out["seconds"][key + mark] = value
        for name in ("protocols", "methods", "devs"):
            s[name] += [x for x in r["settings"][name] if x not in s[name]]
        if mark and r["settings"]["embed_fields"] not in s.setdefault("other_embed_fields", []):
            s["other_embed_fields"].append(r["settings"]["embed_fields"])
    out["seconds"] = {k: v for k, v in out["seconds"].items() if not k.startswith("total")}
    out["seconds"]["total"] = round(sum(r["seconds"]["total"] for r in runs), 1)
    return out


def read_saved(path: str) -> dict:
    """A saved JSON line, or the merge of every line in the file (several runs of the same seeds)."""
    runs = tables.read_json_lines(path)
    return runs[0] if len(runs) == 1 else merge(runs)


# --- tables -----------------------------------------------------------------------------------------

def share_sweep(result: dict, methods: list[str]) -> list[str]:
    """A table per QFCS variant run at two or more shares left out (qfcs30+blend3, qfcs60+blend3, ...): each row's
    harmful share by share, beside the perplexity filter's (means over seeds)."""
    lines: list[str] = []
    variants: dict[str, dict[int, str]] = {}
    for m in methods:
        share = tables.QFCS_SHARE.match(m)
        if share:
            variants.setdefault(m[share.end():], {})[int(share.group(1))] = m
    for rest, by_share in variants.items():
        if len(by_share) < 2:
            continue
        cols = [by_share[k] for k in sorted(by_share)] + ["perplexity"]
        lines += ["", f"QFCS{rest}'s share left out (sample.exclude), swept: harmful share of each 10% (means over "
                  "seeds):", "", "| protocol / dev set | " + " | ".join(f"{k / 100:g}" for k in sorted(by_share))
                  + " | perplexity |", "|---|" + "---|" * len(cols)]
        for key, r in result["results"].items():
            lines.append(f"| {key} | " + " | ".join(_percent(r["harmful_share"].get(m)) for m in cols) + " |")
    return lines


def _pm(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _v(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(result: dict, source: str | None) -> str:
    """The benchmark's tables as Markdown, from the dict it prints as its JSON line."""
    head, origin = tables.header("real_quality.py", source)
    s = result["settings"]
    seeds = result["seeds"]
    lines = head + [
        (f"Source: {origin}. Alpaca pool of {s['pool_size']} records (5 sources, harm planted per protocol; "
         f"benchmarks/real_quality.py's docstring), value model {s['model']}, valuation {', '.join(s['valuations'])}, "
         f"embed {s['embed_model']} on {', '.join(s['embed_fields'])}"
         + "".join(f" (rows marked /{'+'.join(f)}: on {', '.join(f)})" for f in s.get("other_embed_fields", []))
         + f", C = {s['clusters']}, subsets of "
         f"{s['subset']:g}, dev sets of {s['dev_size']}. Seeds {', '.join(map(str, seeds))}: mean ± std over seeds."),
        "",
        "| protocol / dev set | cluster AUROC | record AUROC | harm in bad clusters (ceiling) | corrupted clusters | "
        "pool harmful share | valuation s |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in result["results"].items():
        lines.append(f"| {key} | {_pm(r['cluster_auroc'])} | {_pm(r['record_auroc'])} | {_pm(r['harm_in_bad_clusters'])} "
                     f"| {_pm(r['corrupted_clusters'], 1)} of {_pm(r['clusters'], 0)} | {_pm(r['pool_harmful_share'])} "
                     f"| {_pm(r['valuation_s'], 0)} |")
    own = {k: r for k, r in result["results"].items() if r.get("reference_auroc")}
    if own:
        kinds = sorted({kind for r in own.values() for kind in r.get("record_auroc_by_kind", {})})
        lines += ["", "Every record valued: AUROC of each record's own score for a planted record (overall, then per "
                  "kind against the clean records), beside the reference signals on the same records (response "
                  "tokens; base-model loss, perplexity) and Spearman(score, response tokens):", "",
                  "| protocol / dev set | record AUROC | length | perplexity | Spearman(score, tokens) | "
                  + " | ".join(kinds) + " |", "|---|---|---|---|---|" + "---|" * len(kinds)]
        for key, r in own.items():
            ref = r["reference_auroc"]
            by_kind = r.get("record_auroc_by_kind", {})
            plex = r.get("reference_by_kind", {}).get("perplexity", {})
            lines.append(f"| {key} | {_pm(r['record_auroc'], 2)} | {_pm(ref.get('length'), 2)} | "
                         f"{_pm(ref.get('perplexity'), 2)} | {_pm(r.get('length_spearman'), 2)} | "
                         + " | ".join(f"{_pm(by_kind.get(k), 2)} (ppl {_pm(plex.get(k), 2)})" for k in kinds) + " |")
    orders = {k: r["within_auroc"] for k, r in result["results"].items() if r.get("within_auroc")}
    if orders:
        names = sorted({name for o in orders.values() for name in o})
        lines += ["", "The record orders the samplers take cluster members by (sample.within; blend3: value, loss and "
                  "relevance): AUROC of a record taken last for a planted record:", "",
                  "| protocol / dev set | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key, o in orders.items():
            lines.append(f"| {key} | " + " | ".join(_pm(o.get(name), 2) for name in names) + " |")
    ranked = {k: r["within_cluster_auroc"] for k, r in result["results"].items() if r.get("within_cluster_auroc")}
    if ranked:
        names = sorted({name for o in ranked.values() for name in o})
        lines += ["", "The same orders ranking the clusters (sample.cluster_score members, the methods marked @members: "
                  "one minus the members' mean percentile rank): cluster AUROC, beside the valuation's own (its "
                  "cluster scores, data/shapley/scores.csv):", "",
                  "| protocol / dev set | valuation | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for key, o in ranked.items():
            lines.append(f"| {key} | {_pm(result['results'][key]['cluster_auroc'], 2)} | "
                         + " | ".join(_pm(o.get(name), 2) for name in names) + " |")
    read = {k: r for k, r in result["results"].items() if "proxy_auroc" in r}
    if read:
        kinds = sorted({kind for r in read.values() for kind in r["proxy_rank"]}, key=lambda k: (k != "clean", k))
        lines += ["", "The proxies' own scores against what was planted in them: AUROC of a low score for a corrupted "
                  "proxy, and each kind's mean percentile rank of score (1 = valued highest; 0.5 = no signal):", "",
                  "| protocol / dev set | proxy AUROC | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for key, r in read.items():
            lines.append(f"| {key} | {_pm(r['proxy_auroc'], 2)} | "
                         + " | ".join(_pm(r["proxy_rank"].get(kind), 2) for kind in kinds) + " |")
    checks = {k: v for k, v in result.get("targets", {}).items() if v}
    if checks:
        lines += ["", "Targets for source-concentrated harm (on the means): " + "; ".join(
            f"{key}: " + ", ".join(f"{name} {'met' if ok else 'missed'}" for name, ok in sorted(v.items()))
            for key, v in checks.items()) + "."]
    keys = list(result["results"])
    shares = {m for r in result["results"].values() for m in r["harmful_share"]}
    methods = [m for m in s["methods"] if m in shares] + sorted(shares - set(s["methods"]))
    lines += ["", f"Harmful share of each method's {s['subset']:g} subset (the pool's share in the last row; "
              "in brackets, the share over random's):", "",
              "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for m in methods:
        cells = []
        for k in keys:
            r = result["results"][k]
            ratio = r.get("vs_random", {}).get(m)
            cells.append(_pm(r["harmful_share"].get(m)) + (f" ({_v(ratio['mean'], 2)})" if ratio else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| pool | " + " | ".join(_pm(result["results"][k]["pool_harmful_share"]) for k in keys) + " |")
    lines += share_sweep(result, methods)
    for k in keys:
        shares = result["results"][k].get("kind_share")
        if not shares:
            continue
        kinds = sorted({kind for m in shares.values() for kind in m})
        lines += ["", f"{k}: each planted kind's share of each method's subset (means over seeds; which harm a "
                  "method lets through):", "", "| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for m in methods:
            if m in shares:
                lines.append(f"| {m} | " + " | ".join(_percent(shares[m].get(kind)) for kind in kinds) + " |")
    lines += ["", "Selection seconds (the sample stage; qocs and qwcs also need the valuation above):", "",
              "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_pm(result["results"][k]["selection_s"].get(m)) for k in keys) + " |")
    lines += ["", "Stage seconds (embed and cluster run once per workspace, with the first dev set):", "",
              "| stage | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    stages = [st for st in ("prepare", "embed", "cluster") if any(st in result["results"][k]["stage_s"] for k in keys)]
    for st in stages:
        lines.append(f"| {st} | " + " | ".join(_pm(result["results"][k]["stage_s"].get(st), 1) for k in keys) + " |")
    lines.append("| shapley (valuation) | " + " | ".join(_pm(result["results"][k]["valuation_s"], 1) for k in keys) + " |")
    for k in keys:
        acc = result["results"][k].get("acc")
        if not acc:
            continue
        present = next(iter(acc.values()))
        task_names = [t for t in TASKS.values() if t in present] + [t for t in present if t not in TASKS.values()]
        rows = [m for m in methods if m in acc] + [m for m in ("full", "base") if m in acc]
        heading = [{"heldout": f"held-out log-lik ({s.get('heldout', 0)} records)"}.get(t, t) for t in task_names]
        lines += ["", f"After fine-tuning on each subset, {k}: accuracy (evaluate.limit {s['limit'] or 'all'}) and the mean "
                  "per-token log-likelihood of held-out clean responses (higher is better):", "",
                  "| subset | " + " | ".join(heading) + " |", "|---|" + "---|" * len(task_names)]
        tune_s = result["results"][k].get("tune_s", {})
        lines[-2] += " finetune + evaluate s |"
        lines[-1] += "---|"
        for m in rows:
            label = {"full": "full pool", "base": "base model, not tuned"}.get(m, m)
            measured = [x for x, v in zip(seeds, next(iter(acc[m].values()))["values"]) if v is not None]
            if len(measured) < len(seeds):  # a method some seeds' runs did not tune
                label += f" (seed{'s' if len(measured) > 1 else ''} {', '.join(map(str, measured))} only)"
            lines.append(f"| {label} | " + " | ".join(_pm(acc[m][t]) for t in task_names) + f" | {_pm(tune_s.get(m), 0)} |")
        pairs = [(m, ref) for ref in ("random", "perplexity") for m in rows if m not in (ref, "base", "random")]
        if len(seeds) > 1 and pairs:
            lines += ["", f"Paired over seeds, {k}: each subset's figure minus the reference's on the same seed, mean ± "
                      "std, and in brackets mean / sample std (above 2: a gain beyond the seeds' noise):", "",
                      "| subset - reference | " + " | ".join(heading) + " |", "|---|" + "---|" * len(task_names)]
            for m, ref in pairs:
                gaps = [paired_gap(acc, m, ref, t) for t in task_names]
                if any(gaps):
                    lines.append(f"| {m} - {ref} | " + " | ".join(
                        "n/a" if g is None else f"{g['mean']:+.4f} ± {g['std']:.4f} ({_v(g['z'], 1)})" for g in gaps)
                        + " |")
    lines += ["", "Per seed:", "", "| | " + " | ".join(f"seed {x}" for x in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for k, r in result["results"].items():
        for name in ("cluster_auroc", "record_auroc", "harm_in_bad_clusters"):
            lines.append(f"| {k} {name} | " + " | ".join(_v(v) for v in r[name]["values"]) + " |")
        for m in methods:
            if m in r["harmful_share"]:
                lines.append(f"| {k} {m} harmful share | " + " | ".join(_v(v) for v in r["harmful_share"][m]["values"]) + " |")
    if result.get("seconds"):
        lines += ["", "Wall seconds: " + ", ".join(f"{k} {v:g}" for k, v in result["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def paired_gap(acc: dict, method: str, reference: str, task: str) -> dict | None:
    """`method`'s figure on `task` minus `reference`'s, seed by seed: {mean, std, values, z}, z = mean over the
    gaps' sample standard deviation (None when it is 0 or there are fewer than two seeds)."""
    if method not in acc or reference not in acc or task not in acc[method] or task not in acc[reference]:
        return None
    gaps = [a - b for a, b in zip(acc[method][task]["values"], acc[reference][task]["values"])
            if a is not None and b is not None]
    if not gaps:
        return None
    out = stats(gaps)  # rounded, so that equal gaps have no spread
    spread = float(np.std(out["values"], ddof=1)) if len(gaps) > 1 else 0.0
    return {**out, "z": _round(out["mean"] / spread) if spread > 1e-9 else None}


SUMMARY_METHODS = ("qocs", "qwcs+blend", "qwcs+blend3", "qfcs60+blend3", "perplexity", "ifd", "length",
                   "cluster_uniform", "dsir", "random")


def worst_case(result: dict, method: str) -> float | None:
    """A method's worst harmful share over random's, over every result row (protocol, dev set, kind family)."""
    ratios = [r["vs_random"][method]["mean"] for r in result["results"].values()
              if method in r.get("vs_random", {}) and r["vs_random"][method]["mean"] is not None]
    return max(ratios) if ratios else None


def _percent(stat: dict | None) -> str:
    return "n/a" if stat is None or stat["mean"] is None else f"{100 * stat['mean']:.1f}%"


def summary(result: dict) -> str:
    """The README's table: per protocol, dev set and kind family, the record AUROC of the valuation and each
    method's harmful share (means over seeds; docs/results/real_quality.md has the spreads); the last row, each
    method's worst share over random's across the rows."""
    present = {m for r in result["results"].values() for m in r["harmful_share"]}
    methods = [m for m in SUMMARY_METHODS if m in present]
    lines = ["| protocol / dev set / harm | record AUROC | pool | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for key, r in result["results"].items():
        lines.append(f"| {key} | {_v(r['record_auroc']['mean'], 2)} | {_percent(r['pool_harmful_share'])} | "
                     + " | ".join(_percent(r["harmful_share"].get(m)) for m in methods) + " |")
    rows = result["results"].values()

    def worst(m: str) -> str:  # over the rows that ran the method, saying so where some did not
        ran = sum(m in r["harmful_share"] for r in rows)
        return f"**{_v(worst_case(result, m), 2)}**" + (f" ({ran} of {len(rows)} rows)" if ran < len(rows) else "")
    lines.append("| **worst share / random's** | | | " + " | ".join(worst(m) for m in methods) + " |")
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------

def build_base(raw: dict) -> tuple[str, float]:
    """The tiny base model built once in a temporary folder (repository base params + --set): (path, seconds)."""
    where = Path(tempfile.mkdtemp(prefix="shed-real-quality-base-"))
    os.chdir(where)
    try:
        seconds = tables.run_stage("base", raw)
    finally:
        os.chdir(ROOT)
    return str(where / "models/base"), seconds


def method_name(text: str) -> str:
    """--methods' check: a name of METHODS, a qfcs one with its share as two digits (qfcs60+blend3), and either
    with "@members" where it has a within order (qocs+blend3@members)."""
    base = text.removesuffix(tables.MEMBERS)
    if tables.plain_method(base) in METHODS and (base == text or "+" in base and scored(base)):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: not a method (choose from {', '.join(METHODS)}; qfcsNN[+W] sets "
                                     "sample.exclude to NN%; M+W@members ranks the clusters by W)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--dev", choices=("alpaca", "mmlu", "both"), default="both")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="smollm2: models/smollm2 (shed fetch-model) with a CPU-sized recipe (" +
                             ", ".join(f"{k} {v}" for k, v in SMOLLM2_CPU.items()) + "; --set changes any); "
                             "tiny: --base-model with the repository's recipe")
    parser.add_argument("--base-model", default=str(ROOT / "models/base"),
                        help="tiny: a built models/base; when it has no config.json one is built once (base params + --set)")
    parser.add_argument("--pool-size", type=int, default=1000)
    parser.add_argument("--dev-size", type=int, default=32, help="dev records (alpaca) or questions (mmlu)")
    parser.add_argument("--clusters", type=int, default=0, help="cluster.C; 0 = pool size / 20")
    parser.add_argument("--embed", choices=("static", "minilm"), default="static",
                        help="static:all-MiniLM-L6-v2 (fast) or all-MiniLM-L6-v2 with torch")
    parser.add_argument("--fields", choices=("record", "output"), default="record",
                        help="embed.fields: the whole record (instruction, input, output) or the response alone")
    parser.add_argument("--valuations", nargs="+", choices=tuple(VALUATIONS), default=["forward"],
                        help="; ".join(f"{v}: " + ", ".join(f"{k} {x}" for k, x in d.items()) for v, d in VALUATIONS.items()))
    parser.add_argument("--methods", nargs="+", type=method_name, default=list(DEFAULT_METHODS),
                        help="sample methods; qocs+W / qwcs+W: sample.within W; qfcsNN: QFCS at sample.exclude NN%%; "
                             "qocs@meanloss: QOCS on clusters scored by their members' mean base-model loss (needs a "
                             "valuation that measured it: forward)")
    parser.add_argument("--subset", type=float, default=0.1, help="sample.subset_size")
    parser.add_argument("--bad-sources", type=int, default=1)
    parser.add_argument("--bad-rate", type=float, default=0.85)
    parser.add_argument("--background-rate", type=float, default=0.02)
    parser.add_argument("--scattered-rate", type=float, default=0.2)
    parser.add_argument("--kinds", nargs="+", choices=KINDS + tuple(FAMILIES), default=list(LOSS_KINDS),
                        help="corruption kinds or families (" + "; ".join(f"{f}: {', '.join(k)}" for f, k in
                                                                          FAMILIES.items()) + ")")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune on each subset and the full pool, and evaluate (--tasks, --heldout)")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS.values()), default=list(TASKS.values()),
                        help="with --finetune: the multiple-choice tasks evaluate scores")
    parser.add_argument("--limit", type=int, default=0, help="evaluate.limit: questions per task (0 = all)")
    parser.add_argument("--no-full-pool", action="store_true",
                        help="with --finetune: do not fine-tune on the whole pool (the costliest fine-tune: 10x a subset's)")
    parser.add_argument("--heldout", type=int, default=0, metavar="N",
                        help="with --finetune: also score N clean Alpaca records never in the pool or the dev set "
                             "(evaluate.heldout: mean per-token log-likelihood of their responses)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("-v", "--verbose", action="store_true", help="the stages' INFO logs")
    tables.add_arguments(parser)
    parser.add_argument("--readme", metavar="PATH", help="with --from-json: also write the summary table into PATH's "
                        "real_quality block (between <!-- real_quality:begin --> and <!-- real_quality:end -->)")
    parser.add_argument("--cache", metavar="DIR", help="the forward valuation's loss store, shared by every workspace "
                        "(default: a temporary folder of this run); a saved one makes a rerun score nothing again")
    args = parser.parse_args(argv)
    args.kinds = list(resolve_kinds(args.kinds))
    args.family = family_of(args.kinds)
    return args


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    if args.cache is None:
        args.cache = tempfile.mkdtemp(prefix="shed-real-quality-losses-")
    args.cache = str(Path(args.cache).resolve())
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    args.devs = ["alpaca", "mmlu"] if args.dev == "both" else [args.dev]
    for path in [ALPACA] + ([MMLU] if "mmlu" in args.devs else []) + ([ARC_EASY, ARC_CHALLENGE] if args.finetune else []):
        if not path.exists():
            raise SystemExit(f"{path}: not found (the shared data folder, ../shared/data next to the repository)")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    seconds: dict[str, float] = {}
    if args.model == "smollm2":
        if not (SMOLLM2 / "config.json").is_file():
            raise SystemExit(f"{SMOLLM2}: no model; run `shed fetch-model` first (or --model tiny)")
        model_dir = str(SMOLLM2)
    else:
        model_dir = str(Path(args.base_model).resolve())
        if not (Path(model_dir) / "config.json").is_file():
            for item in args.set:
                key, value = item.split("=", 1)
                tables.set_dotted(raw, key, yaml.safe_load(value))
            model_dir, seconds["base"] = build_base(raw)
            log(f"tiny base model built in {seconds['base']:.0f} s -> {model_dir}")
    args.settings = settings(args, model_dir)
    alpaca = json.loads(ALPACA.read_text(encoding="utf-8"))
    per_key: dict[str, list[dict]] = {}
    for protocol in args.protocols:
        for seed in args.seeds:
            log(f"{protocol}, seed {seed}")
            t = time.perf_counter()
            for key, row in one_workspace(protocol, seed, args, raw, alpaca).items():
                per_key.setdefault(key, []).append(row)
            seconds[f"{protocol}/seed {seed}"] = round(time.perf_counter() - t, 1)
    results = {key: summarize(rows) for key, rows in per_key.items()}
    seconds["total"] = round(time.perf_counter() - start, 1)
    s = args.settings
    return {
        "benchmark": "real_quality", "seeds": args.seeds, "results": results,
        "targets": {key: targets(r, key.split("/")[0]) for key, r in results.items()},
        "settings": repository_relative({"model": args.model, "model_dir": model_dir, "pool_size": args.pool_size, "dev_size": args.dev_size,
                     "clusters": s["cluster.C"], "embed_model": s["embed.model"], "embed_fields": s["embed.fields"],
                     "valuations": args.valuations, "methods": args.methods, "subset": args.subset,
                     "protocols": args.protocols, "devs": args.devs, "bad_sources": args.bad_sources,
                     "bad_rate": args.bad_rate, "background_rate": args.background_rate,
                     "scattered_rate": args.scattered_rate, "kinds": args.kinds, "family": family_of(args.kinds),
                     "finetune": args.finetune, "tasks": args.tasks if args.finetune else [],
                     "heldout": args.heldout if args.finetune else 0, "limit": args.limit, "params": s}),
        "seconds": seconds, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def repository_relative(value):
    """`value` with every absolute path under the repository's parent folder written relative to the repository
    (saved settings name ../shared/data/..., models/smollm2, not the machine they ran on)."""
    if isinstance(value, dict):
        return {k: repository_relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repository_relative(v) for v in value]
    if isinstance(value, str) and value.startswith(str(ROOT.parent) + os.sep):
        return os.path.relpath(value, ROOT)
    return value


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.from_json:
        result = read_saved(args.from_json)
        tables.write_markdown(markdown(result, args.from_json), args.markdown)
        if args.readme:
            tables.write_block(args.readme, "real_quality", summary(result))
        return
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    markdown_path = str(Path(args.markdown).resolve()) if args.markdown else None  # the run changes directory
    result = run(args)
    for key, r in result["results"].items():
        share = r["harmful_share"]
        log(f"{key}: cluster AUROC {_pm(r['cluster_auroc'])}, record AUROC {_pm(r['record_auroc'])}, harm in bad "
            f"clusters {_pm(r['harm_in_bad_clusters'])}; harmful share " + ", ".join(f"{m} {_pm(v)}" for m, v in share.items())
            + f" (pool {_pm(r['pool_harmful_share'])})")
    print(json.dumps(result, sort_keys=True), flush=True)
    if markdown_path:
        tables.write_markdown(markdown(result, None), markdown_path)


if __name__ == "__main__":
    main()
