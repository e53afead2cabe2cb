"""Shared by the end-to-end tests: a tiny config, and running commands in a DVC workspace."""

import json
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


# --- the shapley stage run as a user runs it (tests/test_shapley_stage.py, tests/test_inrun_stage.py) ---
STAGE_ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def write_stage_params(ws, epochs: int = 1, **shapley) -> None:
    """params.yaml in `ws`: the shipped one with the tiny settings, k = 2, n = 1, then `shapley` and `epochs`."""
    import yaml

    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), merge(TINY, {"shapley": {"k": 2, "n": 1}}))
    params["shapley"].update(shapley)
    params["train"]["epochs"] = epochs
    (Path(ws) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def records_dev_inputs(ws, dev: list[dict], overrides: dict) -> Path:
    """prepare (a dev file of these instruction records), base, embed and cluster in-process in `ws`, with the
    tiny settings and `overrides`: the shapley stage's inputs. Returns `ws`."""
    import pytest
    import yaml

    from shed.config import load_params
    from shed.stages import base, cluster, embed, prepare

    ws = Path(ws)
    (ws / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   merge(TINY, merge({"prepare": {"dev": "dev.jsonl"}}, overrides)))
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        loaded = load_params("params.yaml")
        for stage in (prepare, base, embed, cluster):
            stage.main(loaded)
    return ws


def start_stage(ws, stage: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shed", stage], cwd=ws, env=STAGE_ENV, **kwargs)


def run_stage(ws, stage: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`shed <stage>` in `ws`; with ok, asserts it succeeded (its stderr otherwise)."""
    result = subprocess.run([sys.executable, "-m", "shed", stage], cwd=ws, capture_output=True, text=True,
                            env=STAGE_ENV, check=False)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_stage_when(ws, ready, stage: str = "shapley", timeout: float = 300) -> None:
    """Start `shed <stage>` in `ws` and SIGKILL it as soon as `ready()` holds (polled every 5 ms)."""
    import signal
    import time

    proc = start_stage(ws, stage, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def shapley_metrics(ws) -> dict:
    return json.loads((Path(ws) / "metrics/shapley.json").read_text())


def tiny_llama(records: list[dict], questions: list[dict], corpus: list[str] = ()):
    """(model, tokenizer): a 2-layer Llama (sharpened logits) whose tokenizer learnt `corpus`, then the records
    (qa template) and the questions."""
    import torch

    from shed import tiny
    from shed.config import BaseConfig
    from shed.prompts import render

    corpus = list(corpus) + [" ".join(render(r, "qa")) for r in records] * 10
    corpus += [f"Question: {q['question']}\nAnswer: {' '.join(q['choices'])}" for q in questions] * 10
    tokenizer = tiny.train_tokenizer(corpus, 300)
    model = tiny.build_model(BaseConfig(vocab_size=300, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                                        max_length=64, pretrain_steps=0), tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model, tokenizer


def tiny_float64_trainer(records: list[dict], questions: list[dict], train, corpus: list[str] = ()):
    """A LoRA trainer on `tiny_llama` in float64 (reference sums agree to 1e-9)."""
    from shed.training import LoraTrainer

    trainer = LoraTrainer(*tiny_llama(records, questions, corpus), train)
    trainer.model.double()
    return trainer


def move_lora_b_off_zero(model, seed: int, scale: float = 0.3) -> None:
    """Every LoRA B matrix set to seeded normal values times `scale`: a fresh B = 0 would leave every A
    gradient 0, and the A half of per-example gradients untested."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)


def tiny_random_lm(vocab_size: int = 320, corpus_lines: int = 400):
    """(model in eval mode, tokenizer): a seeded, untrained one-layer tiny Llama for scoring tests."""
    import torch

    from shed import tiny
    from shed.config import BaseConfig

    tokenizer = tiny.train_tokenizer(tiny.tokenizer_corpus(0)[:corpus_lines], vocab_size)
    torch.manual_seed(0)
    model = tiny.build_model(BaseConfig(vocab_size=vocab_size, hidden_size=32, layers=1, heads=2,
                                        intermediate_size=64), tokenizer)
    return model.eval(), tokenizer
