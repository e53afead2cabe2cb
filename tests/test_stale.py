"""Nothing stale: an edit to the code that trains or scores reruns the stages and Shapley jobs it affects."""

import json
import os
import shutil

import pytest
from helpers import DVC, ENV, ran_stages, sh

pytestmark = pytest.mark.slow  # runs dvc and the shapley stage in a copy of the tiny workspace


def changed_stages(ws) -> set[str]:
    """Stages `dvc status` reports as changed."""
    status = json.loads(sh(ws, DVC, "status", "--json"))
    return {name.split(":")[-1] for name in status}


@pytest.fixture
def copy(workspace, tmp_path):
    """A copy of the reproduced tiny workspace whose own src/ is the code that runs."""
    ws, _ = workspace
    dest = tmp_path / "ws"
    shutil.copytree(ws, dest, symlinks=True)
    # Back to the committed pipeline: earlier tests' experiments leave their params, lock and
    # uncached metrics and plots applied.
    sh(dest, "git", "checkout", "-q", "HEAD", "--", ".")
    sh(dest, DVC, "checkout", "-q", "--force")
    return dest


def run_own_code(ws, *cmd):
    env = {**ENV, "PYTHONPATH": f"{ws / 'src'}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    import subprocess

    result = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


# prompts.py also renders the embedded pool's pretraining text (prepare, base); `dvc status` names
# the stages whose own deps changed, not those downstream of them.
# sample reads training.py too: the perplexity baseline tokenises records as the trainer does; evaluate renders
# prompts.py's spans for evaluate.heldout.
@pytest.mark.parametrize("module, changed", [("prompts.py", {"prepare", "base", "shapley", "sample", "finetune",
                                                            "evaluate"}),
                                             ("training.py", {"shapley", "sample", "finetune"})])
def test_editing_training_code_marks_shapley_and_finetune_changed_and_reruns_every_job(copy, module, changed):
    assert changed_stages(copy) == set()
    with (copy / "src/shed" / module).open("a") as fh:
        fh.write("\n# an edit that could change what a job computes\n")
    assert changed_stages(copy) == changed
    jobs = json.loads((copy / "metrics/shapley.json").read_text())["jobs"]
    out = run_own_code(copy, DVC, "repro", "shapley")
    assert "shapley" in ran_stages(out)
    metrics = json.loads((copy / "metrics/shapley.json").read_text())
    assert metrics["jobs_run"] == jobs and metrics["jobs_reused"] == 0


def test_editing_the_sampler_reruns_sample_onward_and_reuses_every_job(copy):
    with (copy / "src/shed/sampling.py").open("a") as fh:
        fh.write("\n# an edit to the sampler\n")
    assert changed_stages(copy) == {"sample"}
    with (copy / "src/shed/jobstore.py").open("a") as fh:
        fh.write("\n# an edit outside the jobs' code\n")
    assert changed_stages(copy) == {"sample", "shapley"}
    run_own_code(copy, DVC, "repro", "shapley")
    metrics = json.loads((copy / "metrics/shapley.json").read_text())
    assert metrics["jobs_run"] == 0 and metrics["jobs_reused"] == metrics["jobs"]
