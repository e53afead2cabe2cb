"""End to end: the DVC pipeline on a tiny config in a temporary git repository."""

import json
import shutil

import pytest
from helpers import DVC, choice_sums, ran_stages, sh


def recomputed_accuracy(ws) -> tuple[int, int]:
    """(correct, questions) of the fine-tuned model on the eval set, recomputed here without lm-eval:
    a question is right when its gold choice has the highest summed log-likelihood."""
    from peft import PeftModel

    from shed.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(ws / "models/base"), "cpu", "float32")
    model = PeftModel.from_pretrained(model, str(ws / "models/finetuned")).eval()
    questions = [json.loads(line) for line in (ws / "data/prepared/eval.jsonl").read_text().splitlines()]
    correct = sum(int(choice_sums(model, tokenizer, q).argmax()) == q["answer"] for q in questions)
    return correct, len(questions)


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_outputs(workspace):
    ws, out = workspace
    assert ran_stages(out) == ["prepare", "base", "embed", "cluster", "shapley", "sample", "finetune", "evaluate"]
    dataset = [json.loads(line) for line in (ws / "data/curated/dataset.jsonl").read_text().splitlines()]
    assert len(dataset) == 20  # 10% of 200
    # The chosen rows as the embedded pool generated them (no id); records.jsonl names each, line for line.
    pool = {r["id"]: r for r in map(json.loads, (ws / "data/prepared/pool.jsonl").read_text().splitlines())}
    chosen = [json.loads(line) for line in (ws / "data/curated/records.jsonl").read_text().splitlines()]
    assert dataset == [{k: pool[c["id"]][k] for k in ("instruction", "input", "output")} for c in chosen]
    assert {c["source"] for c in chosen} == {"embedded"} and all(c["at"].startswith("item ") for c in chosen)
    # The fine-tune's dvclive curve: one row per optimizer step.
    steps = json.loads((ws / "metrics/finetune.json").read_text())["steps"]
    loss = (ws / "dvclive/finetune/plots/metrics/loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and [int(line.split("\t")[0]) for line in loss[1:]] == list(range(steps))
    manifest = json.loads((ws / "data/curated/manifest.json").read_text())
    assert manifest["method"] == "qocs" and manifest["size"] == 20
    scores = (ws / "data/shapley/scores.csv").read_text().splitlines()
    assert scores[0] == "cluster,proxy_id,size,score,stderr,credits" and len(scores) == 9
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    assert set(metrics) == {"env", "finetuned"}  # evaluate.include_base: false
    correct, questions = recomputed_accuracy(ws)
    assert questions == metrics["finetuned"]["shed_embedded"]["n"] == 40
    assert metrics["finetuned"]["shed_embedded"]["acc"] == pytest.approx(correct / questions)
    jobs = (ws / "data/shapley_jobs/jobs.jsonl").read_text().splitlines()
    assert len(jobs) == json.loads((ws / "metrics/shapley.json").read_text())["jobs"] == 2 + 2 * (2 - 1)
    for png in ["clusters.png", "shapley.png", "convergence.png"]:
        assert (ws / "plots" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sampler_change_reruns_only_sample_finetune_evaluate(workspace):
    ws, _ = workspace
    out = sh(ws, DVC, "exp", "run", "-S", "sample.method=qwcs")
    assert ran_stages(out) == ["sample", "finetune", "evaluate"]
    assert json.loads((ws / "data/curated/manifest.json").read_text())["method"] == "qwcs"


@pytest.mark.slow
def test_shapley_n_change_reuses_the_job_store_and_skips_upstream(workspace):
    ws, _ = workspace

    def evaluated() -> set[tuple[int, ...]]:
        return {tuple(json.loads(line)["clusters"]) for line in (ws / "data/shapley/subsets.jsonl").read_text().splitlines()}

    def stored_jobs() -> int:
        return len((ws / "data/shapley_jobs/jobs.jsonl").read_text().splitlines())

    before, jobs_before = evaluated(), stored_jobs()
    out = sh(ws, DVC, "exp", "run", "-S", "shapley.n=3", "-S", "sample.method=qocs")
    assert ran_stages(out) == ["shapley", "sample", "finetune", "evaluate"]
    metrics = json.loads((ws / "metrics/shapley.json").read_text())
    after = evaluated()
    assert () in after and tuple(range(8)) in after and () in before and tuple(range(8)) in before
    # C=8, n=3: v(P), v(∅) and two subsets per permutation (fewer if both permutations share one).
    assert metrics["jobs"] == len(after) <= 2 + 2 * (3 - 1)
    # Exactly the subsets the n=4 run already evaluated (v(∅), v(P), any other in common) are reused.
    assert metrics["jobs_reused"] == len(after & before) >= 2
    assert metrics["jobs_run"] == len(after - before) == stored_jobs() - jobs_before


@pytest.mark.slow
def test_every_record_valued_and_the_hybrid_samplers_run_as_experiments(workspace, tmp_path):
    # In a copy: these experiments fill the persistent job store with new contexts, which later tests of the
    # session workspace (tests/test_stale.py) would see as a changed shapley stage.
    ws = tmp_path / "ws"
    shutil.copytree(workspace[0], ws, symlinks=True)
    sh(ws, "git", "checkout", "-q", "HEAD", "--", ".")
    sh(ws, DVC, "checkout", "-q", "--force")
    pool = (ws / "data/prepared/pool.jsonl").read_text().splitlines()
    for settings in (["shapley.method=inrun", "shapley.players=records"],
                     ["shapley.method=forward", "shapley.players=records", "sample.within=loss"]):
        out = sh(ws, DVC, "exp", "run", *[arg for s in settings for arg in ("-S", s)])
        assert ran_stages(out) == ["shapley", "sample", "finetune", "evaluate"], settings
        records = (ws / "data/shapley/record_scores.csv").read_text().splitlines()
        assert records[0] == "id,cluster,score,stderr,tokens,loss" and len(records) == 1 + len(pool)
        assert json.loads((ws / "metrics/shapley.json").read_text())["players"] == "records"
    # A sampler change on top reruns only sample onward; ifd scores the pool under the value model.
    out = sh(ws, DVC, "exp", "run", "-S", "shapley.method=forward", "-S", "shapley.players=records",
             "-S", "sample.method=ifd")
    assert ran_stages(out) == ["sample", "finetune", "evaluate"]
    manifest = json.loads((ws / "data/curated/manifest.json").read_text())
    assert manifest["method"] == "ifd" and manifest["size"] == 20
