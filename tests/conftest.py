import os
import shutil

import pytest
import yaml

# The tests never reach a hub; without these, library lookups time out offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import DVC, ROOT, TINY, merge, run_stage, sh, write_stage_params  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """The tiny pipeline reproduced once in a temporary git repository, committed: (path, repro output)."""
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(ROOT / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(ws, "git", "init", "-q", "-b", "main")
    sh(ws, DVC, "init", "-q")
    sh(ws, DVC, "config", "core.analytics", "false")
    out = sh(ws, DVC, "repro")
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-q", "-m", "tiny pipeline")
    return ws, out


@pytest.fixture(scope="session")
def shapley_inputs(tmp_path_factory):
    """prepare, base, embed and cluster once (no DVC): the shapley stage's inputs, copied by its tests."""
    ws = tmp_path_factory.mktemp("shapley-inputs")
    write_stage_params(ws)
    for stage in ["prepare", "base", "embed", "cluster"]:
        run_stage(ws, stage)
    return ws


@pytest.fixture
def ws(shapley_inputs, tmp_path):
    """A copy of the shapley stage's inputs to run the stage in."""
    out = tmp_path / "ws"
    shutil.copytree(shapley_inputs, out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tensors this small train ~7x faster on one thread than on two busy cores (hand-offs cost more than math)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
