"""evaluate: lm-eval log-likelihood multiple-choice accuracy of the fine-tuned model -> metrics/eval.json.

    shed evaluate                      # params.yaml: evaluate.*, finetune.model, train.template
    # evaluate.tasks: [shed_embedded] offline; built-in lm-eval names (mmlu, arc_challenge) online;
    # [mmlu_local, arc_challenge_local] offline from evaluate.mmlu_dir / evaluate.arc_file.
    # evaluate.heldout: instruction records never trained on -> task "heldout": {loglik, n}, the mean
    # per-token log-likelihood of their reference responses, prompted as training prompts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shed import artifacts
from shed.config import Params
from shed.data import load_rows, normalize_pool
from shed.fileio import ShedError
from shed.mcdata import arc_rows, mmlu_rows, question_key, refuse_overlap
from shed.models import load_causal_lm
from shed.prompts import spans
from shed.scoring import (
    FILE_TASKS,
    LOCAL_TASKS,
    LmEvalScorer,
    mc_task_config,
    response_loglik,
)

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
    model, tokenizer = load_causal_lm(params.finetune.model, params.finetune.device, params.finetune.dtype)
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
