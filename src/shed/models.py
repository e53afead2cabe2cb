"""Loading causal LMs: hub ids, local directories and GGUF files, on a sensible device and dtype.

A directory holding skipped.json (models/base when `shed base` had no configured model to build it for)
is refused in one line with the reason it records.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from shed.fileio import ShedError, read_json

log = logging.getLogger(__name__)

SKIPPED = "skipped.json"  # stands in a model directory left unbuilt: {reason} (shed.stages.base)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 matmuls are ~200x slower on these CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ShedError(f"dtype: unknown value {dtype!r} (auto, float32, bfloat16, float16)") from None


HALF = (torch.bfloat16, torch.float16)


def base_dtype(model) -> torch.dtype:
    """The dtype the base weights were loaded in: the first frozen floating-point parameter's (any
    floating-point parameter's when none is frozen yet, before an adapter is added)."""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in floats if not p.requires_grad]
    return (frozen or floats)[0].dtype if floats else torch.float32


def autocast_dtype(model) -> torch.dtype | None:
    """The training precision policy's autocast dtype for `model`'s forward passes, or None (plain fp32).

    The policy: base weights stay in the dtype they were loaded in (`resolve_dtype`: bf16 on CUDA, fp32
    on CPU); trainable weights (the LoRA adapter) are fp32 (`upcast_trainable`), so the optimizer and its
    states are fp32; where the base weights are half precision, forward passes run under autocast to
    that dtype, so the adapter's matmuls run at the base's speed while its master weights stay fp32.
    fp16 (not bf16) also needs a loss scaler (`needs_grad_scaler`)."""
    dtype = base_dtype(model)
    return dtype if dtype in HALF else None


def needs_grad_scaler(model) -> bool:
    """fp16 base weights: gradients underflow without loss scaling (bf16 has fp32's exponent range)."""
    return base_dtype(model) == torch.float16


def upcast_trainable(model) -> int:
    """Trainable parameters (the LoRA adapter) to fp32, in place; returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def max_positions(model) -> int | None:
    """The longest sequence `model` was built for (its config's position limit), or None if it names none."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _locate(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None)."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ShedError(f"{path}: model file not found")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / SKIPPED).is_file() and not (path / "config.json").exists():
            reason = read_json(path / SKIPPED).get("reason", "")
            raise ShedError(f"{path}: no model here: {reason} (rerun `shed base`, or `dvc repro`, with this model "
                            "configured)")
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return str(path), ggufs[0]
        if not (path / "config.json").exists():
            raise ShedError(f"{path}: not a model directory (no config.json or single .gguf file)")
        return str(path), None
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or path.exists()
    if looks_local:
        raise ShedError(f"{name_or_path}: model path does not exist (give a local directory, a .gguf file, "
                        "or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct)")
    return name_or_path, None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    where, gguf = _locate(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ShedError(f"{name_or_path}: could not load the tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode on the chosen device. Hub ids need network (or a filled HF cache)."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    where, gguf = _locate(name_or_path)
    log.info("loading model %s%s on %s (%s)", where, f" [{gguf}]" if gguf else "", device, torch_dtype)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    except OSError as exc:
        hint = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ShedError(f"{name_or_path}: could not load the model{hint} ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
