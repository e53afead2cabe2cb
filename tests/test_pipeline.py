"""End to end: the DVC pipeline on a tiny config in a temporary git repository."""

import json

import pytest
from helpers import DVC, ran_stages, sh


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_outputs(workspace):
    ws, out = workspace
    assert ran_stages(out) == ["prepare", "base", "embed", "cluster", "shapley", "sample", "finetune", "evaluate"]
    dataset = (ws / "data/curated/dataset.jsonl").read_text().splitlines()
    assert len(dataset) == 20  # 10% of 200
    manifest = json.loads((ws / "data/curated/manifest.json").read_text())
    assert manifest["method"] == "qocs" and manifest["size"] == 20
    scores = (ws / "data/shapley/scores.csv").read_text().splitlines()
    assert scores[0] == "cluster,proxy_id,size,score,stderr,credits" and len(scores) == 9
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    assert 0.0 <= metrics["finetuned"]["shed_embedded"]["acc"] <= 1.0
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
    out = sh(ws, DVC, "exp", "run", "-S", "shapley.n=3", "-S", "sample.method=qocs")
    assert ran_stages(out) == ["shapley", "sample", "finetune", "evaluate"]
    metrics = json.loads((ws / "metrics/shapley.json").read_text())
    assert metrics["jobs_reused"] >= 2  # v(P) and v(∅) come from the persistent job store
