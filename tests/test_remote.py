"""Sharing through a DVC remote: push, clone afresh, pull (or `dvc artifacts get`), and find the same curated
dataset."""

import hashlib
import json

import pytest
from helpers import DVC, restore_head, sh


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def push_and_clone(ws, tmp_path):
    """The session workspace's curated dataset pushed to a new local remote, and a git clone of the workspace
    (no DVC data, no cache): (remote, clone)."""
    restore_head(ws)
    remote = tmp_path / "remote"
    sh(ws, DVC, "remote", "add", "-f", "--local", "shared", str(remote))
    sh(ws, DVC, "push", "-r", "shared", "data/curated")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(ws), str(clone))
    assert not (clone / "data/curated").exists() and not (clone / ".dvc/cache").exists()
    return remote, clone


@pytest.mark.slow
def test_push_clone_pull_gives_the_same_curated_dataset(workspace, tmp_path):
    ws, _ = workspace
    remote, clone = push_and_clone(ws, tmp_path)
    sh(clone, DVC, "remote", "add", "--local", "shared", str(remote))
    sh(clone, DVC, "pull", "-r", "shared", "data/curated")
    original, pulled = ws / "data/curated", clone / "data/curated"
    assert sha256(pulled / "dataset.jsonl") == sha256(original / "dataset.jsonl")
    assert (pulled / "manifest.json").read_text() == (original / "manifest.json").read_text()
    assert json.loads((pulled / "manifest.json").read_text())["sha256"] == sha256(pulled / "dataset.jsonl")


@pytest.mark.slow
def test_dvc_artifacts_get_fetches_the_curated_dataset_from_the_remote(workspace, tmp_path):
    """The published repository (a clone with a default remote and no cache of its own) tags a version of the
    dvc.yaml artifact curated-dataset; `dvc artifacts get` on it downloads data/curated from the remote."""
    ws, _ = workspace
    remote, published = push_and_clone(ws, tmp_path)
    git = ("git", "-c", "user.name=shed", "-c", "user.email=shed@example.org")
    sh(published, DVC, "remote", "add", "-d", "shared", str(remote))
    sh(published, *git, "commit", "-qam", "shared remote")
    sh(published, *git, "tag", "-a", "curated-dataset@v1.0.0", "-m", "curated dataset v1")
    sh(tmp_path, DVC, "artifacts", "get", str(published), "curated-dataset", "-o", "got")
    for name in ("dataset.jsonl", "records.jsonl", "manifest.json"):
        assert (tmp_path / "got" / name).read_bytes() == (ws / "data/curated" / name).read_bytes()
