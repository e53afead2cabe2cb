"""Prompt templates (alpaca, the paper's vicuna, the tokenizer's chat template) and response-only loss."""

import json
from pathlib import Path

import pytest

from shed import tiny
from shed.config import BaseConfig, TrainConfig
from shed.fileio import ShedError
from shed.prompts import ALPACA_NO_INPUT, TEMPLATES, VICUNA_INPUT, VICUNA_NO_INPUT, Span, render, spans

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


# --- conversations: every reply trained on ------------------------------------------------------------------

SMOLLM2 = Path("/work/main/models/smollm2")
REPLIES = ["Blue", "Red", "Green"]
CONVERSATION = {"id": "c1", "instruction": "Name a colour.", "input": "", "output": "Blue", "messages": [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"},
    {"role": "user", "content": "And another?"}, {"role": "assistant", "content": "Red"},
    {"role": "user", "content": "A third?"}, {"role": "assistant", "content": "Green"}]}
# Each named template's layout of CONVERSATION ({eos}: the tokenizer's EOS), as prompts' docstring defines it.
LAYOUTS = {
    "qa": "Answer in one word.\n\nQuestion: Name a colour.\nAnswer: Blue{eos}\n\nQuestion: And another?\nAnswer: "
          "Red{eos}\n\nQuestion: A third?\nAnswer: Green{eos}",
    "alpaca": "Answer in one word.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue{eos}\n\n### "
              "Instruction:\nAnd another?\n\n### Response:\nRed{eos}\n\n### Instruction:\nA third?\n\n### "
              "Response:\nGreen{eos}",
    "vicuna": "Answer in one word. USER: Name a colour. ASSISTANT:Blue{eos}USER: And another? ASSISTANT:Red{eos}USER: "
              "A third? ASSISTANT:Green{eos}",
}


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive labelled tokens (labels other than -100), each checked equal to its ids."""
    runs, previous = [], -100
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            if previous == -100:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return runs


def encode(record, tokenizer, template, max_length=0, responses_only=True):
    from shed.training import encode_record

    return encode_record(record, tokenizer, template, max_length, responses_only)


@pytest.mark.parametrize("template", sorted(LAYOUTS))
def test_a_conversation_renders_in_the_named_layout_with_every_reply_labelled(tokenizer, template):
    ids, labels = encode(CONVERSATION, tokenizer, template)
    assert tokenizer.decode(ids) == LAYOUTS[template].replace("{eos}", tokenizer.eos_token)
    sep = TEMPLATES[template][2]
    assert labelled_runs(ids, labels) == [tokenizer(sep + reply, add_special_tokens=False)["input_ids"]
                                          + [tokenizer.eos_token_id] for reply in REPLIES]
    prompt_text = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert all(m["content"] in prompt_text for m in CONVERSATION["messages"] if m["role"] != "assistant")
    assert not any(reply in prompt_text for reply in REPLIES)
    assert encode(CONVERSATION, tokenizer, template, responses_only=False) == (ids, ids)


def chat_tokenizers():
    yield "tiny"  # the test tokenizer with a minimal chat template: always
    if SMOLLM2.is_dir():
        yield "smollm2"  # a real chat template (system prompt by default, <|im_end|> ends a turn)


@pytest.fixture
def chat_tokenizer(request, tokenizer):
    if request.param == "tiny":
        return tokenizer, ""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2), "<|im_end|>"


@pytest.mark.parametrize("chat_tokenizer", list(chat_tokenizers()), indirect=True)
def test_a_conversation_under_the_chat_template_labels_every_reply_through_its_end_of_turn(chat_tokenizer):
    tokenizer, end_of_turn = chat_tokenizer
    ids, labels = encode(CONVERSATION, tokenizer, "chat")
    whole = tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert whole.startswith(tokenizer.decode(ids)) and whole[len(tokenizer.decode(ids)):].strip() == ""
    assert [tokenizer.decode(run) for run in labelled_runs(ids, labels)] == [r + end_of_turn for r in REPLIES]
    prompt_text = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert all(m["content"] in prompt_text for m in CONVERSATION["messages"] if m["role"] != "assistant")
    assert not any(reply in prompt_text for reply in REPLIES)


@pytest.mark.parametrize("template", ["qa", "alpaca", "vicuna", "chat"])
def test_a_conversation_is_cut_from_the_end_and_a_single_turn_record_renders_as_before(tokenizer, template):
    ids, labels = encode(CONVERSATION, tokenizer, template)
    cut = len(ids) - 3  # inside the last reply
    assert encode(CONVERSATION, tokenizer, template, max_length=cut) == (ids[:cut], labels[:cut])
    # The first exchange alone, as a conversation of one exchange, is the single-turn record's rendering.
    one = {**NO_INPUT, "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}]}
    if template != "chat":
        assert spans(one, template, tokenizer) == spans(NO_INPUT, template, tokenizer)
    prompt, response = render(NO_INPUT, template, tokenizer)
    assert spans(NO_INPUT, template, tokenizer) == [Span(prompt), Span(response, reply=True, eos=True)]
    with pytest.raises(ValueError, match="renders by prompts.spans"):
        render(CONVERSATION, template, tokenizer)


def test_chat_templates_that_cannot_show_each_reply_are_refused(tokenizer):
    from copy import deepcopy

    marks_the_last = deepcopy(tokenizer)
    marks_the_last.chat_template = ("{% for m in messages %}{% if loop.last %}<|last|>{% endif %}<|{{ m.role }}|>"
                                    "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ShedError, match="renders a conversation's earlier turns differently"):
        spans(CONVERSATION, "chat", marks_the_last)
    no_system = deepcopy(tokenizer)
    no_system.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + tokenizer.chat_template)
    with pytest.raises(ShedError, match=r"chat template refuses a conversation \(System role not supported\)"):
        spans(CONVERSATION, "chat", no_system)
