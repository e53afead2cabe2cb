"""The user's rows kept from prepare to the curated set (data/prepared/rows.jsonl, data/curated/dataset.jsonl and
records.jsonl), and `shed export` in the layouts fine-tuning frameworks read (the DVC artifact: test_remote.py)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY, merge

from shed import artifacts
from shed.config import Params, load_params
from shed.data import record_id

# A Dolly-layout pool with a field shed does not read, non-ASCII text, an exact duplicate and a blank row.
DOLLY = [{"instruction": f"Name fruit number {i}.", "context": "" if i % 3 else f"Fruits, list {i}: café ☕",
          "response": f"Fruit {i} is a {('pear', 'plum', 'fig')[i % 3]}", "category": ["open_qa", "closed_qa"][i % 2]}
         for i in range(24)]
DOLLY_DUPLICATE = dict(DOLLY[4])
DOLLY_BLANK = {"instruction": "Say nothing.", "context": "", "response": "  ", "category": "open_qa"}
DOLLY_FILE = DOLLY[:10] + [DOLLY_DUPLICATE, DOLLY_BLANK] + DOLLY[10:]  # file order; kept: DOLLY in order


def dolly_id(row: dict) -> str:
    return record_id(row["instruction"], row["context"], row["response"])


def write_pool(path: Path, rows: list[dict]) -> None:
    """`rows` as a pool file of the type path's suffix names (JSON Lines, JSON array, CSV, Parquet)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif path.suffix == ".csv":
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def prepare(ws: Path, monkeypatch, pool: str, **prepare_params) -> None:
    from shed.stages import prepare as stage

    (ws / "params.yaml").write_text(yaml.safe_dump({"prepare": {"pool": pool, **prepare_params}}))
    monkeypatch.chdir(ws)
    stage.main(load_params("params.yaml"))


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --- prepare: data/prepared/rows.jsonl --------------------------------------------------------------

@pytest.mark.parametrize("name, first_at", [("pool.jsonl", ("line", 1)), ("pool.json", ("item", 1)),
                                             ("pool.csv", ("row", 2)), ("pool.parquet", ("row", 1))])
def test_prepare_keeps_every_kept_rows_original_fields_and_place(tmp_path, monkeypatch, name, first_at):
    write_pool(tmp_path / name, DOLLY_FILE)
    prepare(tmp_path, monkeypatch, name)
    pool, origins = jsonl(artifacts.POOL), jsonl(artifacts.ROWS)
    assert [o["id"] for o in origins] == [r["id"] for r in pool] == [dolly_id(r) for r in DOLLY]
    assert [o["row"] for o in origins] == DOLLY  # JSON-equal: every field, category included
    assert [list(o["row"]) for o in origins] == [list(r) for r in DOLLY]  # and in the user's order
    unit, first = first_at
    places = [first + i + (2 if i >= 10 else 0) for i in range(len(DOLLY))]  # the duplicate and the blank: none
    assert [o["at"] for o in origins] == [f"{unit} {n}" for n in places]
    assert {o["source"] for o in origins} == {name}
    assert "☕" in Path(artifacts.ROWS).read_text(encoding="utf-8")  # not escaped


def test_rows_are_written_chunk_by_chunk_with_the_pool(tmp_path, monkeypatch):
    from shed import streaming

    write_pool(tmp_path / "pool.jsonl", DOLLY_FILE)
    prepare(tmp_path, monkeypatch, "pool.jsonl")
    whole = Path(artifacts.ROWS).read_bytes(), Path(artifacts.POOL).read_bytes()
    monkeypatch.setattr(streaming, "CHUNK", 5)
    prepare(tmp_path, monkeypatch, "pool.jsonl")
    assert (Path(artifacts.ROWS).read_bytes(), Path(artifacts.POOL).read_bytes()) == whole


def test_the_pool_file_is_what_the_records_alone_give(tmp_path, monkeypatch):
    """pool.jsonl's bytes are unchanged by rows.jsonl: sorted keys, one record a line, as fileio.write_jsonl."""
    from shed.data import load_rows, normalize_pool
    from shed.fileio import json_line

    write_pool(tmp_path / "pool.jsonl", DOLLY_FILE)
    prepare(tmp_path, monkeypatch, "pool.jsonl", max_records=20)
    expected = normalize_pool(load_rows("pool.jsonl"), "pool.jsonl")[:20]
    assert Path(artifacts.POOL).read_text(encoding="utf-8") == "".join(json_line(r) + "\n" for r in expected)
    assert len(jsonl(artifacts.ROWS)) == 20


def test_the_embedded_pools_row_is_the_generated_record_without_its_id(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("prepare:\n  embedded: {pool_size: 30, dev_size: 10, eval_size: 10}\n")
    monkeypatch.chdir(tmp_path)
    from shed.stages import prepare as stage

    stage.main(load_params("params.yaml"))
    pool, origins = jsonl(artifacts.POOL), jsonl(artifacts.ROWS)
    assert origins == [{"id": r["id"], "source": "embedded", "at": f"item {i + 1}",
                        "row": {k: r[k] for k in ("instruction", "input", "output")}} for i, r in enumerate(pool)]


def test_values_json_cannot_hold_are_kept_as_text(tmp_path, monkeypatch):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    when = datetime.datetime(2024, 5, 1, 12, 30)
    pq.write_table(pa.Table.from_pylist([{"instruction": "Hi", "output": "Hello", "created": when,
                                          "score": 0.25, "tags": ["a", "b"]}]), tmp_path / "pool.parquet")
    prepare(tmp_path, monkeypatch, "pool.parquet")
    assert jsonl(artifacts.ROWS)[0]["row"] == {"instruction": "Hi", "output": "Hello", "created": "2024-05-01T12:30:00",
                                               "score": 0.25, "tags": ["a", "b"]}


# --- sample: data/curated ------------------------------------------------------------------------

def fake_clusters(ws: Path) -> None:
    """Two clusters over the prepared pool and their scores: what sample reads besides the pool."""
    ids = [r["id"] for r in jsonl(ws / artifacts.POOL)]
    (ws / "data/clusters").mkdir(parents=True)
    (ws / artifacts.ASSIGNMENTS).write_text("id,cluster,distance,proxy\n" + "".join(
        f"{i},{n % 2},0.{n:02d},{n < 2}\n" for n, i in enumerate(ids)))
    (ws / artifacts.PROXIES).write_text(f"cluster,proxy_id,size\n0,{ids[0]},1\n1,{ids[1]},1\n")
    (ws / artifacts.DUPLICATES).write_text("id,kept_id,similarity\n")  # cluster.dedup_threshold 0: none
    (ws / "data/shapley").mkdir(parents=True)
    (ws / artifacts.SCORES).write_text("cluster,score\n0,0.9\n1,0.1\n")


def test_the_curated_set_holds_the_chosen_rows_as_given_and_their_ids_and_places(tmp_path, monkeypatch):
    from shed.stages import sample

    write_pool(tmp_path / "dolly.jsonl", DOLLY_FILE)
    prepare(tmp_path, monkeypatch, "dolly.jsonl")
    fake_clusters(tmp_path)
    params = Params()
    params.sample.method, params.sample.subset_size = "qocs", 12
    sample.main(params)
    places = jsonl(artifacts.CURATED_RECORDS)
    by_id = {dolly_id(r): r for r in DOLLY}
    assert len(places) == 12 and jsonl(artifacts.DATASET) == [by_id[p["id"]] for p in places]
    assert [p["id"] for p in places] != [dolly_id(r) for r in DOLLY[:12]]  # selection order, not pool order
    line_of = {o["id"]: o["at"] for o in jsonl(artifacts.ROWS)}
    assert all(p == {"id": p["id"], "source": "dolly.jsonl", "at": line_of[p["id"]]} for p in places)
    assert artifacts.read_curated_ids() == [p["id"] for p in places]
    pool = {r["id"]: r for r in jsonl(artifacts.POOL)}
    assert artifacts.read_curated() == [pool[p["id"]] for p in places]  # what finetune trains on
    manifest = json.loads(Path(artifacts.MANIFEST).read_text())
    assert manifest["sha256"] == hashlib.sha256(Path(artifacts.DATASET).read_bytes()).hexdigest()
    assert manifest["method"] == "qocs" and manifest["size"] == 12
    assert any("☕" in by_id[p["id"]]["context"] for p in places)
    assert "☕" in Path(artifacts.DATASET).read_text(encoding="utf-8")  # ensure_ascii=False


def test_a_curated_id_missing_from_the_prepared_rows_is_one_line(tmp_path, monkeypatch):
    from shed.fileio import ShedError

    write_pool(tmp_path / "dolly.jsonl", DOLLY[:3])
    prepare(tmp_path, monkeypatch, "dolly.jsonl")
    with pytest.raises(ShedError, match=r"data/prepared/rows.jsonl: no line for record 0123456789abcdef \(1 of 2 "
                                        r"missing\); rerun `shed prepare`"):
        artifacts.read_rows([dolly_id(DOLLY[0]), "0123456789abcdef"])


@pytest.mark.slow  # prepare, base, embed, cluster, shapley, sample twice: ~1-2 min on 2 busy cores
def test_a_dolly_pool_keeps_its_fields_from_prepare_to_the_curated_set(tmp_path, monkeypatch, one_thread):
    from shed.cli import main as shed

    write_pool(tmp_path / "dolly.jsonl", DOLLY_FILE)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params = merge(params, {"prepare": {"pool": "dolly.jsonl"}, "cluster": {"C": 4}, "embed": {"max_seq_length": 32},
                            "shapley": {"k": 2, "n": 2, "dev_neighbours": 4}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    for stage in ("prepare", "base", "embed", "cluster", "shapley"):
        assert shed([stage]) == 0, stage
    by_id = {dolly_id(r): r for r in DOLLY}
    line_of = {dolly_id(r): f"line {n}" for n, r in enumerate(DOLLY_FILE, start=1) if r is not DOLLY_BLANK}
    line_of[dolly_id(DOLLY_DUPLICATE)] = "line 5"  # the first of the two is kept
    for method, size in (("full", len(DOLLY)), ("qocs", 6)):
        params["sample"].update(method=method, subset_size=size)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert shed(["sample"]) == 0, method
        places, rows = jsonl(artifacts.CURATED_RECORDS), jsonl(artifacts.DATASET)
        assert len(rows) == size
        assert rows == [by_id[p["id"]] for p in places]  # instruction, context, response, category: as given
        assert all(set(r) == {"instruction", "context", "response", "category"} for r in rows)
        assert [p["at"] for p in places] == [line_of[p["id"]] for p in places]
    assert sorted(map(json.dumps, rows)) != sorted(map(json.dumps, DOLLY))  # qocs chose a part


# --- shed export ----------------------------------------------------------------------------------

SINGLE = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
          {"instruction": "Name a drink.", "input": "", "output": "café ☕"}]
CHAT = {"instruction": "Hi!", "input": "", "output": "Hello. How can I help?",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                     {"role": "assistant", "content": "Hello. How can I help?"},
                     {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]}


def curated(ws: Path, records: list[dict]) -> list[dict]:
    """`records` as the prepared pool (with ids) and all of them, reversed, as the curated set."""
    records = [{"id": record_id(json.dumps(r, sort_keys=True)), **r} for r in records]
    (ws / "data/prepared").mkdir(parents=True, exist_ok=True)
    (ws / "data/curated").mkdir(parents=True, exist_ok=True)
    (ws / artifacts.POOL).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    (ws / artifacts.CURATED_RECORDS).write_text("".join(json.dumps({"id": r["id"]}) + "\n" for r in records[::-1]))
    return records[::-1]


def load(path: Path, cache: Path):
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache))


@pytest.mark.parametrize("fmt, columns", [("alpaca", ["instruction", "input", "output"]),
                                          ("parquet", ["instruction", "input", "output"]),
                                          ("sharegpt", ["conversations"]), ("openai", ["messages"])])
def test_each_export_loads_with_datasets_with_its_columns_and_every_record(tmp_path, monkeypatch, fmt, columns):
    from shed import export

    records = curated(tmp_path, SINGLE)
    monkeypatch.chdir(tmp_path)
    path = export.main(fmt)
    assert path == Path("data/export") / export.FORMATS[fmt]
    data = load(path, tmp_path / "hf-cache")
    assert data.column_names == columns and data.num_rows == len(records)
    if fmt in ("alpaca", "parquet"):
        assert data.to_list() == [{k: r[k] for k in columns} for r in records]
    else:
        turns = data[columns[0]]
        assert turns[0] == ([{"from": "human", "value": "Name a drink."}, {"from": "gpt", "value": "café ☕"}]
                            if fmt == "sharegpt" else
                            [{"role": "user", "content": "Name a drink."}, {"role": "assistant", "content": "café ☕"}])
        assert turns[1][0]["value" if fmt == "sharegpt" else "content"] == "Translate to French.\n\ngood morning"
    info = json.loads((tmp_path / "data/export/dataset_info.json").read_text())
    entry = info[f"shed_curated_{fmt}"]
    assert entry["file_name"] == path.name and entry["formatting"] == ("sharegpt" if fmt == "openai" else
                                                                       "alpaca" if fmt == "parquet" else fmt)
    if fmt in ("sharegpt", "openai"):
        assert entry["columns"] == {"messages": columns[0]}
        assert set(entry["tags"]) == {"role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag"}
    else:
        assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}


@pytest.mark.parametrize("fmt", ["alpaca", "parquet", "sharegpt", "openai"])
def test_a_conversation_keeps_every_turn_in_every_layout(tmp_path, monkeypatch, fmt):
    from shed import export

    records = curated(tmp_path, [*SINGLE[:1], CHAT])
    monkeypatch.chdir(tmp_path)
    data = load(export.main(fmt), tmp_path / "hf-cache").to_list()
    assert len(data) == 2
    if fmt in ("alpaca", "parquet"):
        assert data[0] == {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
                           "history": [["Hi!", "Hello. How can I help?"], ["What is 2+2?", "4"]]}
        assert data[1] == {"instruction": "Add 2 and 3.", "input": "", "output": "5", "system": "", "history": []}
        columns = json.loads(Path("data/export/dataset_info.json").read_text())[f"shed_curated_{fmt}"]["columns"]
        assert columns["system"] == "system" and columns["history"] == "history"
    elif fmt == "openai":
        assert data[0]["messages"] == CHAT["messages"] and records[0]["messages"] == CHAT["messages"]
    else:
        roles = {"system": "system", "user": "human", "assistant": "gpt"}
        assert data[0]["conversations"] == [{"from": roles[t["role"]], "value": t["content"]} for t in CHAT["messages"]]


def test_export_adds_its_entry_to_an_existing_dataset_info_and_writes_into_a_folder(tmp_path, monkeypatch):
    from shed import export

    curated(tmp_path, SINGLE)
    factory = tmp_path / "factory"
    factory.mkdir()
    (factory / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    monkeypatch.chdir(tmp_path)
    assert export.main("sharegpt", str(factory)) == factory / "curated-sharegpt.jsonl"
    assert export.main("alpaca", str(factory / "mine.json")) == factory / "mine.json"
    info = json.loads((factory / "dataset_info.json").read_text())
    assert list(info) == ["alpaca_en_demo", "shed_curated_sharegpt", "shed_curated_alpaca"]
    assert info["shed_curated_alpaca"]["file_name"] == "mine.json"


def test_export_from_the_command_line_and_its_one_line_errors(tmp_path):
    def shed(*args):
        return subprocess.run([sys.executable, "-m", "shed", "export", *args], cwd=tmp_path, capture_output=True,
                              text=True, check=False)

    result = shed("--format", "openai")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("shed export: error: data/curated/records.jsonl: file not found "
                                                      "(run `shed sample` or `dvc repro`)")
    curated(tmp_path, SINGLE)
    result = shed("--format", "parquet", "--out", "x.jsonl")
    assert result.returncode == 1 and "--out x.jsonl: the parquet layout is written as .parquet" in result.stderr
    (tmp_path / "data/export").mkdir()
    (tmp_path / "data/export/dataset_info.json").write_text("[]")
    result = shed("--format", "openai")
    assert result.returncode == 1 and "dataset_info.json: expected a JSON object" in result.stderr
    assert not (tmp_path / "data/export/curated-openai.jsonl").exists()  # nothing written
    (tmp_path / "data/export/dataset_info.json").unlink()
    result = shed("--format", "openai")
    assert result.returncode == 0 and "data/export/curated-openai.jsonl" in result.stderr
    assert len((tmp_path / "data/export/curated-openai.jsonl").read_text().splitlines()) == len(SINGLE)


def test_the_alpaca_layout_refuses_a_conversation_it_cannot_hold(tmp_path, monkeypatch):
    from shed import export
    from shed.fileio import ShedError

    broken = {**CHAT, "messages": CHAT["messages"][:4]}  # ends on a user turn
    curated(tmp_path, [broken])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShedError, match=r"field 'messages': the alpaca layout needs user/assistant exchanges .* "
                                        "export it as sharegpt or openai"):
        export.main("alpaca")
    assert len(load(export.main("openai"), tmp_path / "hf-cache")) == 1

