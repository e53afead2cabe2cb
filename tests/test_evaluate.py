"""The evaluate stage's held-out log-likelihood (evaluate.heldout)."""

import json
import shutil

import pytest
import yaml
from helpers import run_stage

from shed.data import record_id

pytestmark = pytest.mark.slow  # the tiny pipeline reproduced once (the session's `workspace`)


@pytest.fixture
def tuned(workspace, tmp_path):
    """A copy of the reproduced tiny pipeline: its fine-tuned adapter is what evaluate scores."""
    out = tmp_path / "ws"
    shutil.copytree(workspace[0], out, symlinks=True)
    return out


def heldout_rows() -> list[dict]:
    return [{"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i} is blue."}
            for i in range(5)]


def set_params(ws, **evaluate) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["evaluate"].update(evaluate)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_heldout_loglik_is_the_mean_per_token_loglik_of_the_reference_responses(tuned):
    import torch
    from peft import PeftModel

    from shed.models import load_causal_lm
    from shed.prompts import render

    rows = heldout_rows()
    (tuned / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_params(tuned, heldout="heldout.jsonl", include_base=True)
    run_stage(tuned, "evaluate")
    metrics = json.loads((tuned / "metrics/eval.json").read_text())

    base, tokenizer = load_causal_lm(str(tuned / "models/base"), "cpu", "float32")
    tuned = PeftModel.from_pretrained(load_causal_lm(str(tuned / "models/base"), "cpu", "float32")[0],
                                      str(tuned / "models/finetuned")).eval()
    for name, model in [("base", base), ("finetuned", tuned)]:
        total = count = 0
        for row in rows:  # one unpadded sequence at a time
            prompt, response = render(row, "qa")
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
            total += sum(logprobs[len(p) - 1 + j, t].item() for j, t in enumerate(r))
            count += len(r)
        assert metrics[name]["heldout"] == {"loglik": pytest.approx(total / count, abs=1e-4), "n": len(rows)}
    assert metrics["finetuned"]["heldout"]["loglik"] != metrics["base"]["heldout"]["loglik"]


def test_a_heldout_record_that_is_in_the_pool_is_refused_before_any_model_loads(tuned):
    pool_record = json.loads((tuned / "data/prepared/pool.jsonl").read_text().splitlines()[3])
    rows = heldout_rows() + [{k: pool_record[k] for k in ("instruction", "input", "output")}]
    assert record_id(*(rows[-1][k] for k in ("instruction", "input", "output"))) == pool_record["id"]
    (tuned / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_params(tuned, heldout="heldout.jsonl")
    (tuned / "metrics/eval.json").unlink()
    result = run_stage(tuned, "evaluate", ok=False)
    assert result.returncode != 0
    assert "heldout.jsonl: 1 of its 6 records are in the pool" in result.stderr
    assert not (tuned / "metrics/eval.json").exists()
