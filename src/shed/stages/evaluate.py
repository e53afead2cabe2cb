"""evaluate: lm-eval log-likelihood multiple-choice accuracy of the fine-tuned model -> metrics/eval.json.

    shed evaluate                      # params.yaml: evaluate.*, finetune.model, train.template
    # evaluate.tasks: [shed_embedded] offline; built-in lm-eval names (mmlu, arc_challenge) online;
    # [mmlu_local, arc_challenge_local] offline from evaluate.mmlu_dir / evaluate.arc_file.
    # evaluate.heldout: instruction records never trained on -> task "heldout": {loglik, n}, the mean
    # per-token log-likelihood of their reference responses, prompted as training prompts them.

Before the model loads, its peak memory is estimated (shed.memory: the weights, the adapter and one lm-eval batch
of the longest local question) and the stage stops with a one-line error when it does not fit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shed import artifacts, memory
from shed.config import Params
from shed.data import load_rows, normalize_pool
from shed.fileio import ShedError
from shed.mcdata import arc_rows, mmlu_rows, question_key, refuse_overlap
from shed.models import load_causal_lm, load_tokenizer, resolve_device
from shed.prompts import spans, tokenize
from shed.scoring import (
    FILE_TASKS,
    LOCAL_TASKS,
    LmEvalScorer,
    context_and_choices,
    mc_task_config,
    response_loglik,
)

log = logging.getLogger(__name__)


def task_specs(params: Params) -> list[str | dict]:
    """Project tasks become configs over local files; any other name is an lm-eval built-in."""
    return [mc_task_config(name, artifacts.EVAL) if name in LOCAL_TASKS else name for name in params.evaluate.tasks]


def file_task_questions(params: Params, task: str) -> list[dict]:
    """The questions of file task `task` (mmlu_local, arc_challenge_local) as `{question, choices}`."""
    source = getattr(params.evaluate, FILE_TASKS[task])  # non-empty: the config schema checks it
    if task == "mmlu_local":
        return [{"question": r["question"], "choices": r["choices"]} for r in mmlu_rows(source, "test")]
    return [{"question": r["question"], "choices": r["choices"]["text"]} for r in arc_rows(source)]


def check_file_tasks(params: Params) -> dict[str, str]:
    """Validate the data of mmlu_local / arc_challenge_local before any model loads; refuse dev overlap."""
    cfg, metadata = params.evaluate, {}
    for task in (t for t in cfg.tasks if t in FILE_TASKS):
        source = getattr(cfg, FILE_TASKS[task])
        keys = {question_key(q["question"], q["choices"]) for q in file_task_questions(params, task)}
        if Path(artifacts.DEV).exists():
            refuse_overlap(artifacts.read_dev(), keys, artifacts.DEV, source)
        metadata[FILE_TASKS[task]] = str(Path(source).resolve())
    return metadata


def longest_request(params: Params, tokenizer) -> int:
    """Tokens of the longest request (question context and a choice, `scoring.context_and_choices`) of the
    tasks read from local files; lm-eval's built-in tasks are not read before lm-eval loads them."""
    cfg = params.evaluate
    questions = artifacts.read_eval() if any(t in LOCAL_TASKS for t in cfg.tasks) else []
    questions += [q for t in cfg.tasks if t in FILE_TASKS for q in file_task_questions(params, t)]

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return max((tokens(context) + max(map(tokens, choices)) for context, choices in map(context_and_choices, questions)),
               default=0)


def heldout_records(params: Params) -> list[dict]:
    """evaluate.heldout's records (read and checked before any model loads); none of them may have been
    trained on, so a pool record among them is refused."""
    source = params.evaluate.heldout
    if not source:
        return []
    records = normalize_pool(load_rows(source), source)
    if Path(artifacts.POOL).exists():
        pool_ids = {r["id"] for r in artifacts.read_pool()}
        trained = sum(r["id"] in pool_ids for r in records)
        if trained:
            raise ShedError(f"{source}: {trained} of its {len(records)} records are in the pool "
                            f"({artifacts.POOL}); evaluate.heldout must hold records never trained on")
    return records


class Scorer:
    """Every score evaluate reports for one model: the lm-eval tasks, then `heldout` {loglik, n}."""

    def __init__(self, params: Params, tokenizer, metadata: dict, heldout: list[dict]):
        cfg = params.evaluate
        self.tasks = LmEvalScorer(tokenizer, task_specs(params), cfg.batch_size, cfg.limit, metadata)
        self.tokenizer, self.batch_size = tokenizer, cfg.batch_size
        self.rendered = [spans(r, params.train.template, tokenizer) for r in heldout]

    def __call__(self, model) -> dict[str, dict[str, float]]:
        scores = self.tasks(model)
        if self.rendered:
            loglik, _ = response_loglik(model, self.tokenizer, self.rendered, self.batch_size)
            scores["heldout"] = {"loglik": loglik, "n": len(self.rendered)}
        return scores


def main(params: Params) -> None:
    from peft import PeftModel

    cfg = params.evaluate
    metadata = check_file_tasks(params)
    heldout = heldout_records(params)
    model_name, device = params.finetune.model, resolve_device(params.finetune.device)
    tokenizer = load_tokenizer(model_name)
    longest = max([longest_request(params, tokenizer)]
                  + [len(tokenize(tokenizer, spans(r, params.train.template, tokenizer))[0]) for r in heldout])
    shape = memory.read_shape(model_name)
    if any(t not in LOCAL_TASKS and t not in FILE_TASKS for t in cfg.tasks):
        log.info("evaluate: the memory estimate counts the local tasks' questions only")
    adapter_config = Path(artifacts.FINETUNED) / "adapter_config.json"
    adapter = json.loads(adapter_config.read_text(encoding="utf-8")) if adapter_config.is_file() else {}
    targets = adapter.get("target_modules") or []
    lora = shape.lora_parameters(adapter.get("r", 0), [targets] if isinstance(targets, str) else targets) if shape else 0
    memory.check("evaluate", model_name, shape, device,
                 lambda n: memory.evaluate_estimate(params, shape, device, n, lora), longest, lambda: longest)
    model, tokenizer = load_causal_lm(model_name, params.finetune.device, params.finetune.dtype)
    scorer = Scorer(params, tokenizer, metadata, heldout)
    what = ", ".join(cfg.tasks + ([f"{len(heldout)} held-out records"] if heldout else []))
    metrics = {}
    if cfg.include_base:
        log.info("scoring the base model on %s", what)
        metrics["base"] = scorer(model)
    log.info("scoring the fine-tuned model on %s", what)
    metrics["finetuned"] = scorer(PeftModel.from_pretrained(model, artifacts.FINETUNED).eval())
    artifacts.write_metrics("evaluate", metrics, device=str(model.device))
    for task, m in metrics["finetuned"].items():
        name = "acc" if "acc" in m else "loglik"
        log.info("%s: %s %.4f (base %s) -> %s", task, name, m.get(name, float("nan")),
                 f"{metrics['base'][task][name]:.4f}" if "base" in metrics else "not scored",
                 artifacts.metrics("evaluate"))
