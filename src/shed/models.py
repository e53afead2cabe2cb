"""Loading causal LMs: hub ids, local directories and GGUF files, on a sensible device and dtype."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from shed.fileio import ShedError

log = logging.getLogger(__name__)


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


def _locate(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None)."""
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ShedError(f"{path}: model file not found")
        return str(path.parent), path.name
    if path.is_dir():
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
