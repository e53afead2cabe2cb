"""Sharing through a DVC remote: push, clone afresh, pull, and find the same curated dataset."""

import hashlib
import json

import pytest
from helpers import DVC, restore_head, sh


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_push_clone_pull_gives_the_same_curated_dataset(workspace, tmp_path):
    ws, _ = workspace
    restore_head(ws)
    remote = tmp_path / "remote"
    sh(ws, DVC, "remote", "add", "-f", "--local", "shared", str(remote))
    sh(ws, DVC, "push", "-r", "shared", "data/curated")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(ws), str(clone))
    assert not (clone / "data/curated").exists()
    sh(clone, DVC, "remote", "add", "--local", "shared", str(remote))
    sh(clone, DVC, "pull", "-r", "shared", "data/curated")
    original, pulled = ws / "data/curated", clone / "data/curated"
    assert sha256(pulled / "dataset.jsonl") == sha256(original / "dataset.jsonl")
    assert (pulled / "manifest.json").read_text() == (original / "manifest.json").read_text()
    assert json.loads((pulled / "manifest.json").read_text())["sha256"] == sha256(pulled / "dataset.jsonl")
