"""The valuation methods' stores of finished work, one context folder each under data/shapley_jobs/: what a
killed or rerun shapley stage reuses. No torch at import (safetensors' torch half is imported where used).

- in-run (`shapley.method inrun`): `RunStore`, each finished run's credits and the run in progress
  (`RunCheckpoint`), in `inrun/<inrun_context>/`;
- forward (`shapley.method forward`): `ForwardStore`, every record's losses per model state and each run's
  fitted adapter, in `forward/<forward_context>/`.

A context hashes everything a stored result depends on (model, recipe, value, dev set, code, ...), so a
result is reused only where it is the same result (docs/engine.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from shed import codedeps
from shed.config import Params
from shed.fileio import atomic_path, write_json, write_text
from shed.jobstore import NOT_JOB_CODE, job_context

log = logging.getLogger(__name__)


# --- in-run ---------------------------------------------------------------------------------------------

# The code an in-run credit comes from: the driver and what it imports, the trainer, the model loader, and the
# runner that wires them (its dev batch, the settings it passes).
INRUN_CODE = ["shed.inrun", "shed.training", "shed.models", "shed.inrun_runner"]


def inrun_context(params: Params, dev_ids: list[str], players: list[int], proxy_ids: list[str], device: str) -> str:
    """Everything a run's credits depend on besides its index: the job context (model, recipe, value,
    dev questions and their cut, code) and the method's own (the proxies in player order, the device kind,
    dtype and dev chunking, which change the floating-point sums)."""
    cfg = params.shapley
    code = codedeps.fingerprint(INRUN_CODE, exclude=NOT_JOB_CODE)
    blob = json.dumps({"job": job_context(cfg.model, params.train, cfg.value, dev_ids, code=code,
                                          dev_cut=(cfg.dev_max_length, cfg.chunk_tokens)), "method": "inrun",
                       "players": [[c, p] for c, p in zip(players, proxy_ids)], "device": device.split(":")[0],
                       "dtype": cfg.dtype, "dev_chunk": cfg.dev_chunk, "seeds": "train.seed + run",
                       "direction": cfg.direction, "dev_every": cfg.dev_every,
                       **({"normalize": cfg.normalize} if cfg.normalize != "none" else {}),
                       **({"warmup": cfg.warmup} if cfg.warmup else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunStore:
    """Finished in-run runs of one context: run-NNNN.safetensors (the run's credits, an `InRunCredits`
    state) and run-NNNN.json (its metadata, summary and the safetensors file's sha256), each written
    atomically, the JSON last: a run counts as finished only when both are there and agree.

    The run in progress: run-NNNN.partial.json (`LoraTrainer.fit`'s state metadata, the context, and
    the name and sha256 of its tensors file) naming run-NNNN.partial.<step>.safetensors (the state's
    tensors). A new checkpoint writes its tensors under a new name, then the JSON, then removes the
    older tensors: a kill at any point leaves a JSON naming a complete tensors file."""

    def __init__(self, root: str | Path, context: str):
        self.context = context
        self.dir = Path(root) / context
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".run-*"):  # an atomic write cut short by a kill
            shutil.rmtree(stale, ignore_errors=True)
        others = [p for p in Path(root).iterdir() if p.is_dir() and p != self.dir]
        log.info("in-run store %s (%d other contexts kept, never reused)", self.dir, len(others))

    def _paths(self, run: int) -> tuple[Path, Path]:
        return self.dir / f"run-{run:04d}.safetensors", self.dir / f"run-{run:04d}.json"

    def load(self, run: int, players: list[int], n_dev: int):
        """(one-run InRunCredits, summary) of a finished run, or None."""
        from safetensors.numpy import load as load_arrays

        from shed.inrun import InRunCredits

        arrays_path, meta_path = self._paths(run)
        if not meta_path.is_file() or not arrays_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            data = arrays_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ValueError("its credits file does not match its sha256")
            one = InRunCredits.from_state(load_arrays(data), meta["state"])
            if one.players != players or one.n_dev != n_dev:
                raise ValueError("other players or dev questions")
        except (ValueError, KeyError, OSError) as exc:
            log.warning("%s: not reused (%s); the run is done again", meta_path, exc)
            return None
        return one, meta["summary"]

    def save(self, run: int, one, summary: dict) -> None:
        from safetensors.numpy import save_file

        arrays, state = one.state()
        arrays_path, meta_path = self._paths(run)
        with atomic_path(arrays_path) as tmp:
            save_file(arrays, str(tmp))
        digest = hashlib.sha256(arrays_path.read_bytes()).hexdigest()
        write_json(meta_path, {"run": run, "state": state, "sha256": digest, "summary": summary})

    def _partial(self, run: int) -> Path:
        return self.dir / f"run-{run:04d}.partial.json"

    def load_partial(self, run: int) -> dict | None:
        """Run `run`'s mid-run state ({"tensors", "meta"}, as `LoraTrainer.fit` takes it), or None."""
        from safetensors.torch import load as load_tensors

        meta_path = self._partial(run)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta["context"] != self.context or meta["run"] != run:
                raise ValueError("another context or run")
            data = (self.dir / meta["tensors"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ValueError("its tensors file does not match its sha256")
            return {"tensors": load_tensors(data), "meta": meta["state"]}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("%s: not resumed from (%s); the run starts over", meta_path, exc)
            return None

    def save_partial(self, run: int, state: dict) -> None:
        from safetensors.torch import save_file

        name = f"run-{run:04d}.partial.{state['meta']['step']:06d}.safetensors"
        with atomic_path(self.dir / name) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in state["tensors"].items()}, str(tmp))
        digest = hashlib.sha256((self.dir / name).read_bytes()).hexdigest()
        write_json(self._partial(run), {"run": run, "context": self.context, "step": state["meta"]["step"],
                                        "tensors": name, "sha256": digest, "state": state["meta"]})
        for old in self.dir.glob(f"run-{run:04d}.partial.*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def drop_partial(self, run: int) -> None:
        """Forget run `run`'s mid-run state (the run is finished)."""
        self._partial(run).unlink(missing_ok=True)
        for old in self.dir.glob(f"run-{run:04d}.partial.*.safetensors"):
            old.unlink(missing_ok=True)


class RunCheckpoint:
    """`LoraTrainer.fit`'s checkpoint (`shed.training.Checkpoint`) for run `run` of a `RunStore`: a
    state is due `seconds` after the last one (or the run's start; 0: after every step)."""

    def __init__(self, store: RunStore, run: int, seconds: float):
        self.store, self.run, self.seconds = store, run, seconds
        self.last = time.monotonic()

    def load(self) -> dict | None:
        return self.store.load_partial(self.run)

    def due(self, step: int) -> bool:
        return time.monotonic() - self.last >= self.seconds

    def save(self, state: dict) -> None:
        self.store.save_partial(self.run, state)
        self.last = time.monotonic()


# --- forward --------------------------------------------------------------------------------------------

# The code a forward loss comes from: the method and its scorer, the trainer, the model loader, the runner that
# wires them (the dev-fit recipe, the settings it passes) and the shards it scores in (their batches); not the
# executors, which only carry shards to workers and back.
FORWARD_CODE = ["shed.forward", "shed.training", "shed.models", "shed.scoring", "shed.forward_runner", "shed.shards"]
FORWARD_NOT_CODE = NOT_JOB_CODE | {"shed.executors"}


def forward_context(params: Params, dev_ids: list[str] | None, device: str) -> str:
    """Everything a record's loss under a forward run depends on besides the record (its id is a content
    hash) and the run's index; with `dev_ids` None, under the base model (no dev set: every dev set shares it)."""
    cfg = params.shapley
    code = codedeps.fingerprint(FORWARD_CODE, exclude=FORWARD_NOT_CODE)
    cut = (cfg.dev_max_length, cfg.chunk_tokens) if dev_ids is not None else (0, cfg.chunk_tokens)
    blob = json.dumps({"job": job_context(cfg.model, params.train, cfg.value, dev_ids or [], code=code, dev_cut=cut),
                       "method": "forward" if dev_ids is not None else "forward-base", "device": device.split(":")[0],
                       "dtype": cfg.dtype, "dev_epochs": cfg.dev_epochs if dev_ids is not None else None,
                       "seeds": "train.seed + run"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ForwardStore:
    """`forward.LossBook` on disk: per key (the base model's, in <base context>/, shared by every dev set; each
    run's, in <context>/), the losses of every record scored so far, appended in chunks as
    <key>.chunk-NNNNNN.ids.txt + .npy, each pair named by a JSON written last with both files' sha256; each run's
    fitted adapter as <run>.adapter.safetensors with its summary JSON. A killed stage keeps every chunk
    written; a chunk or adapter that does not match its JSON is dropped with a warning and done again."""

    def __init__(self, root: str | Path, base_context: str, context: str):
        self.base_dir, self.dir = Path(root) / base_context, Path(root) / context
        for folder in (self.base_dir, self.dir):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".*"):  # an atomic write cut short by a kill
                shutil.rmtree(stale, ignore_errors=True)
        self._cache: dict[str, dict[str, float]] = {}

    def _folder(self, key: str) -> Path:
        from shed.forward import BASE

        return self.base_dir if key == BASE else self.dir

    def losses(self, key: str) -> dict[str, float]:
        if key not in self._cache:
            known: dict[str, float] = {}
            for meta_path in sorted(self._folder(key).glob(f"{key}.chunk-*.json")):
                try:
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                    ids_bytes = (meta_path.parent / meta["ids"]).read_bytes()
                    array_bytes = (meta_path.parent / meta["losses"]).read_bytes()
                    if [hashlib.sha256(b).hexdigest() for b in (ids_bytes, array_bytes)] != meta["sha256"]:
                        raise ValueError("its files do not match their sha256")
                    ids = ids_bytes.decode().split()
                    values = np.load(meta_path.parent / meta["losses"], allow_pickle=False)
                    if len(ids) != len(values):
                        raise ValueError(f"{len(ids)} ids but {len(values)} losses")
                except (ValueError, KeyError, OSError) as exc:
                    log.warning("%s: not reused (%s); its records are scored again", meta_path, exc)
                    continue
                known.update(zip(ids, values.tolist()))
            self._cache[key] = known
        return self._cache[key]

    def add_losses(self, key: str, ids: list[str], losses: list[float]) -> None:
        folder = self._folder(key)
        taken = [int(p.name.split(".chunk-")[1].split(".")[0]) for p in folder.glob(f"{key}.chunk-*.json")]
        name = f"{key}.chunk-{max(taken, default=-1) + 1:06d}"
        write_text(folder / f"{name}.ids.txt", "".join(f"{i}\n" for i in ids))
        with atomic_path(folder / f"{name}.npy") as tmp:
            np.save(tmp, np.asarray(losses, dtype=np.float64), allow_pickle=False)
        digests = [hashlib.sha256((folder / f"{name}{ext}").read_bytes()).hexdigest() for ext in (".ids.txt", ".npy")]
        write_json(folder / f"{name}.json", {"ids": f"{name}.ids.txt", "losses": f"{name}.npy", "sha256": digests})
        self.losses(key).update(zip(ids, losses))

    def fit(self, run: int):
        from safetensors.torch import load

        from shed.forward import ForwardRun, run_key

        meta_path, tensors_path = self.dir / f"{run_key(run)}.fit.json", self.dir / f"{run_key(run)}.adapter.safetensors"
        if not (meta_path.is_file() and tensors_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            data = tensors_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta.pop("sha256"):
                raise ValueError("its adapter does not match its sha256")
            return ForwardRun(**meta), load(data)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("%s: not reused (%s); the dev set is fitted again", meta_path, exc)
            return None

    def add_fit(self, summary, adapter) -> None:
        from safetensors.torch import save_file

        from shed.forward import run_key

        tensors_path = self.dir / f"{run_key(summary.run)}.adapter.safetensors"
        with atomic_path(tensors_path) as tmp:
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp))
        write_json(self.dir / f"{run_key(summary.run)}.fit.json",
                   {**vars(summary), "sha256": hashlib.sha256(tensors_path.read_bytes()).hexdigest()})
