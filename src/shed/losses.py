"""Per-record losses of a model on instruction records: the perplexity filter's, IFD's and the forward
valuation's signal. A record's loss is the mean per-token negative log-likelihood of its response (and
EOS) given its prompt, prompted and cut as `training.encode_record` trains on it."""

from __future__ import annotations

import math

from shed.scoring import token_logliks
from shed.training import encode_record


def response_losses(model, tokenizer, records: list[dict], template: str, max_length: int, batch_size: int,
                    progress=None, unconditional: bool = False, max_tokens: int = 0) -> list[float]:
    """Each record's mean per-token negative log-likelihood of its response (the labelled tokens of
    `training.encode_record`) given its prompt, under `model` in eval mode, in record order; inf for a
    record cut to no response token. `unconditional`: given the template's prompt with an empty
    instruction and input instead (the response "alone", as IFD's denominator takes it). A batch holds at
    most `batch_size` records and `max_tokens` padded tokens (0: no bound), which changes no loss beyond
    float rounding. `progress`: a tqdm-like bar, updated by the records of each batch."""
    rows = []
    for record in records:
        if unconditional:
            record = {**record, "instruction": "", "input": ""}
        ids, labels = encode_record(record, tokenizer, template, max_length)
        prompt = sum(label == -100 for label in labels)
        rows.append((ids[:prompt], ids[prompt:]))
    # Longest first: similar lengths share a batch (less padding), and a batch too big for memory fails at once.
    order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
    was_training = model.training
    model.eval()  # no dropout: a loss is a function of the parameters alone
    try:
        scored = token_logliks(model, tokenizer, [rows[i] for i in order], batch_size, progress, max_tokens)
    finally:
        model.train(was_training)
    losses = [float("inf")] * len(rows)
    for i, (total, count) in zip(order, scored):
        if count:
            losses[i] = -total / count
    return losses


def ifd(conditional: list[float], unconditional: list[float]) -> list[float]:
    """Instruction-following difficulty per record (Li et al. 2024): the response's loss given its
    instruction over its loss alone; near or above 1 when the instruction does not help predict the
    response. NaN where either loss is not finite or the denominator is 0."""
    return [c / u if math.isfinite(c) and math.isfinite(u) and u > 0 else float("nan")
            for c, u in zip(conditional, unconditional)]
