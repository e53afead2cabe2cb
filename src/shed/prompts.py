"""Prompt templates: how a record `{instruction, input, output}` becomes (prompt, response) text."""

from __future__ import annotations

from shed.fileio import ShedError

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The paper's template, byte for byte (the SHED authors' utils/vicuna.json; note: no space after
# the last "ASSISTANT:" without input). The response follows directly, as in their Prompter.
VICUNA_INPUT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {instruction} {input} ASSISTANT: "
)
VICUNA_NO_INPUT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:"
)
# Compact, and identical to the ARC-style "Question: ...\nAnswer:" format the eval tasks use,
# so what the tiny default model learns transfers to the log-likelihood scoring.
QA_INPUT = "Question: {instruction}\nInput: {input}\nAnswer:"
QA_NO_INPUT = "Question: {instruction}\nAnswer:"

TEMPLATES = {
    "alpaca": (ALPACA_INPUT, ALPACA_NO_INPUT, ""),
    "vicuna": (VICUNA_INPUT, VICUNA_NO_INPUT, ""),
    "qa": (QA_INPUT, QA_NO_INPUT, " "),
}


def render(record: dict, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for one record; `chat` uses the tokenizer's own chat template."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ShedError("train.template: 'chat' needs a tokenizer with a chat template; "
                            "use qa, alpaca or vicuna for this model")
        user = f"{record['instruction']}\n\n{record['input']}" if record["input"] else record["instruction"]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, record["output"]
    if template not in TEMPLATES:
        raise ShedError(f"train.template: unknown template {template!r} (choose qa, alpaca, vicuna or chat)")
    with_input, without_input, sep = TEMPLATES[template]
    fmt = with_input if record["input"] else without_input
    return fmt.format(instruction=record["instruction"], input=record["input"]), sep + record["output"]
