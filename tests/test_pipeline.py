"""End to end: the DVC pipeline on a tiny config in a temporary git repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
TINY = {
    "prepare": {"embedded": {"size": 200, "dev_size": 30, "eval_size": 40}},
    "base": {"vocab_size": 512, "hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128,
             "pretrain_steps": 10},
    "cluster": {"C": 8},
    "train": {"epochs": 1},
    "shapley": {"k": 2, "n": 4},
    "evaluate": {"include_base": False},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


# dvc runs each stage's `shed ...` through the shell: the venv's bin must be on PATH.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def sh(cwd, *cmd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(ROOT / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(ws, "git", "init", "-q", "-b", "main")
    sh(ws, DVC, "init", "-q")
    sh(ws, DVC, "config", "core.analytics", "false")
    out = sh(ws, DVC, "repro")
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-q", "-m", "tiny pipeline")
    return ws, out


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
