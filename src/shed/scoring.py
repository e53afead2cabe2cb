"""Deterministic scores of a model on dev and eval sets: lm-eval accuracy and log-likelihoods.

Multiple-choice questions use the ARC-style prompt of `tasks/shed_mc.yaml` ("Question: ...\nAnswer:"
then " choice"), so the value function of the Shapley stage and the evaluate stage measure the same
thing. A dev set of instruction records is scored on its reference responses (a conversation: on
every reply), prompted as training prompts them (`prompts.spans`, train.template). Nothing is
sampled: v(S) is a function of S alone (the authors scored sampled generations).

A dev item longer than the dev cap (shapley.dev_max_length, resolved by the caller) is cut at the end, as
training cuts a record (`cut_rows`, `cut_labelled`); rows are scored in chunks of at most `batch_size` rows and
`max_tokens` padded tokens (`memory.chunks`), which leaves each row's score the same up to float rounding.
"""

from __future__ import annotations

import copy
import logging
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from shed.config import FILE_TASKS
from shed.memory import DEV_BATCH, chunks
from shed.prompts import Span, tokenize

TASK_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = {"shed_embedded": "shed_mc.yaml", "shed_eval": "shed_mc.yaml"}


@lru_cache
def _task_template(name: str) -> dict:
    return yaml.safe_load((TASK_DIR / name).read_text(encoding="utf-8"))


def mc_task_config(task_name: str, data_file: str | Path) -> dict:
    """An lm-eval task config (a dict) for a local multiple-choice JSONL file."""
    config = copy.deepcopy(_task_template("shed_mc.yaml"))
    config["task"] = task_name
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(data_file).resolve())}}
    return config


def context_and_choices(question: dict) -> tuple[str, list[str]]:
    """The same strings lm-eval builds from shed_mc.yaml (doc_to_text, target_delimiter + choice)."""
    return f"Question: {question['question']}\nAnswer:", [" " + c for c in question["choices"]]


def dev_kind(dev: list[dict]) -> str:
    """"records" for a dev set of instruction records `{id, instruction, input, output}`, "choices" for
    multiple-choice questions `{id, question, choices, answer}` (prepare writes one kind or the other)."""
    return "records" if dev and "instruction" in dev[0] else "choices"


def gold_rows(tokenizer, questions: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(context ids, gold choice ids) per question, as `gold_loglik` scores it: "Question: ...\nAnswer:"
    and " choice" tokenised apart, no BOS, no EOS."""
    rows = []
    for q in questions:
        context, choices = context_and_choices(q)
        rows.append((tokenizer(context, add_special_tokens=False)["input_ids"],
                     tokenizer(choices[q["answer"]], add_special_tokens=False)["input_ids"]))
    return rows


def response_rows(tokenizer, rendered: list[list[Span]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per instruction record, as `response_loglik` scores it and
    `training.LoraTrainer.encode` trains on it: `rendered` holds each record's spans as `prompts.spans`
    gives them under train.template (the caller renders them), tokenised by `prompts.tokenize` (apart, no
    BOS, EOS after each reply, labels on the replies only); not cut at train.max_length."""
    return [tokenize(tokenizer, pieces) for pieces in rendered]


def cut_rows(rows: list[tuple[list[int], list[int]]], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """Each (context ids, continuation ids) row cut to at most `max_length` tokens in all (None or 0: uncut), at
    the end, as `training.encode_record` cuts a record: the continuation loses its tail first (a context that
    is longer by itself keeps no continuation token, so the row scores nothing)."""
    if not max_length:
        return rows
    return [(c[:max_length], t[:max(0, max_length - len(c))]) for c, t in rows]


def cut_labelled(rows: list[tuple[list[int], list[int]]], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """Each (input_ids, labels) row cut to its first `max_length` tokens (None or 0: uncut), as `cut_rows` cuts a
    (context, continuation) row: a conversation loses its later replies first."""
    if not max_length:
        return rows
    return [(ids[:max_length], labels[:max_length]) for ids, labels in rows]


class LmEvalScorer:
    """lm-eval log-likelihood multiple-choice scoring of an in-memory model (PEFT or not)."""

    def __init__(self, tokenizer, tasks: list[str | dict], batch_size: int = 32, limit: int = 0,
                 metadata: dict | None = None):
        from lm_eval.tasks import TaskManager

        self.tokenizer = tokenizer
        self.tasks = tasks
        self.batch_size = batch_size
        self.limit = limit or None
        # Indexing lm-eval's ~10k built-in tasks takes ~30 s: only do it when a built-in is named.
        builtin = any(isinstance(t, str) and t not in FILE_TASKS for t in tasks)
        self.task_manager = TaskManager(include_path=str(TASK_DIR), include_defaults=builtin, metadata=metadata)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)

    def __call__(self, model) -> dict[str, dict[str, float]]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.task_manager,
                                      limit=self.limit, bootstrap_iters=0, log_samples=False,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
        scores = {}
        for task, metrics in out["results"].items():
            scores[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                            if k.split(",")[0] in {"acc", "acc_norm"} and isinstance(v, (int, float))}
            scores[task]["n"] = int(out["n-samples"].get(task, {}).get("effective", 0)) if "n-samples" in out else 0
        return scores


def _continuation_logliks(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, max_length: int | None,
                          max_tokens: int) -> list[tuple[float, int]]:
    """(sum of log p, token count) of each continuation after its context, in batches."""
    rows = [(tokenizer(c, add_special_tokens=False)["input_ids"], tokenizer(t, add_special_tokens=False)["input_ids"])
            for c, t in pairs]
    return token_logliks(model, tokenizer, cut_rows(rows, max_length), batch_size, max_tokens=max_tokens)


def token_logliks(model, tokenizer, rows: list[tuple[list[int], list[int]]], batch_size: int,
                  progress=None, max_tokens: int = 0) -> list[tuple[float, int]]:
    """(sum of log p, token count) of each row's continuation ids after its (non-empty) context ids, in
    right-padded batches of at most `batch_size` rows and `max_tokens` padded tokens (0: no bound;
    `memory.chunks`); `progress`: a tqdm-like bar, updated by the rows of each batch."""
    return labelled_logliks(model, tokenizer, [(c + t, [-100] * len(c) + t) for c, t in rows], batch_size, progress,
                            max_tokens)


@torch.no_grad()
def labelled_logliks(model, tokenizer, rows: list[tuple[list[int], list[int]]], batch_size: int,
                     progress=None, max_tokens: int = 0) -> list[tuple[float, int]]:
    """(sum of log p, token count) of each (input_ids, labels) row's labelled tokens (labels other than -100),
    each given the ids before it (the first position, with none before it, is never scored), in right-padded
    batches of at most `batch_size` rows and `max_tokens` padded tokens (0: no bound; `memory.chunks`);
    `progress`: a tqdm-like bar, updated by the rows of each batch."""
    device = next(model.parameters()).device
    out = []
    for start, stop in chunks([len(row) for row, _ in rows], batch_size, max_tokens):
        chunk = rows[start:stop]
        width = max(len(row) for row, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (row, _) in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, -1)
        for i, (row, labels) in enumerate(chunk):
            scored = [p for p in range(1, len(labels)) if labels[p] != -100]
            positions = torch.tensor(scored, dtype=torch.long, device=logprobs.device)
            targets = torch.tensor([row[p] for p in scored], dtype=torch.long, device=logprobs.device)
            out.append((logprobs[i, positions - 1, targets].sum().item(), len(scored)))
        if progress is not None:
            progress.update(len(chunk))
    return out


def gold_loglik(model, tokenizer, questions: list[dict], batch_size: int = DEV_BATCH, max_length: int | None = None,
                max_tokens: int = 0) -> tuple[float, list[float]]:
    """Mean per-token log-likelihood of the correct choices over all their tokens (the negative dev
    loss), and each question's own per-token log-likelihood of its correct choice; each question cut at
    `max_length` tokens (`cut_rows`), `max_tokens` padded tokens a batch."""
    rows = cut_rows(gold_rows(tokenizer, questions), max_length)
    return _mean_per_token(token_logliks(model, tokenizer, rows, batch_size, max_tokens=max_tokens))


def response_loglik(model, tokenizer, rendered: list[list[Span]], batch_size: int = DEV_BATCH,
                    max_length: int | None = None, max_tokens: int = 0) -> tuple[float, list[float]]:
    """shapley.value loglik of a dev set of instruction records, each given as its spans (`response_rows`): the
    mean per-token log-likelihood of the reference replies (each with its EOS) given their training prompts (a
    conversation: every reply given all before it) over all their tokens (the negative dev loss with
    train.responses_only), and each record's own per-token mean; each record cut at `max_length` tokens
    (`cut_labelled`), `max_tokens` padded tokens a batch."""
    rows = cut_labelled(response_rows(tokenizer, rendered), max_length)
    return _mean_per_token(labelled_logliks(model, tokenizer, rows, batch_size, max_tokens=max_tokens))


def _mean_per_token(scores: list[tuple[float, int]]) -> tuple[float, list[float]]:
    """(the token-weighted mean over all rows, each row's own mean) of (sum of log p, token count) rows."""
    return sum(s for s, _ in scores) / max(sum(n for _, n in scores), 1), [s / max(n, 1) for s, n in scores]


def choice_logprob(model, tokenizer, questions: list[dict], batch_size: int = DEV_BATCH, max_length: int | None = None,
                   max_tokens: int = 0) -> tuple[float, list[float]]:
    """Mean log-probability of the correct choice among a question's choices, scored as lm-eval's
    `acc` scores them (summed log-likelihood): a smooth accuracy; and each question's own. Learning
    only the answer format raises every choice alike and leaves it unchanged; a record teaching a
    wrong choice lowers it. Each (question, choice) row is cut at `max_length` tokens (`cut_rows`),
    `max_tokens` padded tokens a batch."""
    pairs, spans = [], []
    for q in questions:
        context, choices = context_and_choices(q)
        spans.append((len(pairs), len(choices), q["answer"]))
        pairs.extend((context, c) for c in choices)
    sums = torch.tensor([s for s, _ in _continuation_logliks(model, tokenizer, pairs, batch_size, max_length,
                                                             max_tokens)])
    per_question = [float(torch.log_softmax(sums[start:start + n], 0)[answer]) for start, n, answer in spans]
    return sum(per_question) / len(per_question), per_question
