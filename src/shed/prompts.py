"""Prompt templates: how a record becomes text, and the tokens training and scoring take from it.

A single-turn record `{instruction, input, output}` renders as (prompt, response) (`render`). Every
record renders as spans of text in order, the assistant's replies flagged (`spans`): a single-turn
record is its prompt and its response; a conversation (a record with `messages`, see shed.data) is
laid out per template as below. `tokenize` makes spans (input_ids, labels): each span tokenised
apart, no BOS, EOS after each reply of a named template, labels on the replies.

A conversation under each template (its first exchange, without a system prompt, renders as a
single-turn record without input does, byte for byte):
- qa: the system prompt and a blank line, then per exchange "Question: {user}\\nAnswer:" and
  " {reply}" EOS; a blank line between exchanges.
- alpaca: the system prompt in place of the preamble ("Below is an instruction ..."), a blank line,
  then per exchange "### Instruction:\\n{user}\\n\\n### Response:\\n" and "{reply}" EOS; a blank line
  between exchanges.
- vicuna: the system prompt in place of "A chat between ...", a space, then per exchange
  "USER: {user} ASSISTANT:" and "{reply}" EOS; the next "USER:" follows EOS directly (Vicuna v1.1's
  own layout).
- chat: the tokenizer's chat template on the whole conversation. Each reply's span is found by
  rendering prefixes (the turns before it with the generation prompt, and through it): it runs from
  the reply's first character through the template's end-of-turn marker (SmolLM2: `<|im_end|>`; the
  whitespace after it is left to the next prompt, and what follows the last reply is left out). No EOS
  is added: the template says how a turn ends.
"""

from __future__ import annotations

from typing import NamedTuple

from shed.fileio import ShedError

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_EXCHANGE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_NO_INPUT = ALPACA_PREAMBLE + "\n\n" + ALPACA_EXCHANGE
# The paper's template, byte for byte (the SHED authors' utils/vicuna.json; note: no space after
# the last "ASSISTANT:" without input). The response follows directly, as in their Prompter.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
VICUNA_INPUT = VICUNA_SYSTEM + " USER: {instruction} {input} ASSISTANT: "
VICUNA_EXCHANGE = "USER: {instruction} ASSISTANT:"
VICUNA_NO_INPUT = VICUNA_SYSTEM + " " + VICUNA_EXCHANGE
# Compact, and identical to the ARC-style "Question: ...\nAnswer:" format the eval tasks use,
# so what the tiny default model learns transfers to the log-likelihood scoring.
QA_INPUT = "Question: {instruction}\nInput: {input}\nAnswer:"
QA_NO_INPUT = "Question: {instruction}\nAnswer:"

# template -> (prompt with input, prompt without input, what precedes the response)
TEMPLATES = {
    "alpaca": (ALPACA_INPUT, ALPACA_NO_INPUT, ""),
    "vicuna": (VICUNA_INPUT, VICUNA_NO_INPUT, ""),
    "qa": (QA_INPUT, QA_NO_INPUT, " "),
}
# template -> a conversation's layout: (the header without a system prompt, what follows the header or the system
# prompt, an exchange's prompt, what separates exchanges). Header + joiner + exchange is the single-turn prompt
# without input.
CONVERSATIONS = {
    "alpaca": (ALPACA_PREAMBLE, "\n\n", ALPACA_EXCHANGE, "\n\n"),
    "vicuna": (VICUNA_SYSTEM, " ", VICUNA_EXCHANGE, ""),
    "qa": ("", "\n\n", QA_NO_INPUT, "\n\n"),
}


class Span(NamedTuple):
    """A piece of a rendered record. `reply`: an assistant reply (labelled in training, scored as a response);
    `eos`: the tokenizer's EOS token follows it."""

    text: str
    reply: bool = False
    eos: bool = False


def _named(template: str) -> tuple[str, str, str]:
    if template not in TEMPLATES:
        raise ShedError(f"train.template: unknown template {template!r} (choose qa, alpaca, vicuna or chat)")
    return TEMPLATES[template]


def _with_chat_template(tokenizer):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ShedError("train.template: 'chat' needs a tokenizer with a chat template; "
                        "use qa, alpaca or vicuna for this model")
    return tokenizer


def render(record: dict, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for one single-turn record; `chat` uses the tokenizer's own chat template. A
    conversation has several responses: it renders by `spans`."""
    if "messages" in record:
        raise ValueError("render: a conversation (a record with messages) renders by prompts.spans")
    if template == "chat":
        user = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
        prompt = _with_chat_template(tokenizer).apply_chat_template([{"role": "user", "content": user}],
                                                                    tokenize=False, add_generation_prompt=True)
        return prompt, record["output"]
    with_input, without_input, sep = _named(template)
    fmt = with_input if record["input"] else without_input
    return fmt.format(instruction=record["instruction"], input=record["input"]), sep + record["output"]


def spans(record: dict, template: str, tokenizer=None) -> list[Span]:
    """The record as text spans in order, its replies flagged: a single-turn record as its prompt and its
    response followed by EOS (`render`); a conversation laid out as the module docstring says."""
    if "messages" not in record:
        prompt, response = render(record, template, tokenizer)
        return [Span(prompt), Span(response, reply=True, eos=True)]
    messages = record["messages"]
    if template == "chat":
        return _chat_spans(messages, _with_chat_template(tokenizer))
    sep = _named(template)[2]
    header, joiner, exchange, between = CONVERSATIONS[template]
    if messages[0]["role"] == "system":
        header = messages[0]["content"]
    out, text = [], header + joiner if header else ""
    for message in messages:
        if message["role"] == "user":
            text += (between if out else "") + exchange.format(instruction=message["content"])
        elif message["role"] == "assistant":
            out += [Span(text), Span(sep + message["content"], reply=True, eos=True)]
            text = ""
    return out


def _chat_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as exc:
        raise ShedError(f"train.template: chat: the tokenizer's chat template refuses a conversation ({exc}); "
                        "use qa, alpaca or vicuna") from None


def _chat_spans(messages: list[dict], tokenizer) -> list[Span]:
    """A conversation under the tokenizer's chat template, each reply's span found by rendering prefixes."""
    whole = _chat_text(tokenizer, messages, False)
    out, done = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_text(tokenizer, messages[:k], True)
        through = _chat_text(tokenizer, messages[:k + 1], False)
        if not (whole.startswith(through) and through.startswith(before)):
            raise ShedError("train.template: chat: the tokenizer's chat template renders a conversation's earlier "
                            "turns differently once later turns follow, so its replies cannot be told apart; "
                            "use qa, alpaca or vicuna")
        end = max(len(through.rstrip()), len(before))  # the whitespace after a turn is the next prompt's
        out += [Span(whole[done:len(before)]), Span(whole[len(before):end], reply=True)]
        done = end
    return out  # what follows the last reply precedes nothing scored: left out


def tokenize(tokenizer, pieces: list[Span], responses_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a rendered record: each span tokenised apart, no BOS (lm-eval scores causal LMs
    without one, and training must match scoring), EOS after the spans that ask for it; labels are the ids,
    -100 outside the replies (and their EOS) when `responses_only`."""
    ids: list[int] = []
    labels: list[int] = []
    for span in pieces:
        piece = tokenizer(span.text, add_special_tokens=False)["input_ids"]
        if span.eos and tokenizer.eos_token_id is not None:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if span.reply or not responses_only else [-100] * len(piece)
    return ids, labels
