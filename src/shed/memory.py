"""Memory: passes chunked by tokens, and each model-running stage's peak estimated before its model loads.

`chunks` cuts rows of known lengths into consecutive chunks of at most `max_rows` rows and at most `max_tokens`
padded tokens (rows x the chunk's longest row): what one forward pass holds grows with that product, so a few
long rows cannot blow up a chunk sized by its row count. Each row's result is the same in any chunking, up to
float rounding.

The estimate (`Estimate`, built per stage by `inrun_estimate`, `retrain_estimate`, `forward_estimate`,
`scoring_estimate`, `finetune_estimate`, `evaluate_estimate`) is pure arithmetic over the model's shape
(`ModelShape`: read from config.json and the safetensors headers by `read_shape`, no weights loaded, no torch)
and the settings. `require` logs it and raises the one-line ShedError naming the settings to lower when it
exceeds the available memory (`available_bytes`: RAM, bounded by the cgroup's limit; a GPU's free memory).
The model of memory, and the measurements its factors come from, are in docs/engine.md#memory:

- weights: parameters x the loaded dtype's bytes; the LoRA adapter: r x (in + out) per adapted linear, x 16
  bytes while training (fp32 weight, gradient, AdamW's two moments);
- activations per padded token: with gradients, each decoder layer keeps about GRAD_HIDDEN x hidden +
  GRAD_INTERMEDIATE x intermediate elements (gradient checkpointing: its input alone, plus one layer being
  recomputed) and the loss GRAD_LOGITS fp32 copies of the vocabulary; without (scoring), one layer's
  transients, SCORE_HIDDEN x hidden + SCORE_INTERMEDIATE x intermediate, and SCORE_LOGITS copies; and a
  padded batch's attention mask, rows x width² x GRAD_MASK bytes per layer (SCORE_MASK once without gradients):
  quadratic in the width, so a chunk of long rows costs more than its tokens say;
- in-run (shed.inrun): the step's per-example LoRA gradients (batch x LoRA parameters x 4 bytes, as taken and
  as scaled), the held dev gradients (dev_every > 1 or normalize cosine: dev items x LoRA parameters x 4) and a
  dev chunk's own while they are taken; the dev passes run in eval mode, so never checkpointed;
- RUNTIME for the libraries and the allocator's slack.
A stage's peak is the sum of what it holds throughout plus the largest of its passes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shed.config import Params, TrainConfig
from shed.fileio import ShedError

log = logging.getLogger(__name__)

GB = 10**9  # estimates are reported in decimal gigabytes, "GB"

# Elements kept per padded token by a forward and backward with gradients, measured (docs/engine.md#memory):
# per decoder layer, per hidden and per intermediate unit; and fp32 copies of the logits (logits, log-softmax,
# their gradient).
GRAD_HIDDEN = 22
GRAD_INTERMEDIATE = 6
GRAD_LOGITS = 3
# Bytes per row and squared width of a padded batch: its attention mask, which every layer keeps for the backward
# (measured on the CPU's scaled-dot-product attention; a batch without padding has none).
GRAD_MASK = 6
# Without gradients only one layer's transients live at a time; the logits and their log-softmax in fp32.
SCORE_HIDDEN = 8
SCORE_INTERMEDIATE = 3
SCORE_LOGITS = 2
SCORE_MASK = 5
RUNTIME = int(0.5 * GB)  # torch, transformers and peft once imported, and the allocator's slack
ADAM_TRAINING_BYTES = 16  # per LoRA parameter: fp32 weight, gradient, AdamW's exp_avg and exp_avg_sq
DEV_BATCH = 64  # dev items per forward pass of a dev score (shed.scoring), at most shapley.chunk_tokens tokens


# --- chunks by rows and tokens -------------------------------------------------------------------

def chunks(lengths: Sequence[int], max_rows: int = 0, max_tokens: int = 0) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of rows with these token lengths, in order: at most `max_rows` rows
    (0: any number) and at most `max_tokens` padded tokens, the chunk's rows x its longest row (0: any); a row
    longer than `max_tokens` by itself is a chunk alone."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        wider = max(longest, n)
        if i > start and ((max_rows and i - start >= max_rows) or (max_tokens and (i - start + 1) * wider > max_tokens)):
            out.append((start, i))
            start, wider = i, n
        longest = wider
    if len(lengths) > start:
        out.append((start, len(lengths)))
    return out


def chunk_shapes(lengths: Sequence[int], max_rows: int = 0, max_tokens: int = 0) -> list[tuple[int, int]]:
    """(rows, width) of each chunk `chunks` makes of these lengths, its width the longest of its rows."""
    return [(stop - start, max(lengths[start:stop])) for start, stop in chunks(lengths, max_rows, max_tokens)]


def worst_chunk(rows: int, longest: int, max_tokens: int = 0) -> tuple[int, int]:
    """(rows, width) of the costliest chunk of up to `rows` rows of at most `longest` tokens each, `max_tokens`
    padded tokens a chunk (0: no bound): where the rows' own lengths are not known, every row at `longest`."""
    return (max(1, min(rows, max_tokens // max(longest, 1))) if max_tokens else rows), longest


# --- the model's shape, without loading it ---------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a causal LM: its parameter count, widths, depth, vocabulary and position limit,
    and (module name, in features, out features) of each of its linear weights, for the LoRA adapter's size."""

    parameters: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    max_positions: int | None
    linears: tuple[tuple[str, int, int], ...] = ()

    def lora_parameters(self, r: int, targets: Sequence[str]) -> int:
        """r x (in + out) for each linear a LoRA adapter on `targets` adapts (peft matches a module name ending
        in a target, as `training.LoraTrainer` does)."""
        return sum(r * (n_in + n_out) for name, n_in, n_out in self.linears
                   if any(name == t or name.endswith("." + t) for t in targets))


def _config_value(config: dict, *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def shape_from_config(config: dict, weights: dict[str, tuple[int, ...]] | None = None) -> ModelShape | None:
    """A `ModelShape` from a config.json's keys (Llama, Qwen, Mistral, GPT-2 names) and, when given, the weight
    shapes by name (a safetensors header's): exact parameter count and linears. Without them, the count and the
    linears of a Llama-style decoder (q, k, v, o, gate, up, down per layer). None when a width is missing."""
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _config_value(config, "vocab_size")
    if not (hidden and layers and vocab):
        return None
    inter = _config_value(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    positions = _config_value(config, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    if weights:
        parameters = sum(math.prod(s) for s in weights.values())
        linears = tuple((name.removesuffix(".weight"), s[1], s[0]) for name, s in sorted(weights.items())
                        if name.endswith(".weight") and len(s) == 2)
        return ModelShape(parameters, hidden, inter, layers, vocab, positions, linears)
    heads = _config_value(config, "num_attention_heads", "n_head") or 1
    head_dim = _config_value(config, "head_dim") or hidden // heads
    kv = (_config_value(config, "num_key_value_heads") or heads) * head_dim
    q = heads * head_dim
    per_layer = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
                 "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
                 "mlp.down_proj": (inter, hidden)}
    linears = tuple((f"model.layers.{i}.{name}", n_in, n_out) for i in range(layers)
                    for name, (n_in, n_out) in per_layer.items())
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    parameters = embeddings + sum(n_in * n_out for _, n_in, n_out in linears) + (2 * layers + 1) * hidden
    return ModelShape(parameters, hidden, inter, layers, vocab, positions, linears)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by name from a .safetensors file's header (its first bytes: nothing else is read)."""
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _model_file(name_or_path: str, filename: str) -> Path | None:
    """`filename` of a local model directory, or of a hub model in the local Hugging Face cache (never fetched)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    # Not a hub id (as models.load_causal_lm tells them): a file, or a local path that is not there.
    if path.suffix == ".gguf" or path.exists() or name_or_path.startswith((".", "/", "~")) \
            or name_or_path.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name_or_path, filename)
    except ValueError:  # not a valid hub id: the model loader says so
        return None
    return Path(found) if isinstance(found, str) else None


def read_shape(name_or_path: str) -> ModelShape | None:
    """The model's `ModelShape` from its config.json and safetensors headers (one file or an index's shards), or
    None when there is no config.json to read (a GGUF file, a hub model not in the local cache)."""
    config_path = _model_file(name_or_path, "config.json")
    if config_path is None:
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    weights: dict[str, tuple[int, ...]] = {}
    index = _model_file(name_or_path, "model.safetensors.index.json")
    if index is not None:
        for shard in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
            found = _model_file(name_or_path, shard)
            if found is None:
                weights = {}
                break
            weights.update(safetensors_shapes(found))
    elif (single := _model_file(name_or_path, "model.safetensors")) is not None:
        weights = safetensors_shapes(single)
    return shape_from_config(config, weights or None)


def dtype_bytes(dtype: str, device: str) -> int:
    """Bytes per weight of shapley.dtype/finetune.dtype on `device` (a resolved device: "cpu", "cuda:0", ...):
    auto is bf16 on CUDA and fp32 on the CPU (`models.resolve_dtype`)."""
    if dtype == "auto":
        return 2 if device.startswith("cuda") else 4
    return 4 if dtype in ("float32", "fp32") else 2


# --- the estimate ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One term of a peak: what it is, its bytes, and the settings that shrink it ("key (value)")."""

    what: str
    bytes: float
    knobs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Estimate:
    """A stage's estimated peak: the parts held throughout plus the largest of its passes (`passes`, of which
    only the largest counts), `copies` times (worker processes, each with its own model)."""

    held: tuple[Part, ...]
    passes: tuple[Part, ...] = ()
    copies: int = 1
    copies_knob: str | None = None  # the setting that makes the copies (shapley.workers)

    @property
    def parts(self) -> list[Part]:
        """The parts counted, largest first (the held ones and the largest pass)."""
        largest = [max(self.passes, key=lambda p: p.bytes)] if self.passes else []
        return sorted([*self.held, *largest], key=lambda p: -p.bytes)

    @property
    def total(self) -> float:
        return self.copies * sum(p.bytes for p in self.parts)

    def summary(self) -> str:
        """The estimate in one line, its parts in GB: "2.31 GB (dev pass 1.20, weights 0.54, ...)"."""
        parts = ", ".join(f"{p.what} {p.bytes / GB:.2f}" for p in self.parts)
        per = f" = {self.copies} x" if self.copies > 1 else ""
        return f"{self.total / GB:.2f} GB{per} ({parts})"

    def problem(self, stage: str, available: float | None) -> str | None:
        """The refusal, one line, when the peak exceeds `available` bytes (None: it fits, or nothing is known):
        the estimate against what is available, then the settings that shrink the largest parts, as many parts
        as it takes for their sum to cover the excess."""
        if available is None or self.total <= available:
            return None
        knobs, covered = [], 0.0
        for part in (p for p in self.parts if p.knobs):
            if covered * self.copies >= self.total - available:
                break
            knobs += part.knobs
            covered += part.bytes
        if self.copies > 1 and self.copies_knob:
            knobs.insert(0, self.copies_knob)
        knobs = list(dict.fromkeys(knobs))[:5]
        advice = f"; lower {' or '.join(knobs)}" if knobs else "; use a smaller model or a machine with more memory"
        per = f"{self.copies} x (" if self.copies > 1 else "("
        largest = ", ".join(f"{p.what} {p.bytes / GB:.2f} GB" for p in self.parts[:3])
        return (f"{stage}: estimated peak {self.total / GB:.1f} GB > {available / GB:.1f} GB available "
                f"{per}{largest}{', ...' if len(self.parts) > 3 else ''}){advice}")


def grad_token_bytes(shape: ModelShape, element: int, checkpointing: bool = False) -> float:
    """Bytes a forward and backward with gradients keeps per padded token: every layer's saved activations
    (with gradient checkpointing each layer's input only, and one layer's whole while it is recomputed) and the
    loss's fp32 copies of the logits."""
    layer = (GRAD_HIDDEN * shape.hidden + GRAD_INTERMEDIATE * shape.intermediate) * element
    layers = shape.layers * shape.hidden * element + layer if checkpointing else shape.layers * layer
    return layers + GRAD_LOGITS * shape.vocab * 4


def grad_pass_bytes(shape: ModelShape, rows: int, width: int, element: int, checkpointing: bool = False) -> float:
    """Bytes of a forward and backward of `rows` rows padded to `width` tokens: `grad_token_bytes` a token, and
    the attention mask, GRAD_MASK bytes per row and squared width in every layer."""
    return rows * width * grad_token_bytes(shape, element, checkpointing) + rows * width**2 * GRAD_MASK * shape.layers


def score_pass_bytes(shape: ModelShape, rows: int, width: int, element: int) -> float:
    """Bytes of a forward without gradients (a loss, a log-likelihood) of `rows` rows padded to `width` tokens:
    per token one layer's transients and the logits and their log-softmax in fp32, and the attention mask."""
    per_token = (SCORE_HIDDEN * shape.hidden + SCORE_INTERMEDIATE * shape.intermediate) * element \
        + SCORE_LOGITS * shape.vocab * 4
    return rows * width * per_token + rows * width**2 * SCORE_MASK


def _knob(key: str, value, zero: str | None = None) -> str:
    """A setting as a refusal names it, "key (value)", with what 0 stands for: "train.max_length (0 = 2048)"."""
    return f"{key} ({value}{f' = {zero}' if zero and not value else ''})"


def _common(shape: ModelShape, weight_bytes: int) -> list[Part]:
    return [Part("runtime", RUNTIME), Part("weights", shape.parameters * weight_bytes)]


def _lora(shape: ModelShape, train: TrainConfig) -> int:
    return shape.lora_parameters(train.lora.r, train.lora.target_modules)


def _lora_knobs(train: TrainConfig) -> tuple[str, ...]:
    return (_knob("train.lora.r", train.lora.r), "train.lora.target_modules")


def _training_pass(shape: ModelShape, train: TrainConfig, longest: int, element: int, what: str = "training pass"
                   ) -> Part:
    """A training micro-batch, every record at `longest` tokens."""
    knobs = [_knob("train.micro_batch_size", train.micro_batch_size, f"{train.batch_size}"),
             _knob("train.max_length", train.max_length, f"{shape.max_positions}")]
    return Part(what, grad_pass_bytes(shape, train.micro_batch, longest, element, train.gradient_checkpointing),
                tuple(knobs + ([] if train.gradient_checkpointing else ["train.gradient_checkpointing (false)"])))


def _dev_knobs(params: Params, shape: ModelShape, dev_chunk: bool) -> tuple[str, ...]:
    cfg = params.shapley
    knobs = [_knob("shapley.chunk_tokens", cfg.chunk_tokens, "no bound: set one"),
             _knob("shapley.dev_max_length", cfg.dev_max_length, f"{shape.max_positions}")]
    return tuple(knobs + ([_knob("shapley.dev_chunk", cfg.dev_chunk, "all")] if dev_chunk else []))


def inrun_estimate(params: Params, shape: ModelShape, device: str, dev_lengths: Sequence[int],
                   longest_record: int) -> Estimate:
    """shapley.method inrun: held throughout, the weights, the adapter's training state with the callback's
    copies (the step's gradient; with direction adam its second moment and preconditioner), the step's
    per-example gradients and (dev_every > 1 or normalize cosine) every dev item's; the largest pass is a
    training micro-batch (its records at most `longest_record` tokens) or a dev chunk (`dev_lengths`: each dev
    item's tokens as cut) with, where they are held, the chunk's own per-example gradients."""
    cfg, train = params.shapley, params.train
    lora = _lora(shape, train)
    held = cfg.dev_every > 1 or cfg.normalize == "cosine"
    extra = 4 + 8 * (cfg.direction == "adam")
    parts = [*_common(shape, dtype_bytes(cfg.dtype, device)),
             Part("LoRA training state", lora * (ADAM_TRAINING_BYTES + extra), _lora_knobs(train)),
             Part("per-example gradients of a step", 2 * train.batch_size * lora * 4,
                  (_knob("train.batch_size", train.batch_size), *_lora_knobs(train)))]
    if held:
        parts.append(Part("held dev gradients", len(dev_lengths) * lora * 4,
                          (_knob("shapley.dev_every", cfg.dev_every), *_lora_knobs(train))))
    # The per-example passes run without the trainer's autocast: the adapter's fp32 carries through every layer.
    # With gradient checkpointing the hooks still hold each adapted layer's input (3 x hidden + intermediate).
    train_pass = _training_pass(shape, train, longest_record, 4)
    hooked = train.gradient_checkpointing * shape.layers * (3 * shape.hidden + shape.intermediate) * 4
    train_pass = Part(train_pass.what, train_pass.bytes + train.micro_batch * longest_record * hooked,
                      train_pass.knobs)
    dev_pass = max(grad_pass_bytes(shape, rows, width, 4) + held * rows * lora * 4
                   for rows, width in chunk_shapes(dev_lengths, cfg.dev_chunk, cfg.chunk_tokens) or [(0, 0)])
    return Estimate(tuple(parts), (train_pass, Part("dev pass", dev_pass, _dev_knobs(params, shape, True))))


def retrain_estimate(params: Params, shape: ModelShape, device: str, dev_lengths: Sequence[int],
                     longest_record: int, workers: int = 1) -> Estimate:
    """shapley.method retrain, per worker process (`workers` on this device): the weights, the adapter's
    training state, and the larger of a training micro-batch and a chunk of the dev score (`DEV_BATCH` items,
    shapley.chunk_tokens tokens)."""
    cfg, train = params.shapley, params.train
    element = dtype_bytes(cfg.dtype, device)
    dev_score = max(score_pass_bytes(shape, rows, width, 4)
                    for rows, width in chunk_shapes(dev_lengths, DEV_BATCH, cfg.chunk_tokens) or [(0, 0)])
    parts = [*_common(shape, element), Part("LoRA training state", _lora(shape, train) * ADAM_TRAINING_BYTES,
                                            _lora_knobs(train))]
    passes = (_training_pass(shape, train, longest_record, element),
              Part("dev score", dev_score, _dev_knobs(params, shape, False)))
    return Estimate(tuple(parts), passes, workers, _knob("shapley.workers", cfg.workers))


def forward_estimate(params: Params, shape: ModelShape, device: str, longest_dev: int, longest_record: int,
                     copies: int = 1) -> Estimate:
    """shapley.method forward, per copy of the model on this device (`copies`: the stage's own and its scoring
    workers'): the weights, the adapter's training state, and the largest of a micro-batch of the dev-set fit (dev
    records at most `longest_dev` tokens) and a chunk of record losses (records at most `longest_record` tokens,
    train.micro_batch a chunk, shapley.chunk_tokens tokens)."""
    cfg, train = params.shapley, params.train
    element = dtype_bytes(cfg.dtype, device)
    parts = [*_common(shape, element), Part("LoRA training state", _lora(shape, train) * ADAM_TRAINING_BYTES,
                                            _lora_knobs(train))]
    scored = worst_chunk(train.micro_batch, max(longest_record, longest_dev), cfg.chunk_tokens)
    passes = (_training_pass(shape, train, longest_dev, element, "dev-set fit pass"),
              Part("record losses", score_pass_bytes(shape, *scored, 4),
                   (_knob("shapley.chunk_tokens", cfg.chunk_tokens, "no bound: set one"),
                    _knob("train.max_length", train.max_length, f"{shape.max_positions}"))))
    return Estimate(tuple(parts), passes, copies, _knob("shapley.workers", cfg.workers))


def scoring_estimate(params: Params, shape: ModelShape, device: str, longest_record: int, workers: int = 1
                     ) -> Estimate:
    """Record losses without an adapter (sample's perplexity and IFD), per worker (`workers` on this device): the
    weights and a chunk of train.micro_batch records of at most `longest_record` tokens, shapley.chunk_tokens a
    chunk."""
    cfg, train = params.shapley, params.train
    scored = worst_chunk(train.micro_batch, longest_record, cfg.chunk_tokens)
    return Estimate(tuple(_common(shape, dtype_bytes(cfg.dtype, device))),
                    (Part("record losses", score_pass_bytes(shape, *scored, 4),
                          (_knob("shapley.chunk_tokens", cfg.chunk_tokens, "no bound: set one"),
                           _knob("train.micro_batch_size", train.micro_batch_size, f"{train.batch_size}"),
                           _knob("train.max_length", train.max_length, f"{shape.max_positions}"))),),
                    workers, _knob("shapley.workers", cfg.workers))


def finetune_estimate(params: Params, shape: ModelShape, device: str, longest_record: int) -> Estimate:
    """The finetune stage: the weights, the adapter's training state and a training micro-batch of records of
    at most `longest_record` tokens, under the trainer's autocast (activations in the weights' dtype)."""
    train = params.train
    element = dtype_bytes(params.finetune.dtype, device)
    return Estimate((*_common(shape, element), Part("LoRA training state", _lora(shape, train) * ADAM_TRAINING_BYTES,
                                                    _lora_knobs(train))),
                    (_training_pass(shape, train, longest_record, element),))


def evaluate_estimate(params: Params, shape: ModelShape, device: str, longest_item: int, lora_parameters: int
                      ) -> Estimate:
    """The evaluate stage: the weights, the adapter (`lora_parameters`, fp32), and one lm-eval batch of
    evaluate.batch_size requests of at most `longest_item` tokens."""
    cfg = params.evaluate
    element = dtype_bytes(params.finetune.dtype, device)
    return Estimate((*_common(shape, element), Part("LoRA adapter", lora_parameters * 4)),
                    (Part("lm-eval batch", score_pass_bytes(shape, cfg.batch_size, longest_item, element),
                          (_knob("evaluate.batch_size", cfg.batch_size),)),))


# --- against what is available ---------------------------------------------------------------------

def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def ram_available() -> int | None:
    """Bytes of RAM a new allocation may still take: MemAvailable of /proc/meminfo (else the free pages
    os.sysconf reports), bounded by this process's cgroup limit less the cgroup's usage (v2, else v1)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = None
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
            left = max(limit - usage, 0)
            available = left if available is None else min(available, left)
            break
    return available


def available_bytes(device: str) -> int | None:
    """Memory the stage may still take on `device` (resolved: "cpu", "cuda", "cuda:1", ...): a GPU's free memory
    (torch.cuda.mem_get_info), else `ram_available`; None where it cannot be read (mps, ...)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    return ram_available() if device == "cpu" else None


def settle(build: Callable[[int], Estimate], worst: int, longest: Callable[[], int], available: int | None
           ) -> Estimate:
    """The estimate to judge: `build(worst)` (every record at the length cut) when it fits `available`, else
    `build(longest())`, the records' actual longest (tokenising them all only when the worst case is too big)."""
    first = build(worst)
    if available is None or first.total <= available:
        return first
    return build(min(worst, longest()))


def check(stage: str, model: str, shape: ModelShape | None, device: str, build: Callable[[int], Estimate], worst: int,
          longest: Callable[[], int]) -> Estimate | None:
    """A stage's check before its model loads: the estimate `settle` picks (records at `worst` tokens, else at
    `longest()`), logged, refused by `require` when it does not fit; None, with a warning, for a model whose
    shape cannot be read without loading it."""
    if shape is None:
        log.warning("%s: %s has no config.json to read (a GGUF file?): peak memory not estimated", stage, model)
        return None
    available = available_bytes(device)
    estimate = settle(build, worst, longest, available)
    require(stage, estimate, device, available)
    return estimate


def require(stage: str, estimate: Estimate, device: str, available: int | None) -> None:
    """Log the estimate against the bytes `available` on `device` (`available_bytes`; None: unknown) and raise
    the one-line ShedError of `Estimate.problem` when it does not fit: before the model loads."""
    log.info("%s: estimated peak memory %s; %s available on %s", stage, estimate.summary(),
             f"{available / GB:.1f} GB" if available is not None else "unknown", device)
    problem = estimate.problem(stage, available)
    if problem:
        raise ShedError(problem)


@dataclass
class Cut:
    """How a set of items fared at a token cap: items cut, tokens dropped, the longest after the cut."""

    cap: int
    items: int = 0
    cut: int = 0
    tokens_cut: int = 0
    most_cut: int = 0
    tokens_max: int = 0
    lengths: list[int] = field(default_factory=list)  # each item's tokens after the cut

    @classmethod
    def of(cls, lengths: Sequence[int], cap: int) -> Cut:
        """The cut of items of these (uncut) token lengths at `cap` tokens (0: none)."""
        after = [min(n, cap) if cap else n for n in lengths]
        over = [n - m for n, m in zip(lengths, after) if n > m]
        return cls(cap, len(lengths), len(over), sum(over), max(over, default=0), max(after, default=0), after)

    def metrics(self, prefix: str = "dev") -> dict:
        return {f"{prefix}_max_length": self.cap, f"{prefix}_truncated": self.cut,
                f"{prefix}_tokens_cut": self.tokens_cut, f"{prefix}_tokens_max": self.tokens_max}

    def describe(self, what: str, setting: str) -> str | None:
        """The warning for a cut that dropped tokens (None for none)."""
        if not self.cut:
            return None
        return (f"{self.cut} of {self.items} {what} cut at {self.cap} tokens ({setting}): {self.tokens_cut:,} tokens "
                f"dropped, up to {self.most_cut:,} from one")
