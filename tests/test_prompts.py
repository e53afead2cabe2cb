"""Prompt templates (alpaca, the paper's vicuna, the tokenizer's chat template) and response-only loss."""

import json
from pathlib import Path

import pytest

from shed import tiny
from shed.config import BaseConfig, TrainConfig
from shed.fileio import ShedError
from shed.prompts import ALPACA_NO_INPUT, VICUNA_INPUT, VICUNA_NO_INPUT, render

REFERENCE = Path(__file__).resolve().parents[2] / "shared/data/shed_reference/vicuna_prompt_template.json"
WITH_INPUT = {"id": "r1", "instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
NO_INPUT = {"id": "r2", "instruction": "Say hi.", "input": "", "output": "Hi"}


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny.train_tokenizer(["Say hi. Hello Hi Translate Bonjour Question Answer"] * 50, 300)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


@pytest.mark.skipif(not REFERENCE.is_file(), reason="the authors' template is not present")
def test_vicuna_is_the_authors_template_byte_for_byte():
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert VICUNA_INPUT == reference["prompt_input"]
    assert VICUNA_NO_INPUT == reference["prompt_no_input"]


def test_vicuna_and_alpaca_render_with_and_without_input():
    prompt, response = render(WITH_INPUT, "vicuna")
    assert prompt.endswith("USER: Translate. Bonjour ASSISTANT: ") and response == "Hello"
    prompt, response = render(NO_INPUT, "vicuna")
    assert prompt.endswith("USER: Say hi. ASSISTANT:") and response == "Hi"
    assert render(NO_INPUT, "alpaca") == (ALPACA_NO_INPUT.format(instruction="Say hi."), "Hi")
    assert "### Input:\nBonjour\n\n### Response:\n" in render(WITH_INPUT, "alpaca")[0]


def test_chat_template_comes_from_the_tokenizer(tokenizer):
    prompt, response = render(WITH_INPUT, "chat", tokenizer)
    assert prompt == "<|user|>Translate.\n\nBonjour\n<|assistant|>" and response == "Hello"


def test_chat_without_a_template_and_unknown_templates_are_refused(tokenizer):
    bare = tiny.train_tokenizer(["a b c"] * 10, 280)
    with pytest.raises(ShedError, match="needs a tokenizer with a chat template"):
        render(NO_INPUT, "chat", bare)
    with pytest.raises(ShedError, match="unknown template 'pirate'"):
        render(NO_INPUT, "pirate")


@pytest.mark.parametrize("template", ["qa", "alpaca", "vicuna", "chat"])
@pytest.mark.parametrize("responses_only", [True, False])
def test_loss_covers_the_response_only_when_asked(tokenizer, template, responses_only):
    from shed.training import LoraTrainer

    model = tiny.build_model(BaseConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_length=512),
                             tokenizer)
    cfg = TrainConfig(template=template, responses_only=responses_only, max_length=512)
    ids, labels = LoraTrainer(model, tokenizer, cfg).encode(WITH_INPUT)
    prompt, response = render(WITH_INPUT, template, tokenizer)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert len(ids) == len(labels)
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert labels[:n_prompt] == ([-100] * n_prompt if responses_only else ids[:n_prompt])
