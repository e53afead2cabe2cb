"""Per-record losses of a model on instruction records: the perplexity filter's, IFD's and the forward
valuation's signal. A record's loss is the mean per-token negative log-likelihood of its response (and
EOS; a conversation: of all its replies, each given what precedes it) given its prompt, prompted and cut
as `training.encode_record` trains on it."""

from __future__ import annotations

import math

from shed.scoring import labelled_logliks
from shed.training import encode_record


def response_losses(model, tokenizer, records: list[dict], template: str, max_length: int, batch_size: int,
                    progress=None, unconditional: bool = False, max_tokens: int = 0) -> list[float]:
    """Each record's mean per-token negative log-likelihood of its response (the labelled tokens of
    `training.encode_record`: a conversation's every reply) given its prompt, under `model` in eval mode, in
    record order; inf for a record cut to no response token. `unconditional`: the responses "alone", as IFD's
    denominator takes them (`responses_alone`). A batch holds at most `batch_size` records and `max_tokens`
    padded tokens (0: no bound), which changes no loss beyond float rounding. `progress`: a tqdm-like bar,
    updated by the records of each batch."""
    rows = [encode_record(responses_alone(record) if unconditional else record, tokenizer, template, max_length)
            for record in records]
    # Longest first: similar lengths share a batch (less padding), and a batch too big for memory fails at once.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    was_training = model.training
    model.eval()  # no dropout: a loss is a function of the parameters alone
    try:
        scored = labelled_logliks(model, tokenizer, [rows[i] for i in order], batch_size, progress, max_tokens)
    finally:
        model.train(was_training)
    losses = [float("inf")] * len(rows)
    for i, (total, count) in zip(order, scored):
        if count:
            losses[i] = -total / count
    return losses


def responses_alone(record: dict) -> dict:
    """The record with everything but its responses emptied, under the same template: instruction and input
    "", and a conversation's user turns "" and its system prompt left out (each reply then follows the
    earlier replies alone)."""
    alone = {**record, "instruction": "", "input": ""}
    if "messages" in record:
        alone["messages"] = [{"role": m["role"], "content": m["content"] if m["role"] == "assistant" else ""}
                             for m in record["messages"] if m["role"] != "system"]
    return alone


def ifd(conditional: list[float], unconditional: list[float]) -> list[float]:
    """Instruction-following difficulty per record (Li et al. 2024): the response's loss given its
    instruction over its loss alone; near or above 1 when the instruction does not help predict the
    response. NaN where either loss is not finite or the denominator is 0."""
    return [c / u if math.isfinite(c) and math.isfinite(u) and u > 0 else float("nan")
            for c, u in zip(conditional, unconditional)]
