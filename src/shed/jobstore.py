"""The Shapley job store: finished fine-tune-and-score jobs, one fsynced JSON line each, reused across runs.

A job's value depends on its subset and on its context: the model's weights, the train recipe,
the value kind, the dev questions and the code that trains and scores. Jobs of another context
are kept in the file but never reused, so an edit to training.py or prompts.py reruns them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from shed import codedeps
from shed.config import TrainConfig, as_dict

log = logging.getLogger(__name__)

# The code a job runs: the executors' worker and all it imports (training, prompts, scoring,
# models, the lm-eval tasks). The config schema and file helpers decide no value, nor does the memory
# estimate (shed.memory's `chunks` orders float sums only, and the settings it reads are in each context).
JOB_CODE = ["shed.executors"]
NOT_JOB_CODE = frozenset({"shed.config", "shed.fileio", "shed.memory"})


def code_fingerprint() -> str:
    return codedeps.fingerprint(JOB_CODE, exclude=NOT_JOB_CODE)


def model_fingerprint(name_or_path: str) -> str:
    """Identifies the model's weights without reading all of them (7B checkpoints are 14 GB)."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path  # a hub id
    digest = hashlib.sha256()
    for f in sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()


def job_context(model: str, train: TrainConfig, value: str, dev_ids: list[str], code: str | None = None,
                dev_cut: tuple[int, int] | None = None) -> str:
    """Everything besides the subset that determines a job's value; `dev_cut`: (shapley.dev_max_length,
    shapley.chunk_tokens), how the dev items are cut and chunked."""
    blob = json.dumps({"model": model_fingerprint(model), "train": as_dict(train), "value": value, "dev": dev_ids,
                       "seeding": "common", "code": code or code_fingerprint(),
                       **({"dev_cut": list(dev_cut)} if dev_cut else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def subset_key(proxy_ids: list[str]) -> str:
    """A subset's key: its record ids, order-free."""
    return hashlib.sha256(",".join(sorted(proxy_ids)).encode()).hexdigest()[:20]


class JobStore:
    """Append-only record of finished utility evaluations of one context; a context manager."""

    def __init__(self, path: str | Path, context: str):
        self.path, self.context = Path(path), context
        self.values: dict[str, float] = {}
        self.questions: dict[str, list[float]] = {}  # per-dev-question scores, where recorded
        self.other_contexts = 0
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A crash mid-write leaves the last line cut short: drop it so the next job starts a line.
                log.warning("%s: dropping an incomplete last line (interrupted write)", self.path)
                data = data[: data.rfind(b"\n") + 1]
                with self.path.open("r+b") as fh:
                    fh.truncate(len(data))
            for i, line in enumerate(data.decode("utf-8").splitlines()):
                try:
                    job = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s: line %d is not valid JSON; ignoring it", self.path, i + 1)
                    continue
                if job.get("context") != context:
                    self.other_contexts += 1
                    continue
                self.values[job["key"]] = job["value"]
                if job.get("questions") is not None:
                    self.questions[job["key"]] = job["questions"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        log.info("job store %s: %d finished jobs for this model/recipe/dev set/code (%d of other contexts)",
                 self.path, len(self.values), self.other_contexts)

    def has(self, key: str, questions: bool = False) -> bool:
        """Whether the job is stored (with its per-question scores, if `questions`)."""
        return key in self.values and (not questions or key in self.questions)

    def put(self, key: str, value: float, questions: list[float] | None = None, **info) -> None:
        self.values[key] = value
        record = {"context": self.context, "key": key, "value": value, **info}
        if questions is not None:
            self.questions[key] = record["questions"] = questions
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
