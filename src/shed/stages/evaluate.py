"""evaluate: lm-eval log-likelihood multiple-choice accuracy of the fine-tuned model -> metrics/eval.json.

    shed evaluate                      # params.yaml: evaluate.*, finetune.model
    # evaluate.tasks: [shed_embedded] offline; built-in lm-eval names (mmlu, arc_challenge) online;
    # [mmlu_local, arc_challenge_local] offline from evaluate.mmlu_dir / evaluate.arc_file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shed import artifacts
from shed.config import Params
from shed.mcdata import arc_rows, mmlu_rows, question_key, refuse_overlap
from shed.models import load_causal_lm
from shed.scoring import FILE_TASKS, LOCAL_TASKS, LmEvalScorer, mc_task_config

log = logging.getLogger(__name__)


def task_specs(params: Params) -> list[str | dict]:
    """Project tasks become configs over local files; any other name is an lm-eval built-in."""
    return [mc_task_config(name, artifacts.EVAL) if name in LOCAL_TASKS else name for name in params.evaluate.tasks]


def check_file_tasks(params: Params) -> dict[str, str]:
    """Validate the data of mmlu_local / arc_challenge_local before any model loads; refuse dev overlap."""
    cfg, metadata = params.evaluate, {}
    for task in (t for t in cfg.tasks if t in FILE_TASKS):
        key = FILE_TASKS[task]
        source = getattr(cfg, key)  # non-empty: the config schema checks it
        if task == "mmlu_local":
            keys = {question_key(r["question"], r["choices"]) for r in mmlu_rows(source, "test")}
        else:
            keys = {question_key(r["question"], r["choices"]["text"]) for r in arc_rows(source)}
        if Path(artifacts.DEV).exists():
            refuse_overlap(artifacts.read_dev(), keys, artifacts.DEV, source)
        metadata[key] = str(Path(source).resolve())
    return metadata


def main(params: Params) -> None:
    from peft import PeftModel

    cfg = params.evaluate
    metadata = check_file_tasks(params)
    model, tokenizer = load_causal_lm(params.finetune.model, params.finetune.device, params.finetune.dtype)
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
