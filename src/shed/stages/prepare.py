"""prepare: an instruction pool -> normalized records with stable ids, plus the dev and eval sets.

    shed prepare                       # params.yaml: prepare.*
    # prepare.pool: embedded | data/my_pool.jsonl | hf:tatsu-lab/alpaca

Outputs (data/prepared/): pool.jsonl `{id, instruction, input, output}`, dev.jsonl and eval.jsonl
`{id, question, choices, answer}` (prepare.dev / prepare.eval: our JSONL, an AI2 ARC JSONL, an
MMLU CSV or a directory of them, e.g. ../shared/data/mmlu/val), and for the embedded default
truth.jsonl (which records were planted as harmful: read by benchmarks only, never by the method).
"""

from __future__ import annotations

import logging

from shed import artifacts, synthetic
from shed.config import Params
from shed.data import load_rows, normalize_pool
from shed.fileio import ShedError, write_json
from shed.mcdata import load_choice_set, question_key, refuse_overlap

log = logging.getLogger(__name__)


def exclude(dev: list[dict], sources: list[str]) -> list[dict]:
    """The dev set without any question that appears in `sources` (the files the evaluate stage uses)."""
    keys = {question_key(q["question"], q["choices"]) for source in sources for q in load_choice_set(source)}
    kept = [q for q in dev if question_key(q["question"], q["choices"]) not in keys]
    log.info("prepare.dev_exclude: dropped %d dev questions found in %s", len(dev) - len(kept), ", ".join(sources))
    if not kept:
        raise ShedError(f"prepare.dev_exclude: no dev question left after removing those in {', '.join(sources)}")
    return kept


def build(params: Params) -> dict[str, list[dict]]:
    """All prepared tables, in memory (nothing written)."""
    cfg = params.prepare
    emb = cfg.embedded
    tables: dict[str, list[dict]] = {}
    if cfg.pool == "embedded":
        tables["pool"], tables["truth"] = synthetic.generate_pool(emb.pool_size, emb.corrupt_fraction, emb.seed)
    else:
        tables["pool"] = normalize_pool(load_rows(cfg.pool, cfg.split), cfg.pool, cfg.format, cfg.duplicates,
                                        cfg.empty)
    if cfg.max_records:
        tables["pool"] = tables["pool"][: cfg.max_records]
    tables["dev"] = (synthetic.generate_questions(emb.dev_size, emb.seed, salt=11) if cfg.dev == "embedded"
                     else load_choice_set(cfg.dev))
    tables["eval"] = (synthetic.generate_questions(emb.eval_size, emb.seed, salt=12) if cfg.eval == "embedded"
                      else load_choice_set(cfg.eval))
    if cfg.dev_exclude:
        tables["dev"] = exclude(tables["dev"], cfg.dev_exclude)
    # Never evaluate on questions the value function saw: refused for given files, dropped for generated ones.
    if cfg.dev != "embedded" or cfg.eval != "embedded":
        refuse_overlap(tables["dev"], {question_key(q["question"], q["choices"]) for q in tables["eval"]},
                       cfg.dev, cfg.eval)
    dev_ids = {q["id"] for q in tables["dev"]}
    overlap = sum(q["id"] in dev_ids for q in tables["eval"])
    if overlap:
        log.info("removing %d eval questions that also appear in the dev set", overlap)
        tables["eval"] = [q for q in tables["eval"] if q["id"] not in dev_ids]
    if not tables["eval"]:
        raise ShedError(f"{cfg.eval}: no eval question left after removing those in the dev set")
    return tables


def main(params: Params) -> None:
    tables = build(params)
    artifacts.write_prepared(tables)
    counts = {name: len(rows) for name, rows in tables.items() if name != "truth"}
    if "truth" in tables:
        counts["planted_harmful"] = sum(r["corrupted"] for r in tables["truth"])
    write_json(artifacts.metrics("prepare"), counts)
    log.info("prepared %s -> %s/", ", ".join(f"{v} {k}" for k, v in counts.items()), artifacts.PREPARED)
