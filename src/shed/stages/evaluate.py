"""evaluate: lm-eval log-likelihood multiple-choice accuracy of the fine-tuned model -> metrics/eval.json.

    shed evaluate                      # params.yaml: evaluate.*, finetune.model
    # evaluate.tasks: [shed_embedded] offline; built-in lm-eval names (mmlu, arc_challenge) online;
    # [mmlu_local, arc_challenge_local] offline from evaluate.mmlu_dir / evaluate.arc_file.

Before the model loads, its peak memory is estimated (shed.memory: the weights, the adapter and one lm-eval batch
of the longest local question) and the stage stops with a one-line error when it does not fit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shed import artifacts, memory
from shed.config import Params
from shed.mcdata import arc_rows, mmlu_rows, question_key, refuse_overlap
from shed.models import load_causal_lm, load_tokenizer, resolve_device
from shed.scoring import FILE_TASKS, LOCAL_TASKS, LmEvalScorer, context_and_choices, mc_task_config

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


def main(params: Params) -> None:
    from peft import PeftModel

    cfg = params.evaluate
    metadata = check_file_tasks(params)
    model_name, device = params.finetune.model, resolve_device(params.finetune.device)
    shape, longest = memory.read_shape(model_name), longest_request(params, load_tokenizer(model_name))
    if any(t not in LOCAL_TASKS and t not in FILE_TASKS for t in cfg.tasks):
        log.info("evaluate: the memory estimate counts the local tasks' questions only")
    adapter_config = Path(artifacts.FINETUNED) / "adapter_config.json"
    adapter = json.loads(adapter_config.read_text(encoding="utf-8")) if adapter_config.is_file() else {}
    targets = adapter.get("target_modules") or []
    lora = shape.lora_parameters(adapter.get("r", 0), [targets] if isinstance(targets, str) else targets) if shape else 0
    memory.check("evaluate", model_name, shape, device,
                 lambda n: memory.evaluate_estimate(params, shape, device, n, lora), longest, lambda: longest)
    model, tokenizer = load_causal_lm(model_name, params.finetune.device, params.finetune.dtype)
    scorer = LmEvalScorer(tokenizer, task_specs(params), cfg.batch_size, cfg.limit, metadata)
    metrics = {}
    if cfg.include_base:
        log.info("scoring the base model on %s", ", ".join(cfg.tasks))
        metrics["base"] = scorer(model)
    log.info("scoring the fine-tuned model on %s", ", ".join(cfg.tasks))
    metrics["finetuned"] = scorer(PeftModel.from_pretrained(model, artifacts.FINETUNED).eval())
    artifacts.write_metrics("evaluate", metrics, device=str(model.device))
    for task, m in metrics["finetuned"].items():
        log.info("%s: acc %.4f (base %s) -> %s", task, m.get("acc", float("nan")),
                 f"{metrics['base'][task]['acc']:.4f}" if "base" in metrics else "not scored", artifacts.metrics("evaluate"))
