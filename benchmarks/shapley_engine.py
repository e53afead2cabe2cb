"""Benchmark of the Shapley engine on a real 12-proxy game (tiny Llama + LoRA, CPU).

    PYTHONPATH=src python benchmarks/shapley_engine.py [--seeds 10] [--max-k 3000] [--jobs 10]

(a) Throughput: the same job list run by the engine (one process, model loaded once) and in the
    authors' style (a fresh `python` process per job that reloads model and data); jobs/minute.
(b) Sample efficiency: all 2^12 subsets are fine-tuned and scored once (cached in
    benchmarks/.cache, gitignored), exact Shapley values are enumerated, and each estimator is
    run on the cached game: the evaluations it needs until its ranking reaches, and keeps,
    Spearman rho >= 0.95 with the exact values, averaged over seeds.
(c) In-run valuation (shapley.method inrun, shed.inrun): k training runs on all 12 proxies,
    credited step by step, in both credit directions (sgd, adam); Spearman rho of its values with
    the reference after each run and its wall time, next to each retrain estimator's rho at the
    same wall time (the evaluations that time buys, at the measured seconds per job; mean over
    seeds) and, with the exact game, the evaluations each needs to rank as well as in-run does.
    The reference is the exact values; with --no-exact the 4,096 subsets are not all fine-tuned and
    the reference is a KernelSHAP (regression) estimate from --reference-jobs fine-tunes of the same
    game (through the same job store, so a later full run reuses them), which favours regression.
The last line printed is one JSON object with every figure. `--markdown PATH` also writes the
tables as Markdown from that dict; `--from-json FILE` renders them from a saved JSON line and runs nothing:

    python benchmarks/shapley_engine.py --from-json docs/results/shapley_engine.json --markdown docs/results/shapley_engine.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tables  # benchmarks/, the script's own folder
import yaml

ROOT = Path(__file__).resolve().parents[1]
WS = ROOT / "benchmarks/.cache/ws"
PLAYERS = 12
PARAMS = {
    "prepare": {"embedded": {"pool_size": 240, "dev_size": 30, "eval_size": 40}},
    "base": {"vocab_size": 512, "hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128,
             "pretrain_steps": 60},
    "cluster": {"C": PLAYERS},
    "train": {"epochs": 2, "batch_size": 16, "max_length": 64},
}
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# The code a cached game's values come from: when it changes, the cache is rebuilt.
GAME_CODE = ["shed.stages.prepare", "shed.stages.base", "shed.stages.embed", "shed.stages.cluster", "shed.executors"]


def prepare_workspace() -> None:
    """A 12-cluster workspace made by the pipeline's own stages (once; kept in the cache)."""
    from shed.codedeps import fingerprint
    from shed.config import merge_overrides

    params = yaml.safe_dump(merge_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), PARAMS), sort_keys=False)
    code = fingerprint(GAME_CODE)
    if (WS / "params.yaml").exists() and (WS / "params.yaml").read_text() == params \
            and (WS / "code.sha256").exists() and (WS / "code.sha256").read_text() == code \
            and (WS / "data/clusters/proxies.csv").exists():
        return
    shutil.rmtree(WS, ignore_errors=True)
    WS.mkdir(parents=True)
    (WS / "params.yaml").write_text(params)
    (WS / "code.sha256").write_text(code)
    for stage in ["prepare", "base", "embed", "cluster"]:
        subprocess.run([sys.executable, "-m", "shed", stage], cwd=WS, env=ENV, check=True, capture_output=True)


def load_game():
    """(params, proxy records by cluster, dev set, jobs for every subset keyed by frozenset)."""
    from shed import artifacts
    from shed.config import load_params
    from shed.jobstore import subset_key

    params = load_params("params.yaml")
    pool = {r["id"]: r for r in artifacts.read_pool()}
    _, proxies = artifacts.read_clusters()
    records = {int(c): pool[p] for c, p in zip(proxies["cluster"], proxies["proxy_id"])}

    def job(subset: frozenset) -> dict:
        rows = [records[c] for c in sorted(subset)]
        key = subset_key([r["id"] for r in rows])
        return {"key": key, "records": rows, "seed": params.train.seed}

    return params, records, artifacts.read_dev(), job


def job_spec(params, dev: list[dict]):
    from shed import artifacts
    from shed.executors import JobSpec

    cfg = params.shapley
    return JobSpec(model=cfg.model, device="cpu", dtype=cfg.dtype, train=params.train, value=cfg.value, dev=dev,
                   dev_path=artifacts.DEV)


def job_list(count: int) -> list[frozenset]:
    from shed.shapley import schedule

    return schedule("group_permutation", list(range(PLAYERS)), 20, 1, 0)[:count]


def run_jobs(indices: list[int]) -> None:
    """One process: load model and data once, run the jobs, print their values (JSON)."""
    from shed.executors import JobRunner

    params, _, dev, job = load_game()
    runner = JobRunner(job_spec(params, dev), "cpu", threads=1)  # one core each: the machine is shared
    subsets = job_list(max(indices) + 1)
    print(json.dumps([runner.run(job(subsets[i]))["value"] for i in indices]))


def throughput(count: int) -> dict:
    def timed(indices: list[int]) -> tuple[float, list[float]]:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--run-jobs", ",".join(map(str, indices))], cwd=WS, env=ENV,
                             check=True, capture_output=True, text=True).stdout
        return time.perf_counter() - start, json.loads(out.strip().splitlines()[-1])

    engine_seconds, engine_values = timed(list(range(count)))
    authors = [timed([i]) for i in range(count)]
    authors_seconds = sum(t for t, _ in authors)
    same = engine_values == [v[0] for _, v in authors]
    figures = {"jobs": count, "engine_jobs_per_minute": round(60 * count / engine_seconds, 1),
               "authors_jobs_per_minute": round(60 * count / authors_seconds, 1),
               "speedup": round(authors_seconds / engine_seconds, 2), "same_values": same}
    print(f"(a) {count} jobs: engine {engine_seconds:.1f} s, one process per job {authors_seconds:.1f} s "
          f"-> {figures['speedup']}x; identical values: {same}")
    return figures


def full_game() -> dict[frozenset, float]:
    """v for all 4096 subsets, through the stage's job store (resumable, cached)."""
    from shed.executors import JobRunner
    from shed.jobstore import JobStore, job_context
    from shed.shapley import all_subsets

    params, _, dev, job = load_game()
    store = JobStore(WS / "game/jobs.jsonl", job_context(params.shapley.model, params.train, params.shapley.value,
                                                         [q["id"] for q in dev]))
    subsets = all_subsets(list(range(PLAYERS)))
    jobs = {s: job(s) for s in subsets}
    missing = [j for j in jobs.values() if j["key"] not in store.values]
    start = time.perf_counter()
    runner = JobRunner(job_spec(params, dev), "cpu", threads=1) if missing else None
    for i, result in enumerate(runner.run(j) for j in missing):
        store.put(result["key"], result["value"], size=result["size"])
        if i % 500 == 499:
            print(f"    {i + 1}/{len(missing)} subsets, {time.perf_counter() - start:.0f} s", flush=True)
    store.close()
    print(f"(b) game: {len(subsets)} subsets, {len(missing)} evaluated now ({time.perf_counter() - start:.0f} s)")
    return {s: store.values[j["key"]] for s, j in jobs.items()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluations_to_rank(game: dict, seeds: int, max_k: int, n: int, target: float = 0.95) -> dict:
    """Per estimator, the mean over seeds of the distinct evaluations it has made when its ranking
    reaches, and keeps to the end of the run, Spearman rho >= target. Permutation estimators run
    max_k orders; the subset-sampling ones (regression, stratified) run until they have drawn every
    subset, where they are exact. A seed that never reaches counts with all its evaluations."""
    from shed.shapley import ESTIMATORS, exact_shapley

    players = list(range(PLAYERS))
    exact = exact_shapley(players, game.__getitem__)
    truth = np.array([exact[p] for p in players])
    exhaust = math.ceil((2 ** PLAYERS - 2) / max(1, math.ceil(PLAYERS / n) - 1))
    figures = {}
    for name, estimator in ESTIMATORS.items():
        needed, reached = [], 0
        k = exhaust if name in ("regression", "stratified") else max_k
        for seed in range(seeds):
            result = estimator(players, game.__getitem__, k=k, n=n, seed=seed)
            rho = [spearman(np.array([e[p] for p in players]), truth) for e in result.estimates]
            # The first iteration from which rho stays >= target (to max_k); max_k's count if never.
            last_bad = max((i for i, r in enumerate(rho) if r < target), default=-1)
            reached += last_bad < len(rho) - 1
            needed.append(result.evaluations_made[min(last_bad + 1, len(rho) - 1)])
        figures[name] = {"evaluations": float(np.mean(needed)), "reached": f"{reached}/{seeds}"}
        print(f"    n={n} {name:18s} {np.mean(needed):7.1f} evaluations (reached in {reached}/{seeds} seeds)")
    return figures


# --- (c) in-run valuation against retraining --------------------------------------------------------

def seconds_per_job(count: int = 6) -> float:
    """Median wall time of one fine-tune-and-score job of this game, one thread (as the game's jobs run)."""
    from shed.executors import JobRunner

    params, _, dev, job = load_game()
    runner = JobRunner(job_spec(params, dev), "cpu", threads=1)
    times = []
    for subset in job_list(count):
        start = time.perf_counter()
        runner.run(job(subset))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class LazyGame:
    """v(S) from the game's job store, fine-tuning (and storing) the subsets not in it yet."""

    def __init__(self):
        from shed.jobstore import JobStore, job_context

        self.params, _, self.dev, self.job = load_game()
        self.store = JobStore(WS / "game/jobs.jsonl", job_context(self.params.shapley.model, self.params.train,
                                                                  self.params.shapley.value, [q["id"] for q in self.dev]))
        self.runner = None
        self.run_now = 0

    def __call__(self, subset: frozenset) -> float:
        job = self.job(subset)
        if job["key"] not in self.store.values:
            if self.runner is None:
                from shed.executors import JobRunner

                self.runner = JobRunner(job_spec(self.params, self.dev), "cpu", threads=1)
            result = self.runner.run(job)
            self.store.put(result["key"], result["value"], size=result["size"])
            self.run_now += 1
        return self.store.values[job["key"]]


def regression_reference(game, jobs: int) -> tuple[np.ndarray, dict]:
    """KernelSHAP values from the largest k whose subsets number at most `jobs` (seed 0), and how stable
    they are: rho between the estimate at half those iterations and at all of them."""
    from shed.shapley import regression, schedule

    players = list(range(PLAYERS))
    k = 1
    while len(schedule("regression", players, k + 1, 1, 0)) <= jobs:
        k += 1
    start = time.perf_counter()
    result = regression(players, game, k=k, n=1, seed=0)
    half = regression(players, game, k=max(1, k // 2), n=1, seed=0)
    values = np.array([result.values[p] for p in players])
    info = {"kind": "regression", "evaluations": len(result.evaluations), "k": k,
            "rho_half_vs_full": round(spearman(np.array([half.values[p] for p in players]), values), 4),
            "values": [round(float(v), 6) for v in values], "seconds": round(time.perf_counter() - start, 1)}
    print(f"(c) reference: KernelSHAP on {info['evaluations']} subsets (k={k}); rho(half, full) = "
          f"{info['rho_half_vs_full']}")
    return values, info


def inrun_runs(k: int, direction: str) -> dict:
    """k in-run valuation runs on the game's 12 proxies (one thread), whole-dev token-weighted values:
    the running values after each run and the wall time of each."""
    import torch

    from shed import inrun
    from shed.models import load_causal_lm
    from shed.training import LoraTrainer, pad_rows

    torch.set_num_threads(1)
    params, records, dev, _ = load_game()
    players = list(range(PLAYERS))
    model, tokenizer = load_causal_lm(params.shapley.model, "cpu", params.shapley.dtype)
    trainer = LoraTrainer(model, tokenizer, params.train)
    dev_batch = pad_rows(inrun.dev_rows(tokenizer, dev), tokenizer.pad_token_id, trainer.device)
    credits = inrun.InRunCredits(players, len(dev), k)
    times = []
    start = time.perf_counter()
    inrun.value_runs(trainer, [records[c] for c in players], players, dev_batch, credits, list(range(k)),
                     direction=direction, on_run=lambda s: times.append(time.perf_counter() - start))
    result = credits.result(inrun.token_weights(dev_batch))
    return {"estimates": [[e[p] for p in players] for e in result.estimates], "seconds": times,
            "steps_per_run": int(credits.steps[0])}


def same_wall_time(game, truth: np.ndarray, budget: int, seeds: int) -> dict:
    """Per retrain estimator (n=1), mean over seeds: rho with `truth` of its estimate from the most
    iterations whose distinct subsets number at most `budget` (one iteration if even one needs more)."""
    from shed.shapley import ESTIMATORS, schedule

    players = list(range(PLAYERS))
    out = {}
    for name, estimator in ESTIMATORS.items():
        rhos, evaluations = [], []
        for seed in range(1, seeds + 1):  # seed 0 made the regression reference
            k = 1
            while len(schedule(name, players, k + 1, 1, seed)) <= budget:
                k += 1
            result = estimator(players, game, k=k, n=1, seed=seed)
            rhos.append(spearman(np.array([result.values[p] for p in players]), truth))
            evaluations.append(len(result.evaluations))
        out[name] = {"rho": round(float(np.mean(rhos)), 4), "rho_min": round(float(np.min(rhos)), 4),
                     "evaluations": float(np.mean(evaluations)), "over_budget": bool(np.mean(evaluations) > budget)}
        print(f"    {name:18s} rho {out[name]['rho']:+.3f} (min {out[name]['rho_min']:+.3f}) "
              f"from {out[name]['evaluations']:.0f} evaluations")
    return out


def inrun_comparison(utility, truth: np.ndarray, k: int, seeds: int, per_job: float, max_k: int,
                     exact_game: dict | None = None) -> dict:
    """(c) for both directions; `utility` gives v(S) (from the cache, or fine-tuning what is missing);
    `exact_game`, when every subset is cached, also gives the evaluations retraining needs to match."""
    out = {"seconds_per_retrain_job": round(per_job, 3), "k": k}
    for direction in ("sgd", "adam"):
        runs = inrun_runs(k, direction)
        rho = [round(spearman(np.array(e), truth), 4) for e in runs["estimates"]]
        seconds = runs["seconds"][-1]
        budget = max(1, int(seconds / per_job))
        print(f"(c) in-run ({direction}), {runs['steps_per_run']} steps a run: rho after each run {rho}, "
              f"{seconds:.1f} s for {k} runs = the time of {budget} retrain jobs; retrain at that time:")
        figures = {"rho": rho, "seconds": [round(t, 2) for t in runs["seconds"]],
                   "values": [round(v, 6) for v in runs["estimates"][-1]], "budget_evaluations": budget,
                   "retrain_same_time": same_wall_time(utility, truth, budget, seeds)}
        if exact_game is not None:  # every subset is cached: what retraining needs to rank as well as in-run does
            print(f"    evaluations to reach (and keep) in-run's rho {rho[-1]}:")
            figures["retrain_evaluations_to_match"] = evaluations_to_rank(exact_game, seeds, max_k, 1,
                                                                          target=rho[-1])
        out[direction] = figures
    return out


PAPER = "group_permutation"


def markdown(out: dict, source: str | None) -> str:
    """The benchmark's tables as Markdown, from the dict it prints as its JSON line."""
    head, origin = tables.header("shapley_engine.py", source)
    lines = head + [
        f"Source: {origin}. A real {PLAYERS}-proxy game of the embedded default (tiny Llama + LoRA, CPU).",
    ]
    if "throughput" in out:
        t = out["throughput"]
        lines += [
            "",
            (f"(a) Throughput, the same {t['jobs']} jobs run by the engine (one process, model loaded once) and in "
             "the authors' style (a fresh process per job):"),
            "",
            "| engine (jobs/min) | one process per job (jobs/min) | speedup | identical values |",
            "|---|---|---|---|",
            (f"| {t['engine_jobs_per_minute']:g} | {t['authors_jobs_per_minute']:g} | {t['speedup']:g}x | "
             f"{'yes' if t['same_values'] else 'no'} |"),
        ]
    if "evaluations_to_rho_0.95" in out:
        lines += retrain_tables(out)
    if "inrun" in out:
        lines += inrun_tables(out)
    return "\n".join(lines) + "\n"


def inrun_tables(out: dict) -> list[str]:
    """(c): in-run's rho and time next to each retrain estimator's rho at the same time."""
    ref, x = out["reference"], out["inrun"]
    truth = ("the exact Shapley values" if ref["kind"] == "exact" else
             f"a KernelSHAP estimate from {ref['evaluations']} fine-tunes (the exact game was not computed; "
             f"this reference favours `regression`; its rho between half and all its iterations: "
             f"{ref['rho_half_vs_full']})")
    lines = ["", (f"(c) In-run valuation ({x['k']} runs on all {PLAYERS} proxies, credited at every step) against "
                  f"{truth}: Spearman ρ after each run, and the wall time of all runs; next to it, each retrain "
                  f"estimator (n = 1) at the same wall time ({x['seconds_per_retrain_job']} s a fine-tune and "
                  "score job), ρ mean over seeds (min in brackets):"), "",
             "| method | ρ | seconds | evaluations |", "|---|---|---|---|"]
    for direction in ("sgd", "adam"):
        f = x[direction]
        lines.append(f"| inrun ({direction}) | {' → '.join(f'{r:+.3f}' for r in f['rho'])} | "
                     f"{f['seconds'][-1]:g} | — |")
        for name, g in f["retrain_same_time"].items():
            note = " (one iteration, over the time)" if g["over_budget"] else ""
            lines.append(f"| retrain {name}{note} | {g['rho']:+.3f} ({g['rho_min']:+.3f}) | "
                         f"{g['evaluations'] * x['seconds_per_retrain_job']:.1f} | {g['evaluations']:g} |")
        if "retrain_evaluations_to_match" in f:
            need = ", ".join(f"{n} {g['evaluations']:,.0f} ({g['reached']})"
                             for n, g in f["retrain_evaluations_to_match"].items())
            lines.append(f"| evaluations each retrain estimator needs to reach and keep ρ {f['rho'][-1]:+.3f} | "
                         f"{need} | | |")
    return lines


def retrain_tables(out: dict) -> list[str]:
    lines = []
    evals = out["evaluations_to_rho_0.95"]
    groups = list(evals)  # "n=1", "n=2"
    estimators = list(next(iter(evals.values())))
    estimators.sort(key=lambda e: (e != PAPER, e))
    lines += [
        "",
        "(b) Distinct evaluations (fine-tunes) an estimator has made when its ranking reaches, and keeps,",
        "Spearman ρ ≥ 0.95 with the exact (enumerated) Shapley values; mean over seeds, seeds that reached",
        "it in brackets (a seed that never reaches counts with all its evaluations); ratio to the paper's",
        f"estimator ({PAPER}) at the same n:",
        "",
        "| estimator | " + " | ".join(f"{g} | ratio" for g in groups) + " |",
        "|---|" + "---|---|" * len(groups),
    ]
    for e in estimators:
        cells = []
        for g in groups:
            f, paper = evals[g][e], evals[g][PAPER]["evaluations"]
            cells.append(f"{f['evaluations']:,.1f} ({f['reached']}) | {f['evaluations'] / paper:.2f}x")
        lines.append(f"| {e}{' (paper)' if e == PAPER else ''} | " + " | ".join(cells) + " |")
    if "best_over_paper_n1" in out:
        lines += ["", f"Best estimator over the paper's at n=1: {out['best_over_paper_n1']:g}x the evaluations."]
    if "exact" in out:
        x = out["exact"]
        lines += ["", (f"The game: v(all {PLAYERS} proxies) = {x['v_full']:.4f}, v(∅) = {x['v_empty']:.4f} "
                  "(dev log-likelihood); exact Shapley values:"), "",
                  "| " + " | ".join(f"proxy {i}" for i in range(len(x["values"]))) + " |",
                  "|" + "---|" * len(x["values"]),
                  "| " + " | ".join(f"{v:+.4f}" for v in x["values"]) + " |"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-k", type=int, default=3000, help="orders run by the permutation estimators")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--no-exact", action="store_true",
                        help="do not fine-tune all 4,096 subsets: (b) is skipped and (c) ranks against a KernelSHAP "
                             "estimate from --reference-jobs fine-tunes")
    parser.add_argument("--reference-jobs", type=int, default=500)
    parser.add_argument("--inrun-k", type=int, default=4, help="in-run valuation runs")
    parser.add_argument("--skip-throughput", action="store_true", help="skip (a)")
    tables.add_arguments(parser)
    parser.add_argument("--run-jobs", help=argparse.SUPPRESS)  # internal: one worker process
    args = parser.parse_args()
    if tables.render_saved(args, markdown):
        return
    if args.run_jobs:
        run_jobs([int(i) for i in args.run_jobs.split(",")])
        return
    markdown_path = str(Path(args.markdown).resolve()) if args.markdown else None  # the run changes directory
    sys.path.insert(0, str(ROOT / "src"))
    prepare_workspace()
    os.chdir(WS)
    out = {} if args.skip_throughput else {"throughput": throughput(args.jobs)}
    per_job = seconds_per_job()
    if args.no_exact:
        lazy = LazyGame()
        truth, out["reference"] = regression_reference(lazy, args.reference_jobs)
        out["reference"]["jobs_run_now"] = lazy.run_now
        out["inrun"] = inrun_comparison(lazy, truth, args.inrun_k, args.seeds, per_job, args.max_k)
        out["inrun"]["jobs_run_now"] = lazy.run_now
        lazy.store.close()
        print(json.dumps(out, sort_keys=True))
        if markdown_path:
            tables.write_markdown(markdown(json.loads(json.dumps(out, sort_keys=True)), None), markdown_path)
        return
    game = full_game()
    from shed.shapley import exact_shapley

    exact = exact_shapley(list(range(PLAYERS)), game.__getitem__)
    print("    exact values:", " ".join(f"{exact[p]:+.4f}" for p in range(PLAYERS)))
    out["exact"] = {"v_full": game[frozenset(range(PLAYERS))], "v_empty": game[frozenset()],
                    "values": [round(exact[p], 6) for p in range(PLAYERS)]}
    out["reference"] = {"kind": "exact", "evaluations": len(game)}
    print(f"(b) evaluations to Spearman rho >= 0.95 with exact values, mean of {args.seeds} seeds:")
    out["evaluations_to_rho_0.95"] = {f"n={n}": evaluations_to_rank(game, args.seeds, args.max_k, n) for n in (1, 2)}
    paper = out["evaluations_to_rho_0.95"]["n=1"]["group_permutation"]["evaluations"]
    best = min(f["evaluations"] for f in out["evaluations_to_rho_0.95"]["n=1"].values())
    out["best_over_paper_n1"] = round(best / paper, 3)
    truth = np.array([exact[p] for p in range(PLAYERS)])
    out["inrun"] = inrun_comparison(game.__getitem__, truth, args.inrun_k, args.seeds, per_job, args.max_k,
                                    exact_game=game)
    print(json.dumps(out, sort_keys=True))
    if markdown_path:
        tables.write_markdown(markdown(json.loads(json.dumps(out, sort_keys=True)), None), markdown_path)


if __name__ == "__main__":
    main()
