"""The base stage builds (and pretrains) the tiny Llama only when a configured model is models/base."""

import json
import time

import pytest
from helpers import TINY

from shed.config import Params
from shed.fileio import ShedError
from shed.stages import base


def params_with(**models) -> Params:
    params = Params()
    for key, value in TINY["base"].items():
        setattr(params.base, key, value)
    for key, value in models.items():
        setattr(getattr(params, key), "model", value)
    return params


def test_which_configured_models_are_models_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert base.base_model_users(Params()) == ["shapley.model", "finetune.model"]
    assert base.base_model_users(params_with(shapley="HuggingFaceTB/SmolLM2-135M-Instruct",
                                             finetune="./models/base")) == ["finetune.model"]
    assert base.base_model_users(params_with(shapley=str(tmp_path / "models/base"), finetune="models/smollm2")) == \
        ["shapley.model"]
    assert base.base_model_users(params_with(shapley="models/smollm2", finetune="HuggingFaceTB/SmolLM2-135M")) == []


def test_with_other_models_the_stage_builds_nothing_in_well_under_a_second_and_says_why(tmp_path, monkeypatch):
    from shed.models import load_causal_lm

    other = tmp_path / "my-model"
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    base.main(params_with(shapley=str(other), finetune=str(other)))
    assert time.perf_counter() - start < 0.5
    assert [p.name for p in (tmp_path / "models/base").iterdir()] == ["skipped.json"]
    reason = json.loads((tmp_path / "models/base/skipped.json").read_text())["reason"]
    assert str(other) in reason and "not built" in reason
    assert json.loads((tmp_path / "metrics/base.json").read_text())["skipped"] == reason
    with pytest.raises(ShedError, match=r"^models/base: no model here: no configured model is models/base .*"
                                        r"rerun `shed base`"):
        load_causal_lm("models/base", "cpu", "float32")


@pytest.mark.slow  # a tokenizer trained and 10 pretraining steps: 10-30 s on 2 busy cores
def test_when_finetune_model_is_models_base_the_stage_pretrains_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/base").mkdir(parents=True)
    (tmp_path / "models/base/skipped.json").write_text('{"reason": "an earlier run"}')  # replaced whole
    base.main(params_with(shapley="HuggingFaceTB/SmolLM2-135M-Instruct"))
    files = {p.name for p in (tmp_path / "models/base").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "skipped.json" not in files
    metrics = json.loads((tmp_path / "metrics/base.json").read_text())
    assert metrics["pretrain_steps"] == TINY["base"]["pretrain_steps"] and metrics["pretrain_loss"] > 0
    assert "skipped" not in metrics
