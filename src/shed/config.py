"""The one config schema: every block of params.yaml, its defaults, and its validation.

Each stage reads only its own block(s) (and dvc.yaml lists exactly those), so a change to one
block reruns only the stages downstream of it. Defaults here are the embedded default; the
shipped params.yaml spells them out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shed.fileio import ShedError

PARAMS_FILE = "params.yaml"


@dataclass
class EmbeddedConfig:
    """The generated default pool (see shed.synthetic)."""

    pool_size: int = 1200  # records in the pool
    corrupt_fraction: float = 0.25  # share of planted harmful records
    dev_size: int = 160  # multiple-choice questions for the value function
    eval_size: int = 240  # held-out multiple-choice questions for the evaluate stage
    seed: int = 0


@dataclass
class PrepareConfig:
    pool: str = "embedded"  # "embedded", a local .json/.jsonl/.csv/.parquet, or "hf:<dataset id>"
    format: str = "auto"  # auto | alpaca | dolly | chat
    split: str = "train"  # split of a hub dataset
    dev: str = "embedded"  # multiple-choice file (JSONL {question, choices, answer}) or "embedded"
    eval: str = "embedded"
    dev_exclude: list[str] = field(default_factory=list)  # eval files (e.g. the MMLU dir) whose questions leave the dev set
    duplicates: str = "drop"  # drop | keep | error  (exact duplicates share an id)
    empty: str = "drop"  # drop | error  (records with a blank instruction or output)
    max_records: int = 0  # 0 = all; otherwise the first N records after normalisation
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)


@dataclass
class BaseConfig:
    """The embedded default's base model: a tiny Llama with a BPE tokenizer trained here."""

    vocab_size: int = 2048
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    max_length: int = 256
    pretrain_steps: int = 300  # brief causal-LM pretraining on generated text (0 = random init)
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0


@dataclass
class EmbedConfig:
    model: str = "all-MiniLM-L6-v2"  # a sentence-transformers name/path; MiniLM resolves offline
    batch_size: int = 128
    fields: list[str] = field(default_factory=lambda: ["instruction", "input", "output"])
    device: str = "auto"
    max_seq_length: int = 0  # tokens embedded per record; 0 = the model's own limit (MiniLM: 256)


@dataclass
class ClusterConfig:
    C: int = 60  # number of k-means clusters (= proxies valued by the Shapley stage)
    algorithm: str = "auto"  # auto (k-means up to 50k records, mini-batch beyond) | kmeans | minibatch
    seed: int = 0


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    """The fine-tuning recipe, shared by the Shapley utility and the finetune stage."""

    template: str = "qa"  # qa | alpaca | vicuna | chat (the tokenizer's own chat template)
    responses_only: bool = True  # loss on response tokens only
    epochs: int = 3
    lr: float = 3e-3
    max_grad_norm: float = 1.0  # gradient clipping (0 = off), as the HF Trainer does by default
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ShapleyConfig:
    model: str = "models/base"  # hub id or local path; the embedded default is built by `shed base`
    k: int = 4  # permutations
    n: int = 1  # proxies removed per step (1: each proxy credited its own marginal)
    seed: int = 0
    estimator: str = "group_permutation"  # group_permutation (paper) | antithetic | regression | stratified
    value: str = "loglik"  # loglik (negative dev loss) | choice_logprob (smooth MC accuracy) | accuracy (lm-eval)
    dev_neighbours: int = 16  # 0: one game on the whole dev set (paper); m: each proxy on its m nearest questions
    workers: int = 1  # jobs run concurrently: processes (CPU), one GPU each (cuda:i), or Ray actors
    executor: str = "local"  # local | ray
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class SampleConfig:
    method: str = "qocs"  # qocs | qwcs | random | dsir | full
    subset_size: float = 0.1  # a fraction of the pool (<= 1) or a record count (> 1)
    temperature: float = 0.01  # QWCS: p(cluster) ∝ exp(score / T)
    seed: int = 0


@dataclass
class FinetuneConfig:
    model: str = "models/base"
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class EvaluateConfig:
    tasks: list[str] = field(default_factory=lambda: ["shed_embedded"])
    batch_size: int = 32
    limit: int = 0  # 0 = every question
    include_base: bool = True  # also score the base model without the adapter
    mmlu_dir: str = ""  # offline MMLU: a directory with test/ (original CSV layout)
    arc_file: str = ""  # offline ARC: an AI2 ARC JSONL file


# No key may be named "size" or "nfiles": DVC's run-cache key drops keys of those names at any
# depth (dvc.stage.cache._get_cache_hash), so a run with another value would restore stale outputs.
@dataclass
class Params:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    shapley: ShapleyConfig = field(default_factory=ShapleyConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


CHOICES = {
    "prepare.format": {"auto", "alpaca", "dolly", "chat"},
    "prepare.duplicates": {"drop", "keep", "error"},
    "prepare.empty": {"drop", "error"},
    "cluster.algorithm": {"auto", "kmeans", "minibatch"},
    "train.template": {"qa", "alpaca", "vicuna", "chat"},
    "shapley.estimator": {"group_permutation", "antithetic", "regression", "stratified"},
    "shapley.value": {"loglik", "choice_logprob", "accuracy"},
    "shapley.executor": {"local", "ray"},
    "sample.method": {"qocs", "qwcs", "random", "dsir", "full"},
}
POSITIVE = [
    "prepare.embedded.pool_size", "prepare.embedded.dev_size", "prepare.embedded.eval_size",
    "base.vocab_size", "base.hidden_size", "base.layers", "base.heads", "base.intermediate_size",
    "base.max_length", "base.pretrain_batch_size", "embed.batch_size", "cluster.C",
    "train.epochs", "train.batch_size", "train.max_length", "train.lora.r", "train.lora.alpha",
    "shapley.k", "shapley.n", "shapley.workers", "evaluate.batch_size",
]  # fmt: skip


def _build(cls: type, raw: Any, where: str, source: str) -> Any:
    """Recursively turn a mapping into dataclass `cls`, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ShedError(f"{source}: {where or 'top level'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ShedError(f"{source}: {key}: unknown key (known: {', '.join(sorted(fields))})")
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if name not in raw:
            values[name] = default
            continue
        value = raw[name]
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, key, source)
        else:
            values[name] = _coerce(value, default, key, source)
    return cls(**values)


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    def bad(expected: str) -> ShedError:
        return ShedError(f"{source}: {key}: expected {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return value
    return value


def _get(params: Params, dotted: str) -> Any:
    obj: Any = params
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(params: Params, source: str = PARAMS_FILE) -> Params:
    """Check ranges and choices; raise ShedError naming the file and key."""
    for key, allowed in CHOICES.items():
        value = _get(params, key)
        if value not in allowed:
            raise ShedError(f"{source}: {key}: unknown value {value!r} (choose one of {', '.join(sorted(allowed))})")
    for key in POSITIVE:
        if _get(params, key) < 1:
            raise ShedError(f"{source}: {key}: must be at least 1, got {_get(params, key)}")
    if params.shapley.dev_neighbours < 0:
        raise ShedError(f"{source}: shapley.dev_neighbours: must be 0 (whole dev set) or positive, "
                        f"got {params.shapley.dev_neighbours}")
    if params.shapley.dev_neighbours and params.shapley.value == "accuracy":
        raise ShedError(f"{source}: shapley.dev_neighbours: needs per-question scores, which shapley.value "
                        "accuracy (lm-eval) does not give: use loglik or choice_logprob, or dev_neighbours 0")
    if params.shapley.n > params.cluster.C:
        raise ShedError(f"{source}: shapley.n: must not exceed cluster.C={params.cluster.C}, got {params.shapley.n}")
    if params.sample.subset_size <= 0:
        raise ShedError(f"{source}: sample.subset_size: must be positive (a fraction <= 1 or a count), "
                        f"got {params.sample.subset_size}")
    if params.sample.subset_size > 1 and params.sample.subset_size != int(params.sample.subset_size):
        raise ShedError(f"{source}: sample.subset_size: a count must be a whole number, "
                        f"got {params.sample.subset_size}")
    if params.train.max_grad_norm < 0:
        raise ShedError(f"{source}: train.max_grad_norm: must be 0 (off) or positive, got {params.train.max_grad_norm}")
    if params.sample.temperature <= 0:
        raise ShedError(f"{source}: sample.temperature: must be positive, got {params.sample.temperature}")
    if not 0 <= params.prepare.embedded.corrupt_fraction < 1:
        raise ShedError(f"{source}: prepare.embedded.corrupt_fraction: must be in [0, 1), got "
                        f"{params.prepare.embedded.corrupt_fraction}")
    if params.train.lr <= 0:
        raise ShedError(f"{source}: train.lr: must be positive, got {params.train.lr}")
    if not 0 <= params.train.lora.dropout < 1:
        raise ShedError(f"{source}: train.lora.dropout: must be in [0, 1), got {params.train.lora.dropout}")
    if params.base.hidden_size % params.base.heads:
        raise ShedError(f"{source}: base.hidden_size: must be a multiple of base.heads={params.base.heads}")
    if params.prepare.max_records < 0:
        raise ShedError(f"{source}: prepare.max_records: must be 0 (all) or positive")
    if params.embed.max_seq_length < 0:
        raise ShedError(f"{source}: embed.max_seq_length: must be 0 (the model's own) or positive")
    if params.evaluate.limit < 0:
        raise ShedError(f"{source}: evaluate.limit: must be 0 (all) or positive")
    return params


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read params.yaml (safe_load) into the schema, validated."""
    path = Path(path)
    if not path.exists():
        raise ShedError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ShedError(f"{path}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return validate(_build(Params, raw, "", str(path)), str(path))


def merge_overrides(base: dict, override: dict) -> dict:
    """A params mapping with `override`'s nested keys laid over `base` (tests and benchmarks' tiny configs)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge_overrides(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def as_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
