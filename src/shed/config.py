"""The one config schema: every block of params.yaml, its defaults, help, allowed values and validation.

Each stage reads only its own block(s) (and dvc.yaml lists exactly those), so a change to one
block reruns only the stages downstream of it. The defaults here are the embedded default, and
the shipped params.yaml spells out exactly these values (tests/test_config.py holds them equal).
Each field carries its help and its rule (choices or bounds) in its metadata, as HF/trl
dataclass configs do; rules between fields are each block's `check`.
"""

# param() returns a dataclasses.field (a default_factory for lists and blocks); ruff cannot see through it.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shed.fileio import ShedError, install_hint

PARAMS_FILE = "params.yaml"
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
# Offline copies of lm-eval's mmlu / arc_challenge (src/shed/tasks), and the evaluate.* key giving their data.
FILE_TASKS = {"mmlu_local": "mmlu_dir", "arc_challenge_local": "arc_file"}


def param(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
          gt: float | None = None, le: float | None = None, lt: float | None = None,
          zero: str | None = None) -> Any:
    """A dataclass field whose metadata holds its help and its rule.

    `choices`: the allowed values (for a list, of each item); `ge`/`gt`/`le`/`lt`: bounds;
    `zero`: what 0 means where 0 is allowed as a special value (`ge=0`). A nested block is
    given as its class, a list as a list: both become a default_factory.
    """
    rules = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "zero": zero}
    metadata = {"help": help, **{k: v for k, v in rules.items() if v is not None}}
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class EmbeddedConfig:
    """The generated default pool (see shed.synthetic)."""

    pool_size: int = param(1200, "records in the pool", ge=1)
    corrupt_fraction: float = param(0.25, "share of planted harmful records", ge=0, lt=1)
    dev_size: int = param(160, "multiple-choice questions for the value function", ge=1)
    eval_size: int = param(240, "held-out multiple-choice questions for the evaluate stage", ge=1)
    seed: int = param(0, "seed of the generator", ge=0)


@dataclass
class PrepareConfig:
    """The pool of records to curate, the dev questions that value them, and the eval questions."""

    pool: str = param("embedded", '"embedded", a local .json/.jsonl/.csv/.parquet, or "hf:<dataset id>"')
    format: str = param("auto", "record layout of the pool", choices=("auto", "alpaca", "dolly", "chat"))
    split: str = param("train", "split of a hub dataset")
    dev: str = param("embedded", 'the Shapley value function\'s dev set: multiple-choice JSONL {question, choices, '
                     'answer} (or ARC JSONL, MMLU CSV, a folder of them), instruction records in any layout the pool '
                     'takes, or "embedded"')
    eval: str = param("embedded", 'multiple-choice JSONL for the evaluate stage (never the dev questions), '
                      'or "embedded"')
    dev_exclude: list[str] = param([], "eval files/dirs (e.g. the MMLU dir) whose questions leave the dev set")
    duplicates: str = param("drop", "exact duplicates (they share an id)", choices=("drop", "keep", "error"))
    empty: str = param("drop", "records with a blank instruction or output", choices=("drop", "error"))
    max_records: int = param(0, "the first N records after normalisation", ge=0, zero="all")
    embedded: EmbeddedConfig = param(EmbeddedConfig, EmbeddedConfig.__doc__)


@dataclass
class BaseConfig:
    """The embedded default's base model: a tiny Llama with a BPE tokenizer trained here."""

    vocab_size: int = param(1024, "BPE vocabulary size", ge=1)
    hidden_size: int = param(128, "hidden size (a multiple of base.heads)", ge=1)
    layers: int = param(2, "decoder layers", ge=1)
    heads: int = param(4, "attention heads", ge=1)
    intermediate_size: int = param(256, "MLP inner size", ge=1)
    max_length: int = param(256, "longest sequence in tokens", ge=1)
    pretrain_steps: int = param(1500, "steps of causal-LM pretraining on generated text (enough for copying "
                                "heads to form)", ge=0, zero="random init")
    pretrain_batch_size: int = param(32, "pretraining batch size", ge=1)
    pretrain_lr: float = param(0.001, "pretraining learning rate (at 0.003 fine-tunes swung with the seed)", gt=0)
    seed: int = param(0, "seed of the tokenizer, weights and pretraining", ge=0)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.hidden_size % self.heads:
            yield "hidden_size", f"must be a multiple of base.heads={self.heads}"


@dataclass
class EmbedConfig:
    """Sentence embeddings of the records (and, for shapley.dev_neighbours, of the dev questions)."""

    model: str = param("all-MiniLM-L6-v2", "a sentence-transformers name/path (MiniLM resolves offline); "
                       "static:<that> distils it to static token vectors (model2vec, cached: ~100x faster on a "
                       "CPU); or a model2vec directory")
    backend: str = param("torch", "runtime of a transformer model: torch, or its ONNX export run by onnxruntime "
                         f"(onnx, onnx-int8; {install_hint('fast')}) or OpenVINO (the openvino extra)",
                         choices=("torch", "onnx", "onnx-int8", "openvino"))
    batch_size: int = param(128, "records per batch (batches are sorted by length)", ge=1)
    chunk_size: int = param(4096, "records embedded and written per chunk: a killed run resumes from the last "
                            "finished chunk", ge=1)
    fields: list[str] = param(["instruction", "input", "output"], "record fields embedded, in this order (a "
                              "conversation: instruction = system and user turns, output = replies, in turn order)",
                              choices=("instruction", "input", "output"))
    device: str = param("auto", "auto, cpu, cuda, cuda:<i>, ... (backend torch)")
    dtype: str = param("float32", "backend torch: weights' dtype on CUDA (auto: float16 on CUDA); CPUs run "
                       "float32", choices=("float32", "float16", "auto"))
    max_seq_length: int = param(0, "tokens embedded per record; CPU time grows with it", ge=0,
                                zero="the model's own")


@dataclass
class ClusterConfig:
    """k-means over the embeddings: each cluster is a proxy valued by the Shapley stage."""

    C: int = param(60, "number of clusters = proxies valued (paper: 3000)", ge=1)
    algorithm: str = param("auto", "auto: scikit-learn k-means up to 50k records, mini-batch beyond; faiss: FAISS "
                           f"k-means (GPU when present; minutes for C=3000 on 1M records; {install_hint('fast')})",
                           choices=("auto", "kmeans", "minibatch", "faiss"))
    seed: int = param(0, "k-means seed", ge=0)
    dedup_threshold: float = param(0.0, "semantic near-duplicates (SemDeDup): within a cluster, a record whose cosine "
                                   "similarity to a record kept before it (nearest the centroid first) exceeds this "
                                   "is listed in data/clusters/duplicates.csv and never sampled (e.g. 0.95)",
                                   ge=0, lt=1)


@dataclass
class LoraConfig:
    """The LoRA adapter trained by the fine-tuning recipe (fp32 weights; see train.* for precision)."""

    r: int = param(16, "adapter rank (paper: 128)", ge=1)
    alpha: int = param(32, "scaling numerator (scale = alpha / r; paper: 256)", ge=1)
    dropout: float = param(0.0, "dropout on the adapter input (paper: 0.1)", ge=0, lt=1)
    target_modules: list[str] = param(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      "modules that get an adapter")


@dataclass
class TrainConfig:
    """The fine-tuning recipe, shared by the Shapley utility and the finetune stage."""

    template: str = param("qa", "prompt template (chat: the tokenizer's own chat template)",
                          choices=("qa", "alpaca", "vicuna", "chat"))
    responses_only: bool = param(True, "loss on response tokens only")
    epochs: int = param(10, "passes over the data (a tiny model needs many over a few hundred records)", ge=1)
    lr: float = param(0.003, "learning rate", gt=0)
    max_grad_norm: float = param(1.0, "gradient clipping, as the HF Trainer does by default", ge=0, zero="off")
    batch_size: int = param(16, "records per optimizer step (paper: 128)", ge=1)
    micro_batch_size: int = param(0, "records per forward/backward pass; gradients accumulate over a step's "
                                  "micro-batches, weighted by label tokens, so the step equals one full batch "
                                  "(paper: 8)", ge=0, zero="batch_size")
    gradient_checkpointing: bool = param(False, "recompute each layer's activations in the backward pass: "
                                         "activation memory of one layer instead of all, ~30% more compute")
    group_by_length: bool = param(False, "within each step, put records of similar length in the same "
                                  "micro-batch: the step's records and update are unchanged, padding shrinks")
    warmup_ratio: float = param(0.1, "share of the steps with a linear lr warmup, floor(steps x ratio), "
                                "at least 1 (paper: 0.04)", ge=0, lt=1)
    max_length: int = param(128, "tokens per record (paper: 1024); may not exceed the model's own",
                            ge=0, zero="the model's own")
    seed: int = param(0, "seed of the adapter init and the data order", ge=0)
    lora: LoraConfig = param(LoraConfig, LoraConfig.__doc__)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            yield "micro_batch_size", (f"train.batch_size={self.batch_size} must be a multiple of it, "
                                       f"got {self.micro_batch_size}")

    @property
    def micro_batch(self) -> int:
        """Records per forward/backward pass (micro_batch_size, or batch_size for 0)."""
        return self.micro_batch_size or self.batch_size


@dataclass
class ShapleyConfig:
    """Shapley values of the clusters: the utility is the fine-tuned model's score on the dev set."""

    model: str = param("models/base", "hub id or local path; the embedded default is built by `shed base`")
    method: str = param("retrain", "retrain: fine-tune and score proxy subsets (the paper's); inrun: one fit on "
                        "the players per run, each credited its first-order drop of the dev loss at every step "
                        "(In-Run Data Shapley); forward: each player's loss under the base model minus its loss "
                        "after a fit on the dev set, the same first-order quantity from two forward passes "
                        "(CoLoR-Filter; docs/engine.md)", choices=("retrain", "inrun", "forward"))
    players: str = param("proxies", "what is valued: proxies (one per cluster, the paper's) or records (every pool "
                         "record, methods inrun and forward; a cluster's score aggregates its members')",
                         choices=("proxies", "records"))
    aggregate: str = param("mean", "players records: a cluster's score from its members' (mean, median, or "
                           "trimmed: the mean of the middle 80%)", choices=("mean", "median", "trimmed"))
    dev_epochs: int = param(0, "method forward: passes of the dev-set fit (the train recipe otherwise)",
                            ge=0, zero="train.epochs")
    k: int = param(4, "permutations (paper: 10-20); method inrun: training runs, each with its own data order",
                   ge=1)
    n: int = param(1, "proxies removed per step (paper: 60); 1 credits each proxy its own marginal", ge=1)
    seed: int = param(0, "seed of the permutations", ge=0)
    estimator: str = param("group_permutation", "Shapley estimator (group_permutation: the paper's)",
                           choices=("group_permutation", "antithetic", "regression", "stratified"))
    value: str = param("loglik", "value function: loglik (negative dev loss), choice_logprob (smooth MC "
                       "accuracy), accuracy (lm-eval); a dev set of instruction records takes loglik only",
                       choices=("loglik", "choice_logprob", "accuracy"))
    dev_neighbours: int = param(16, "m: each proxy valued on its m nearest dev questions (paper: 0, one game)",
                                ge=0, zero="whole dev set")
    workers: int = param(1, "concurrent workers, each with its own model: worker processes (on GPUs round robin: "
                         "cuda:0, cuda:1, ...) or Ray actors; they run retrain's jobs and score record losses "
                         "(forward, sample's perplexity and ifd) shard by shard, with the same results as one", ge=1)
    executor: str = param("local", f"where workers run (ray: {install_hint('ray')})", choices=("local", "ray"))
    max_retries: int = param(2, "times a job runs again when its worker process or Ray actor dies (killed, out "
                             "of memory, a crash) before the stage fails naming it; finished jobs are kept",
                             ge=0, zero="fail on the first lost worker")
    shard_records: int = param(512, "records per shard of a record-loss pass (forward; sample's perplexity and ifd): "
                               "what a worker scores at once and the forward store keeps as one chunk (a killed "
                               "stage scores a finished shard never again); scores do not depend on it beyond "
                               "float rounding", ge=1)
    device: str = param("auto", "auto, cpu, cuda, cuda:<i>, ...")
    dtype: str = param("auto", "model weights' dtype (auto: bf16 on GPU, fp32 on CPU)", choices=DTYPES)
    direction: str = param("sgd", "method inrun: the update direction credited: sgd (lr x clip x gradient, "
                           "In-Run Data Shapley's) or adam (each gradient through Adam's preconditioner, LESS-style)",
                           choices=("sgd", "adam"))
    normalize: str = param("none", "method inrun: none (lr x clip x <gradient, dev gradient>: In-Run Data Shapley's "
                           "first-order term), tokens (lr/peak lr x <per-token gradient, dev gradient>: no factor of "
                           "a record's length or batch), cosine (lr/peak lr x their cosine, LESS)",
                           choices=("none", "tokens", "cosine"))
    dev_chunk: int = param(0, "method inrun: dev questions per gradient pass (bounds memory on a large dev set)",
                           ge=0, zero="all at once")
    dev_max_length: int = param(0, "tokens per dev item (prompt and response, or question and answer): a longer "
                                "one is cut at the end, as training cuts a record, and counted in "
                                "metrics/shapley.json (dev_truncated); method forward also cuts at train.max_length",
                                ge=0, zero="the model's own limit")
    chunk_tokens: int = param(8192, "padded tokens (rows x the longest row) per pass where items go through the "
                              "model in chunks: in-run dev passes (with dev_chunk), dev scores, record losses "
                              "(forward; sample's perplexity and ifd); a longer item goes alone; scores do not "
                              "depend on it beyond float rounding", ge=0, zero="no bound")
    dev_every: int = param(1, "method inrun: steps between refreshes of the dev questions' gradients; 1: every "
                           "step (the exact first-order credit); N > 1 holds them (n_dev x LoRA parameters x 4 bytes) "
                           "and reuses them for N steps, TracIn-checkpoint style", ge=1)
    warmup: float = param(0.0, "method inrun: share of the valued records (a seeded sample per run) the adapter is "
                          "first fit on, uncredited; the credited run then starts from that adapter (LESS's "
                          "warm-up: credits from a model that is learning, not from LoRA's B = 0 start)",
                          ge=0, lt=1, zero="no warm-up")
    checkpoint_seconds: int = param(300, "method inrun: seconds between checkpoints of the run in progress (a "
                                    "killed stage resumes there); the scores do not depend on it",
                                    ge=0, zero="after every step")

    def check(self) -> Iterator[tuple[str, str]]:
        if self.method == "inrun" and self.value != "loglik":
            yield "value", (f"method inrun credits the gradient of the dev loss, so only value loglik; "
                            f"got {self.value}")
        if self.warmup and self.method != "inrun":
            yield "warmup", f"the warm-up fit is method inrun's; method {self.method} takes none (set it to 0)"
        if self.method == "forward" and self.value != "loglik":
            yield "value", f"method forward compares losses, so only value loglik; got {self.value}"
        if self.players == "records" and self.method == "retrain":
            yield "players", ("records: one retraining game per record is out of reach; value every record with "
                              "method inrun or forward")
        if self.dev_neighbours and self.value == "accuracy":
            yield "dev_neighbours", ("needs per-question scores, which shapley.value accuracy (lm-eval) does not "
                                     "give: use loglik or choice_logprob, or dev_neighbours 0")

    def dev_problem(self, dev_kind: str) -> str | None:
        """Why `value` cannot score a dev set of `dev_kind` (scoring.dev_kind: "choices" or "records"), or None.
        The shapley stage asks before any work: only prepare's output tells the kind."""
        if dev_kind == "records" and self.value != "loglik":
            return (f"{self.value} scores the answer choices of multiple-choice questions, and the dev set "
                    "(prepare.dev) holds instruction records, which have none: use loglik")
        return None


BLEND_SIGNALS = ("value", "loss", "relevance")  # sample.blend's choices: the record signals sample.within reads


@dataclass
class SampleConfig:
    """The curated subset drawn from the valued clusters."""

    method: str = param("qocs", "sampler (the baselines: docs/method.md#baselines)",
                        choices=("qocs", "qwcs", "qfcs", "random", "dsir", "full", "cluster_uniform", "length",
                                 "perplexity", "ifd"))
    within: str = param("nearest", "qocs, qwcs: which members a cluster gives first (qfcs: which records it also "
                        "leaves out, the worst exclude of the rest): nearest the centroid (the paper's; qwcs draws at "
                        "random), value (highest record score: shapley.players records), "
                        "loss (lowest loss under shapley.model), ifd (Superfiltering's order), relevance (highest "
                        "`sampling.relevance`: the instruction tells most about the response), blend (the mean of a "
                        "record's percentile ranks by each of sample.blend's signals)",
                        choices=("nearest", "value", "loss", "ifd", "relevance", "blend"))
    blend: list[str] = param(["value", "loss"], "within blend: the record signals it weighs alike (value: like the "
                             "dev set; loss: fluent; relevance: answers its own instruction)",
                             choices=BLEND_SIGNALS)
    cluster_score: str = param("value", "qocs, qwcs, qfcs: what ranks the clusters: value (their Shapley values, "
                               "data/shapley/scores.csv: the paper's) or members (one minus the mean percentile rank "
                               "of their members by sample.within's signal, `sampling.member_scores`: needs "
                               "sample.within other than nearest)", choices=("value", "members"))
    subset_size: float = param(0.1, "a fraction of the pool left after near-duplicates (<= 1; "
                              "cluster.dedup_threshold) or a record count (> 1)", gt=0)
    temperature: float = param(0.01, "QWCS: p(cluster) ∝ exp(score / T)", gt=0)
    exclude: float = param(0.3, "QFCS: share of the records, the lowest-scored clusters taken whole (and, with "
                           "sample.within, the worst of the rest by it), never sampled; the rest drawn uniformly at "
                           "random", ge=0, lt=1)
    seed: int = param(0, "sampling seed", ge=0)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.subset_size > 1 and self.subset_size != int(self.subset_size):
            yield "subset_size", f"a count must be a whole number, got {self.subset_size}"
        if self.cluster_score == "members" and self.within == "nearest":
            yield "cluster_score", "members ranks clusters by sample.within's record signal: set sample.within " \
                                   "(value, loss, ifd, relevance or blend), not nearest"
        if not self.blend or len(set(self.blend)) < len(self.blend):
            yield "blend", f"one or more record signals, each once; got {self.blend}"


@dataclass
class FinetuneConfig:
    """The final fine-tune on the curated subset."""

    model: str = param("models/base", "hub id or local path; may differ from shapley.model (transferability)")
    device: str = param("auto", "auto, cpu, cuda, cuda:<i>, ...")
    dtype: str = param("auto", "model weights' dtype (auto: bf16 on GPU, fp32 on CPU)", choices=DTYPES)


@dataclass
class EvaluateConfig:
    """Accuracy of the fine-tuned (and base) model on multiple-choice tasks, and its log-likelihood of
    held-out reference responses."""

    tasks: list[str] = param(["shed_embedded"], "project tasks (shed_embedded, shed_eval, mmlu_local, "
                             "arc_challenge_local: offline) or lm-eval built-ins (mmlu, arc_challenge: online)")
    batch_size: int = param(32, "questions per batch", ge=1)
    limit: int = param(0, "questions scored per task", ge=0, zero="all")
    include_base: bool = param(True, "also score the base model without the adapter")
    mmlu_dir: str = param("", "offline MMLU for mmlu_local: a directory with test/ (original CSV layout)")
    arc_file: str = param("", "offline ARC for arc_challenge_local: an AI2 ARC JSONL file")
    heldout: str = param("", "instruction records never trained on (any pool layout), scored by their reference "
                         "responses' mean per-token log-likelihood under train.template; '' = none")

    def check(self) -> Iterator[tuple[str, str]]:
        for task in (t for t in self.tasks if t in FILE_TASKS):
            key = FILE_TASKS[task]
            if not getattr(self, key):
                yield key, f"needed by task {task} (a path), got ''"


# No key may be named "size" or "nfiles": DVC's run-cache key drops keys of those names at any
# depth (dvc.stage.cache._get_cache_hash), so a run with another value would restore stale outputs.
@dataclass
class Params:
    """All of params.yaml: one block per stage."""

    prepare: PrepareConfig = param(PrepareConfig, PrepareConfig.__doc__)
    base: BaseConfig = param(BaseConfig, BaseConfig.__doc__)
    embed: EmbedConfig = param(EmbedConfig, EmbedConfig.__doc__)
    cluster: ClusterConfig = param(ClusterConfig, ClusterConfig.__doc__)
    train: TrainConfig = param(TrainConfig, TrainConfig.__doc__)
    shapley: ShapleyConfig = param(ShapleyConfig, ShapleyConfig.__doc__)
    sample: SampleConfig = param(SampleConfig, SampleConfig.__doc__)
    finetune: FinetuneConfig = param(FinetuneConfig, FinetuneConfig.__doc__)
    evaluate: EvaluateConfig = param(EvaluateConfig, EvaluateConfig.__doc__)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.shapley.n > self.cluster.C:
            yield "shapley.n", f"must not exceed cluster.C={self.cluster.C}, got {self.shapley.n}"


def _bounds(meta: dict) -> str:
    """A field's bounds in words ("" when it has none), as errors and `describe` say them."""
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    low, high = ge if ge is not None else gt, le if le is not None else lt
    if low is not None and high is not None:
        return f"in {'[' if ge is not None else '('}{low}, {high}{']' if le is not None else ')'}"
    if ge == 0:
        return f"0 ({meta['zero']}) or positive" if "zero" in meta else "0 or positive"
    if gt == 0:
        return "positive"
    words = [f"at least {ge}" if ge is not None else f"greater than {gt}" if gt is not None else "",
             f"at most {le}" if le is not None else f"less than {lt}" if lt is not None else ""]
    return " and ".join(w for w in words if w)


def _in_bounds(meta: dict, value: Any) -> bool:
    return not (("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
                or ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"]))


def _rule_problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` by field `f`'s choices and bounds, or None."""
    choices = f.metadata.get("choices")
    if choices and isinstance(value, list):
        # Items are named by the key's singular: embed.fields -> "unknown field 'x'".
        bad = [v for v in value if v not in choices]
        return f"unknown {f.name.removesuffix('s')} {bad[0]!r} ({', '.join(choices)})" if bad else None
    if choices and value not in choices:
        return f"unknown value {value!r} (choose one of {', '.join(sorted(choices))})"
    if not _in_bounds(f.metadata, value):
        return f"must be {_bounds(f.metadata)}, got {value}"
    return None


def _validate(obj: Any, where: str, source: str) -> None:
    """Each field's choices and bounds (nested blocks in turn), then the block's own `check`; raise on the first problem."""
    for f in dataclasses.fields(obj):
        key, value = f"{where}.{f.name}" if where else f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, key, source)
        elif (problem := _rule_problem(f, value)) is not None:
            raise ShedError(f"{source}: {key}: {problem}")
    for name, problem in getattr(obj, "check", lambda: ())():
        raise ShedError(f"{source}: {where + '.' if where else ''}{name}: {problem}")


def validate(params: Params, source: str = PARAMS_FILE) -> Params:
    """Check every field's choices and bounds, then the rules between fields; raise ShedError naming file and key."""
    _validate(params, "", source)
    return params


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
        elif dataclasses.is_dataclass(default):
            values[name] = _build(type(default), raw[name], key, source)
        else:
            values[name] = _coerce(raw[name], default, key, source)
    return cls(**values)


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """`value` as the type of `default` (an int may stand for a float, a string for a one-item list)."""
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


def describe(block_name: str, params: Params | None = None) -> list[tuple[str, object, str]]:
    """(dotted key, current value, help with its rule in words) for each key under `block_name`.

    `block_name` is a block ("train"), a nested block ("train.lora") or one key ("embed.model"),
    as artifacts.PARAMS names what a stage reads; without `params`, the defaults.
    """
    parent, _, name = block_name.rpartition(".")
    obj: Any = params if params is not None else Params()
    for part in filter(None, parent.split(".")):
        obj = getattr(obj, part)
    rows: list[tuple[str, object, str]] = []

    def walk(f: dataclasses.Field, value: Any, key: str) -> None:
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                walk(sub, getattr(value, sub.name), f"{key}.{sub.name}")
            return
        meta, rule = f.metadata, ""
        if "choices" in meta:
            rule = ("each " if isinstance(value, list) else "") + "one of " + ", ".join(meta["choices"])
        elif _bounds(meta):
            rule = _bounds(meta)
        rows.append((key, value, f"{meta['help']}; {rule}" if rule else meta["help"]))

    f = next((f for f in dataclasses.fields(obj) if f.name == name), None)
    if f is None:
        raise KeyError(f"{block_name}: no such params key")
    walk(f, getattr(obj, name), block_name)
    return rows


def merge_overrides(base: dict, override: dict) -> dict:
    """A params mapping with `override`'s nested keys laid over `base` (tests and benchmarks' tiny configs)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge_overrides(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def as_dict(obj: Any) -> dict:
    """A config (or any block) as plain nested dicts, as params.yaml spells it."""
    return dataclasses.asdict(obj)
