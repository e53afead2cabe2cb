"""Shared by the end-to-end tests: a tiny config, and running commands in a DVC workspace."""

import os
import re
import subprocess
import sys
from pathlib import Path

from shed.config import merge_overrides as merge  # noqa: F401  (the tests' tiny configs use it)

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
TINY = {
    "prepare": {"embedded": {"pool_size": 200, "dev_size": 30, "eval_size": 40}},
    "base": {"vocab_size": 512, "hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128,
             "pretrain_steps": 10},
    "cluster": {"C": 8},
    "train": {"epochs": 1},
    "shapley": {"k": 2, "n": 4},
    "evaluate": {"include_base": False},
}
# dvc runs each stage's `shed ...` through the shell: the venv's bin must be on PATH.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def sh(cwd, *cmd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def restore_head(ws) -> None:
    """Put the workspace back at its commit (earlier tests' `dvc exp run`s leave theirs applied)."""
    sh(ws, "git", "checkout", "-q", "HEAD", "--", "params.yaml", "dvc.lock")
    sh(ws, DVC, "checkout", "-q", "--force")


def wait_for_queue(ws, timeout: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        status = sh(ws, DVC, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            return status
        time.sleep(5)


def choice_sums(model, tokenizer, question):
    """Each choice's summed log-likelihood, one unpadded sequence at a time (scoring without lm-eval)."""
    import torch

    from shed.scoring import context_and_choices

    context, choices = context_and_choices(question)
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
        out.append(sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return torch.tensor(out)


def fails_reading(path, text, read, match):
    """A file holding `text`, read with `read(str(path))`, fails with one ShedError matching `match`."""
    import pytest

    from shed.fileio import ShedError

    path.write_text(text, encoding="utf-8")
    with pytest.raises(ShedError, match=match):
        read(str(path))
