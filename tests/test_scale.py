"""Large pools (issue 18): chunked and resumable embedding, FAISS next to scikit-learn k-means, and the
chunked pool reader's bad input behaving exactly as the whole-file reader's."""

import json
import subprocess
import sys

import numpy as np
import pytest

from shed import artifacts, clustering, streaming
from shed.config import Params
from shed.data import load_rows, normalize_pool
from shed.fileio import ShedError

ALPACA = [{"instruction": f"Task number {i}: " + "word " * (i % 13), "input": "" if i % 3 else f"input {i}",
           "output": f"Answer {i} " + "more " * (i % 7)} for i in range(60)]


def write_pool(root, records):
    (root / "data/prepared").mkdir(parents=True, exist_ok=True)
    rows = normalize_pool(records, "pool")
    (root / artifacts.POOL).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def static_model(tmp_path_factory):
    """A small model2vec static model (seeded random vectors over MiniLM's vocabulary): a static model path."""
    model2vec = pytest.importorskip("model2vec")
    from transformers import AutoTokenizer

    from shed.embedding import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2")).backend_tokenizer
    vectors = np.random.default_rng(0).normal(size=(tokenizer.get_vocab_size(), 16)).astype(np.float32)
    path = tmp_path_factory.mktemp("static") / "tiny-static"
    model2vec.StaticModel(vectors=vectors, tokenizer=tokenizer, normalize=True,
                          config={"model_type": "model2vec"}).save_pretrained(path)
    return str(path)


def embed_params(model, chunk_size, **extra):
    params = Params()
    params.embed.model, params.embed.chunk_size, params.embed.batch_size = model, chunk_size, 8
    params.embed.max_seq_length = 32  # short: fast on a CPU
    for key, value in extra.items():
        setattr(params.embed, key, value)
    return params


def run_embed(root, monkeypatch, params):
    from shed.stages import embed

    monkeypatch.chdir(root)
    embed.main(params)
    return (root / artifacts.EMBEDDINGS).read_bytes(), (root / artifacts.EMBED_IDS).read_text().split()


@pytest.mark.parametrize("model", ["static", "all-MiniLM-L6-v2"])
def test_chunked_embedding_equals_one_shot(tmp_path, monkeypatch, static_model, model):
    from shed.embedding import embed_texts
    from shed.records import record_text

    model = static_model if model == "static" else model
    rows = write_pool(tmp_path / "chunked", ALPACA)
    chunked, ids = run_embed(tmp_path / "chunked", monkeypatch, embed_params(model, 16))
    one_chunk, _ = run_embed(tmp_path / "chunked", monkeypatch, embed_params(model, 4096))
    assert ids == [r["id"] for r in rows]
    one_shot = embed_texts([record_text(r) for r in rows], model, 8, max_seq_length=32)
    np.save(tmp_path / "one_shot.npy", one_shot)
    # One chunk is one call: the same bytes as np.save of a one-shot embed_texts (the stage's old output).
    assert one_chunk == (tmp_path / "one_shot.npy").read_bytes()
    vectors = np.load(tmp_path / "chunked" / artifacts.EMBEDDINGS)
    assert vectors.shape == one_shot.shape and vectors.dtype == np.float32
    if model == static_model:  # a static model embeds each text alone: chunking cannot change a bit
        assert chunked == one_chunk
    else:  # batches are length-sorted within a chunk, so padding (and float rounding) may differ
        np.testing.assert_allclose(vectors, one_shot, atol=2e-6)
    metrics = json.loads((tmp_path / "chunked/metrics/embed.json").read_text())
    assert metrics["records"] == len(rows) and metrics["peak_rss_mb"] > 0
    assert not (tmp_path / "chunked" / artifacts.EMBED_PARTIAL).exists()


class Killed(Exception):
    pass


def test_resume_after_a_kill_mid_embed_gives_identical_embeddings(tmp_path, monkeypatch):
    from shed.stages import embed

    write_pool(tmp_path / "whole", ALPACA)
    write_pool(tmp_path / "killed", ALPACA)
    params = embed_params("all-MiniLM-L6-v2", 16)
    expected, _ = run_embed(tmp_path / "whole", monkeypatch, params)

    real = embed.load_encoder
    calls = []

    def dying(*args, **kwargs):
        encoder = real(*args, **kwargs)
        encode = encoder.encode

        def encode_until_killed(texts):
            calls.append(len(texts))
            if len(calls) == 3:
                raise Killed  # the third chunk never finishes
            return encode(texts)

        encoder.encode = encode_until_killed
        return encoder

    monkeypatch.setattr(embed, "load_encoder", dying)
    with pytest.raises(Killed):
        run_embed(tmp_path / "killed", monkeypatch, params)
    partial = tmp_path / "killed" / artifacts.EMBED_PARTIAL
    assert json.loads((partial / "progress.json").read_text())["chunks"] == 2
    assert not (tmp_path / "killed" / artifacts.EMBED).exists()  # nothing half-written where DVC looks

    calls.clear()
    monkeypatch.setattr(embed, "load_encoder", real)
    resumed, _ = run_embed(tmp_path / "killed", monkeypatch, params)
    assert resumed == expected
    assert json.loads((tmp_path / "killed/metrics/embed.json").read_text())["resumed_after_chunk"] == 2
    assert not partial.exists()


def test_a_changed_pool_or_setting_starts_afresh(tmp_path, monkeypatch, static_model):
    """Progress from other inputs is never resumed: its fingerprint covers the pool's bytes and embed.*."""
    from shed.stages import embed

    write_pool(tmp_path, ALPACA)
    params = embed_params(static_model, 16)
    monkeypatch.chdir(tmp_path)
    partial = tmp_path / artifacts.EMBED_PARTIAL
    partial.mkdir(parents=True)
    np.lib.format.open_memmap(partial / "embeddings.npy", mode="w+", dtype=np.float32, shape=(len(ALPACA), 16))
    (partial / "progress.json").write_text(json.dumps({"fingerprint": "other inputs", "chunks": 3}))
    embed.main(params)
    assert json.loads((tmp_path / "metrics/embed.json").read_text())["resumed_after_chunk"] == 0
    assert np.abs(np.load(tmp_path / artifacts.EMBEDDINGS)).sum(1).min() > 0  # every row really embedded


def blobs(n=600, centres=12, d=16, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=6, size=(centres, d))
    return (means[rng.integers(centres, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def assert_valid_clustering(vectors, labels, centroids, n_clusters):
    k = len(centroids)
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == list(range(k))  # none empty, 0..K-1
    assert clustering.empty_clusters(n_clusters, labels) == n_clusters - k
    distances = clustering.distances_to_centroids(vectors, labels, centroids)
    np.testing.assert_allclose(distances, np.linalg.norm(vectors - centroids[labels], axis=1), rtol=1e-6)
    chosen = clustering.proxies(labels, distances)
    assert sorted(chosen) == list(range(k))
    for cluster, row in chosen.items():
        members = np.flatnonzero(labels == cluster)
        assert labels[row] == cluster and row == members[np.argmin(distances[members])]  # nearest; ties: lowest


@pytest.mark.parametrize("algorithm", ["kmeans", "minibatch", "faiss"])
def test_faiss_and_sklearn_give_valid_proxies(algorithm):
    if algorithm == "faiss":
        pytest.importorskip("faiss")
    vectors = blobs()
    labels, centroids = clustering.kmeans(vectors, 12, seed=3, algorithm=algorithm)
    assert_valid_clustering(vectors, labels, centroids, 12)
    again, _ = clustering.kmeans(vectors, 12, seed=3, algorithm=algorithm)
    assert (labels == again).all()  # seeded


def test_faiss_finds_the_same_blobs_as_sklearn():
    pytest.importorskip("faiss")
    from sklearn.metrics import adjusted_rand_score

    vectors = blobs(seed=1)
    a, _ = clustering.kmeans(vectors, 12, seed=0, algorithm="kmeans")
    b, _ = clustering.kmeans(vectors, 12, seed=0, algorithm="faiss")
    assert adjusted_rand_score(a, b) > 0.9


def test_faiss_trains_on_a_seeded_subsample_of_a_large_pool():
    pytest.importorskip("faiss")
    vectors = blobs(n=3000, centres=5)
    labels, centroids = clustering.faiss_kmeans(vectors, 5, seed=0, max_points_per_centroid=100)
    labels, centroids = clustering.drop_empty(labels, centroids)
    assert_valid_clustering(vectors, labels, centroids, 5)


def test_empty_clusters_are_dropped_renumbered_and_counted():
    labels = np.array([0, 0, 2, 4, 4])
    centroids = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    new, kept = clustering.drop_empty(labels, centroids)
    assert new.tolist() == [0, 0, 1, 2, 2] and kept.tolist() == centroids[[0, 2, 4]].tolist()
    assert clustering.empty_clusters(5, new) == 2


@pytest.mark.parametrize("algorithm", ["kmeans", "faiss"])
def test_cluster_stage_on_memory_mapped_embeddings(tmp_path, monkeypatch, algorithm):
    if algorithm == "faiss":
        pytest.importorskip("faiss")
    from shed.stages import cluster

    monkeypatch.chdir(tmp_path)
    vectors = blobs(n=300)
    ids = [f"{i:016x}" for i in range(len(vectors))]
    artifacts.write_embeddings(vectors, ids)
    params = Params()
    params.cluster.C, params.cluster.algorithm = 12, algorithm
    cluster.main(params)
    assignments, proxies = artifacts.read_clusters()
    assert assignments["id"].tolist() == ids
    assert sorted(proxies["proxy_id"]) == sorted(assignments.loc[assignments["proxy"], "id"])
    assert proxies["size"].sum() == len(ids) and (proxies["size"] > 0).all()
    metrics = json.loads((tmp_path / "metrics/cluster.json").read_text())
    assert metrics["clusters"] + metrics["empty_dropped"] == 12 and metrics["peak_rss_mb"] > 0


# The chunked pool reader against the whole-file reader (shed.data): the same records, the same errors.
def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def pools(tmp_path, rows, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text(jsonl(rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".csv"):
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def reference(path, **kw):
    try:
        return normalize_pool(load_rows(path), path, kw.get("fmt", "auto"), kw.get("duplicates", "drop"),
                              kw.get("empty", "drop"))
    except ShedError as exc:
        return str(exc)


def chunked(path, chunk_size=7, **kw):
    from shed.stages.prepare import pool_records

    try:
        return list(pool_records(path, "train", kw.get("fmt", "auto"), kw.get("duplicates", "drop"),
                                 kw.get("empty", "drop"), chunk_size=chunk_size))
    except ShedError as exc:
        return str(exc)


BLANK = {"instruction": " ", "input": "", "output": "x"}


@pytest.mark.parametrize("name", ["pool.jsonl", "pool.json", "pool.parquet"])
@pytest.mark.parametrize("duplicates", ["drop", "keep", "error"])
@pytest.mark.parametrize("empty", ["drop", "error"])
def test_chunked_pool_reader_equals_the_whole_file_reader(tmp_path, name, duplicates, empty):
    rows = ALPACA[:30] + [BLANK] + ALPACA[3:5] + ALPACA[30:]  # a blank and duplicates beyond the first chunk
    path = pools(tmp_path, rows, name)
    expected = reference(path, duplicates=duplicates, empty=empty)
    assert chunked(path, duplicates=duplicates, empty=empty) == expected
    assert chunked(path, chunk_size=10_000, duplicates=duplicates, empty=empty) == expected


BAD_LATE = {  # each bad thing sits in a later chunk (chunks of 7 rows)
    "line_not_json": lambda rows: jsonl(rows[:20]) + "{oops\n",
    "line_not_object": lambda rows: jsonl(rows[:20]) + "[1, 2]\n",
    "not_utf8": lambda rows: jsonl(rows[:20]).encode() + b'{"instruction": "caf\xe9"}\n',
    "missing_field": lambda rows: jsonl([*rows[:20], {"instruction": "x"}]),
    "wrong_type": lambda rows: jsonl([*rows[:20], {"instruction": "x", "output": 3}]),
    "blank_lines_between": lambda rows: "\n\n".join(json.dumps(r) for r in [*rows[:20], {"output": "o"}]) + "\n",
}


@pytest.mark.parametrize("case", sorted(BAD_LATE))
def test_chunked_reader_bad_input_is_reported_as_before(tmp_path, case):
    content = BAD_LATE[case](ALPACA)
    path = tmp_path / "pool.jsonl"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    expected = reference(str(path))
    assert isinstance(expected, str) and ("line " in expected or "record " in expected)
    assert chunked(str(path)) == expected


@pytest.mark.parametrize("name,at", [("pool.jsonl", "line 21"), ("pool.json", "item 21"), ("pool.parquet", "row 21"),
                                     ("pool.csv", "row 22")])
def test_chunked_reader_names_a_late_row_by_its_place_in_the_file(tmp_path, name, at):
    path = pools(tmp_path, [*ALPACA[:20], {"instruction": "x", "input": "", "output": " "}], name)
    expected = f"{path}: {at}: field 'output' is empty (prepare.empty=error)"
    assert chunked(path, empty="error") == reference(path, empty="error") == expected


def test_chunked_reader_names_the_row_it_detects_the_schema_from(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("\n\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert chunked(str(path)) == reference(str(path))
    assert f"{path}: line 3: cannot detect the schema" in chunked(str(path))


def test_chunked_jsonl_reader_errors_name_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n{oops\n')
    with pytest.raises(ShedError, match=r"x.jsonl: line 4: not valid JSON"):
        list(streaming.iter_jsonl(path, 1))
    assert streaming.count_lines(path) == 3


def test_prepare_streams_a_large_pool_and_a_late_bad_line_stops_it_with_one_line(tmp_path):
    """Through the CLI, as users run it: the bad line is in the second chunk; nothing is written."""
    lines = [json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) for i in range(10_050)]
    (tmp_path / "params.yaml").write_text("prepare:\n  pool: pool.jsonl\n")
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    ok = subprocess.run([sys.executable, "-m", "shed", "prepare"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    written = (tmp_path / artifacts.POOL).read_text().splitlines()
    assert len(written) == 10_050 and json.loads(written[-1])["output"] == "10049"
    before = (tmp_path / artifacts.POOL).read_bytes()
    lines[10_020] = "{oops"
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    bad = subprocess.run([sys.executable, "-m", "shed", "prepare"], cwd=tmp_path, capture_output=True, text=True)
    errors = [line for line in bad.stderr.splitlines() if "error" in line]
    assert bad.returncode == 1 and len(errors) == 1 and "pool.jsonl: line 10021: not valid JSON" in errors[0]
    assert (tmp_path / artifacts.POOL).read_bytes() == before
    assert not list((tmp_path / "data").glob(".prepared*"))


@pytest.mark.slow
def test_onnx_backend_matches_torch(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from shed.embedding import embed_texts

    monkeypatch.setenv("SHED_CACHE", str(tmp_path))
    texts = [r["instruction"] + "\n" + r["output"] for r in ALPACA[:24]]
    torch_vectors = embed_texts(texts, "all-MiniLM-L6-v2", 8)
    np.testing.assert_allclose(embed_texts(texts, "all-MiniLM-L6-v2", 8, backend="onnx"), torch_vectors, atol=1e-4)
    int8 = embed_texts(texts, "all-MiniLM-L6-v2", 8, backend="onnx-int8")
    assert (int8 * torch_vectors).sum(1).min() > 0.85  # int8 weights: close, not equal


@pytest.mark.slow
def test_sigkill_mid_embed_then_rerun_gives_the_same_bytes(tmp_path, static_model):
    """A real kill (SIGKILL, no cleanup) of `shed embed` between chunks; the rerun resumes and ends identical."""
    import os
    import signal
    import time

    records = [{"instruction": f"Item {i}: " + "word " * (i % 17), "input": "", "output": f"out {i}"}
               for i in range(3000)]
    config = f"embed:\n  model: {static_model}\n  chunk_size: 10\n"
    for name in ("whole", "killed"):
        write_pool(tmp_path / name, records)
        (tmp_path / name / "params.yaml").write_text(config)
    shed = [sys.executable, "-m", "shed", "embed"]
    assert subprocess.run(shed, cwd=tmp_path / "whole", capture_output=True).returncode == 0
    proc = subprocess.Popen(shed, cwd=tmp_path / "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed" / artifacts.EMBED_PARTIAL / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["chunks"] >= 20:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / artifacts.EMBED).exists()
    assert subprocess.run(shed, cwd=tmp_path / "killed", capture_output=True).returncode == 0
    assert json.loads((tmp_path / "killed/metrics/embed.json").read_text())["resumed_after_chunk"] >= 20
    for path in (artifacts.EMBEDDINGS, artifacts.EMBED_IDS):
        assert (tmp_path / "killed" / path).read_bytes() == (tmp_path / "whole" / path).read_bytes()
