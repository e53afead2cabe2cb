"""evaluate: lm-eval log-likelihood multiple-choice accuracy of the fine-tuned model -> metrics/eval.json.

    shed evaluate                      # params.yaml: evaluate.*, finetune.model
    # evaluate.tasks: [shed_embedded] offline; built-in lm-eval names (mmlu, arc_challenge) online.
"""

from __future__ import annotations

from shed.config import Params
from shed.io import log, write_json
from shed.models import load_causal_lm
from shed.scoring import LOCAL_TASKS, LmEvalScorer, mc_task_config

EVAL = "data/prepared/eval.jsonl"
ADAPTER = "models/finetuned"
METRICS = "metrics/eval.json"


def task_specs(params: Params) -> list[str | dict]:
    """Project tasks become configs over local files; any other name is an lm-eval built-in."""
    return [mc_task_config(name, EVAL) if name in LOCAL_TASKS else name for name in params.evaluate.tasks]


def main(params: Params) -> None:
    from peft import PeftModel

    cfg = params.evaluate
    model, tokenizer = load_causal_lm(params.finetune.model, params.finetune.device, params.finetune.dtype)
    scorer = LmEvalScorer(tokenizer, task_specs(params), cfg.batch_size, cfg.limit)
    metrics = {}
    if cfg.include_base:
        log.info("scoring the base model on %s", ", ".join(cfg.tasks))
        metrics["base"] = scorer(model)
    log.info("scoring the fine-tuned model on %s", ", ".join(cfg.tasks))
    metrics["finetuned"] = scorer(PeftModel.from_pretrained(model, ADAPTER).eval())
    write_json(METRICS, metrics)
    for task, m in metrics["finetuned"].items():
        log.info("%s: acc %.4f (base %s) -> %s", task, m.get("acc", float("nan")),
                 f"{metrics['base'][task]['acc']:.4f}" if "base" in metrics else "not scored", METRICS)
