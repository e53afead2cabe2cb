"""Semantic near-duplicates (cluster.dedup_threshold): found within clusters, listed by the cluster stage,
never sampled."""

import json

import numpy as np
import pandas as pd
import pytest

from shed.clustering import near_duplicates
from shed.config import Params


def unit(degrees: float, plane: str = "xy") -> list[float]:
    """A unit vector at `degrees` from the first axis of `plane` (xy: from x toward y; yz: from z toward y)."""
    a = np.radians(degrees)
    return [float(np.cos(a)), float(np.sin(a)), 0.0] if plane == "xy" else [0.0, float(np.sin(a)), float(np.cos(a))]


# Two far-apart groups. xy: 0, 5, 30, 33 degrees (visited 5, 30, 33, 0: nearest their mean direction first);
# yz: 0, 2, 40 (visited 2, 0, 40).
TOY = np.array([unit(0), unit(5), unit(30), unit(33), unit(0, "yz"), unit(2, "yz"), unit(40, "yz")], dtype=np.float32)
TOY_IDS = [f"{i:016x}" for i in range(len(TOY))]


def reference(vectors, labels, distances, threshold):
    """The definition, one record at a time: (duplicate row, kept row), by duplicate row."""
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = []
    for cluster in np.unique(labels):
        kept = []
        for row in (r for r in np.lexsort((np.arange(len(labels)), distances)) if labels[r] == cluster):
            sims = x[kept] @ x[row]
            if len(kept) and sims.max() > threshold:
                pairs.append((row, kept[int(np.argmax(sims))]))
            else:
                kept.append(row)
    return sorted(pairs)


def test_near_duplicates_compare_each_record_with_the_records_kept_before_it():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    distances = np.array([17, 12, 13, 16, 14, 12, 26], dtype=float)  # angle to each group's mean direction
    # 0.95: 0 -> 5 (cos 5), 33 -> 30 (cos 3), yz 0 -> yz 2 (cos 2)
    duplicate, kept, similarity = near_duplicates(TOY, labels, distances, 0.95)
    assert (duplicate.tolist(), kept.tolist()) == ([0, 3, 4], [1, 2, 5])
    assert similarity == pytest.approx(np.cos(np.radians([5, 3, 2])), abs=1e-6)
    # 0.9: 30 is a duplicate of 5 (cos 25 = 0.906), so 33 is compared with 5 alone (cos 28 = 0.883) and kept.
    duplicate, kept, _ = near_duplicates(TOY, labels, distances, 0.9)
    assert (duplicate.tolist(), kept.tolist()) == ([0, 2, 4], [1, 1, 5])
    assert [len(a) for a in near_duplicates(TOY, labels, distances, 0.0)] == [0, 0, 0]


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.95])
def test_blocks_of_any_size_give_the_definitions_answer(threshold):
    rng = np.random.default_rng(0)
    vectors = (np.repeat(rng.normal(size=(30, 16)), 5, axis=0) + 0.15 * rng.normal(size=(150, 16))).astype(np.float32)
    labels, distances = rng.integers(0, 3, 150), rng.random(150)
    expected = reference(vectors, labels, distances, threshold)
    assert len(expected) > 50
    for block in (1, 2, 7, 4096):
        duplicate, kept, _ = near_duplicates(vectors, labels, distances, threshold, block=block)
        assert list(zip(duplicate.tolist(), kept.tolist())) == expected, block


def run_cluster(root, monkeypatch, threshold: float) -> dict[str, bytes]:
    """The cluster stage on TOY (C = 2) in `root`: its data/clusters files' bytes."""
    from shed.stages import cluster

    (root / "data/embed").mkdir(parents=True, exist_ok=True)
    np.save(root / "data/embed/embeddings.npy", TOY)
    (root / "data/embed/ids.txt").write_text("".join(i + "\n" for i in TOY_IDS))
    monkeypatch.chdir(root)
    params = Params()
    params.cluster.C, params.cluster.dedup_threshold = 2, threshold
    cluster.main(params)
    assert json.loads((root / "metrics/cluster.json").read_text())["duplicates"] == \
        len((root / "data/clusters/duplicates.csv").read_text().splitlines()) - 1
    return {p.name: p.read_bytes() for p in sorted((root / "data/clusters").iterdir())}


def test_the_cluster_stage_lists_the_near_duplicates_deterministically_and_none_at_threshold_zero(tmp_path,
                                                                                                  monkeypatch):
    first = run_cluster(tmp_path / "a", monkeypatch, 0.95)
    assert first["duplicates.csv"].decode() == ("id,kept_id,similarity\n"
                                                "0000000000000000,0000000000000001,0.996195\n"
                                                "0000000000000003,0000000000000002,0.99863\n"
                                                "0000000000000004,0000000000000005,0.999391\n")
    assert run_cluster(tmp_path / "b", monkeypatch, 0.95) == first
    off = run_cluster(tmp_path / "c", monkeypatch, 0.0)
    assert off["duplicates.csv"] == b"id,kept_id,similarity\n"
    # The clustering itself does not depend on the threshold.
    assert {k: v for k, v in off.items() if k != "duplicates.csv"} == \
        {k: v for k, v in first.items() if k != "duplicates.csv"}


@pytest.mark.slow  # the shared tiny workspace (about a minute, once) and every sampler
def test_no_sample_method_takes_a_near_duplicate(ws, monkeypatch):
    """The embedded default (tiny) clustered with a threshold, then every sample.method on what is left."""
    from shed.config import load_params
    from shed.stages import cluster, sample

    monkeypatch.chdir(ws)
    params = load_params("params.yaml")
    params.cluster.dedup_threshold = 0.9
    cluster.main(params)
    duplicates = pd.read_csv("data/clusters/duplicates.csv", dtype={"id": str, "kept_id": str})
    pool = [json.loads(line)["id"] for line in open("data/prepared/pool.jsonl", encoding="utf-8")]
    assert 0 < len(duplicates) < len(pool) // 2 and not set(duplicates["id"]) & set(duplicates["kept_id"])
    proxies = pd.read_csv("data/clusters/proxies.csv")
    (ws / "data/shapley").mkdir()
    pd.DataFrame({"cluster": proxies["cluster"], "score": -proxies["cluster"]}).to_csv("data/shapley/scores.csv",
                                                                                       index=False)
    params.shapley.device = "cpu"
    for method in sample.SAMPLERS:
        params.sample.method, params.sample.subset_size = method, 0.5
        sample.main(params)
        chosen = [json.loads(line)["id"] for line in open("data/curated/records.jsonl", encoding="utf-8")]
        assert not set(chosen) & set(duplicates["id"]), method
        assert len(chosen) == round((len(pool) - len(duplicates)) * (1 if method == "full" else 0.5)), method
        manifest = json.loads(open("data/curated/manifest.json", encoding="utf-8").read())
        assert (manifest["duplicates_removed"], manifest["pool_size"]) == (len(duplicates), len(pool) - len(duplicates))


def test_the_saved_measurement_renders_to_the_committed_table(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT, STAGE_ENV

    out = tmp_path / "near_duplicates.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/near_duplicates.py"), "--from-json",
                             "docs/results/near_duplicates.json", "--markdown", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=STAGE_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_text() == (ROOT / "docs/results/near_duplicates.md").read_text()
