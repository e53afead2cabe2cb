import json

import pytest
from helpers import fails_reading

from shed.data import content_id, load_rows, normalize_choice_set, normalize_pool, record_id
from shed.fileio import ShedError


def test_record_ids_are_stable_content_hashes():
    assert record_id("a", "", "b") == record_id("a", "", "b")
    assert record_id("a", "", "b") != record_id("a", "b", "")
    assert len(record_id("x")) == 16


def test_alpaca_dolly_and_chat_map_to_one_schema():
    alpaca = normalize_pool([{"instruction": "i", "input": "x", "output": "o"}], "a.json")
    dolly = normalize_pool([{"instruction": "i", "context": "x", "response": "o"}], "d.json")
    chat = normalize_pool([{"messages": [{"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}]}],
                          "c.json")
    assert alpaca[0] == dolly[0] == {"id": record_id("i", "x", "o"), "instruction": "i", "input": "x", "output": "o"}
    assert chat[0]["instruction"] == "i" and chat[0]["output"] == "o"


# --- conversations (chat rows of more than one exchange, or with a system prompt) ---------------------------

SYSTEM, EXCHANGES = "Answer in one word.", [("Name a colour.", "Blue"), ("And another?", "Red"), ("A third?", "Green")]
SHAREGPT_ROW = {"conversations": [{"from": "system", "value": SYSTEM}]
                + [{"from": side, "value": text} for user, reply in EXCHANGES
                   for side, text in (("human", user), ("gpt", reply))]}
OPENAI_ROW = {"messages": [{"role": "system", "content": SYSTEM}]
              + [{"role": role, "content": text} for user, reply in EXCHANGES
                 for role, text in (("user", user), ("assistant", reply))]}
MESSAGES = OPENAI_ROW["messages"]


@pytest.mark.parametrize("row", [SHAREGPT_ROW, OPENAI_ROW], ids=["sharegpt", "openai"])
def test_a_conversation_keeps_every_turn_with_roles_normalised(row):
    [record] = normalize_pool([row], "pool.jsonl")
    assert record == {"id": content_id({"messages": MESSAGES}), "instruction": "Name a colour.", "input": "",
                      "output": "Blue", "messages": MESSAGES}


def test_conversation_ids_hash_every_turn():
    first_exchange = MESSAGES[1:3]
    rows = [{"messages": MESSAGES}, {"messages": MESSAGES[:3]}, {"messages": MESSAGES[1:]},
            {"messages": MESSAGES[:4] + [{"role": "assistant", "content": "Purple"}]},
            {"messages": first_exchange}]
    records = normalize_pool(rows, "pool.jsonl")
    assert len({r["id"] for r in records}) == 5  # all share the first exchange; none collide
    assert all("messages" in r for r in records[:4]) and "messages" not in records[4]
    assert records[4]["id"] == record_id("Name a colour.", "", "Blue")  # one exchange: a single-turn record
    assert normalize_pool([SHAREGPT_ROW], "a.jsonl")[0]["id"] == normalize_pool([OPENAI_ROW], "b.jsonl")[0]["id"]


def test_a_blank_system_prompt_is_no_system_prompt():
    blank = [{"role": "system", "content": "  "}] + MESSAGES[1:3]
    assert normalize_pool([{"messages": blank}], "p.jsonl") == normalize_pool([{"messages": MESSAGES[1:3]}], "p.jsonl")


def test_a_single_exchange_with_a_blank_turn_goes_by_prepare_empty_as_before():
    rows = [{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "o"}]}, OPENAI_ROW]
    assert [r["output"] for r in normalize_pool(rows, "p.jsonl")] == ["Blue"]
    with pytest.raises(ShedError, match="item 1: field 'instruction' is empty"):
        normalize_pool(rows, "p.jsonl", empty="error")


def test_duplicate_conversations_dropped_kept_or_refused():
    assert len(normalize_pool([SHAREGPT_ROW, OPENAI_ROW], "p.jsonl")) == 1
    kept = normalize_pool([SHAREGPT_ROW, OPENAI_ROW], "p.jsonl", duplicates="keep")
    assert kept[0]["id"] != kept[1]["id"] and kept[0]["messages"] == kept[1]["messages"]
    with pytest.raises(ShedError, match="item 2: exact duplicate"):
        normalize_pool([SHAREGPT_ROW, OPENAI_ROW], "p.jsonl", duplicates="error")


def test_a_conversations_text_joins_every_turn_and_its_responses_are_every_reply():
    from shed.records import record_text, responses

    [record] = normalize_pool([OPENAI_ROW], "p.jsonl")
    assert record_text(record) == "\n".join(m["content"] for m in MESSAGES)  # what is embedded, what DSIR reads
    assert record_text(record, ["output"]) == "Blue\nRed\nGreen"
    assert record_text(record, ["instruction", "input"]) == ("Answer in one word.\nName a colour.\nAnd another?\n"
                                                             "A third?")
    assert responses(record) == ["Blue", "Red", "Green"]
    single = {"instruction": "i", "input": "x", "output": "o"}
    assert (record_text(single), record_text(single, ["output"]), responses(single)) == ("i\nx\no", "o", ["o"])


# Single-turn pools prepare exactly as before conversations were kept whole: pool.jsonl's bytes and ids, pinned
# from the code before that change (a blank system prompt was dropped then too; roles in any case).
SINGLE_TURN = {
    "alpaca": ([{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
                {"instruction": "Name a café drink ☕", "input": "", "output": "Crème — au lait"}],
               "acc7d850843c061b9100b003bd8b8e82048c80c69ab138b294bd3b9c3be92eaa",
               ["fd9c872ad578a54f", "72280a2c044b630d", "50dd16cd651f3bc3"]),
    "sharegpt": ([{"id": "c1", "conversations": [{"from": "human", "value": "Add 2 and 3."},
                                                 {"from": "gpt", "value": "5"}]},
                  {"conversations": [{"from": "system", "value": " "}, {"from": "human", "value": "Say hi."},
                                     {"from": "gpt", "value": "Hi ☺"}]}],
                 "3812de559614a5a3760efb106f828c262afcac75265da8b88015d118a8287c51",
                 ["fd9c872ad578a54f", "ef5d6bc5329c9437"]),
    "openai": ([{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]},
                {"messages": [{"role": "User", "content": "Count to 3."}, {"role": "Assistant", "content": "1 2 3"}]}],
               "a5cd229890a1b260263ff6ea0189effc35518142cf78925623e9b23dbfd9e8f4",
               ["7134b072d8631ced", "4e97a3f8de5755f1"]),
}


@pytest.mark.parametrize("layout", sorted(SINGLE_TURN))
def test_single_turn_pools_prepare_to_the_same_bytes_and_ids_as_before(tmp_path, monkeypatch, layout):
    import hashlib

    import yaml

    from shed.config import load_params
    from shed.stages import prepare

    rows, digest, ids = SINGLE_TURN[layout]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"pool": "pool.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    prepare.main(load_params("params.yaml"))
    written = (tmp_path / "data/prepared/pool.jsonl").read_bytes()
    assert [json.loads(line)["id"] for line in written.splitlines()] == ids
    assert hashlib.sha256(written).hexdigest() == digest


def test_duplicates_dropped_kept_or_refused():
    rows = [{"instruction": "i", "output": "o"}, {"instruction": "i", "output": "o"}]
    assert len(normalize_pool(rows, "p.json", duplicates="drop")) == 1
    kept = normalize_pool(rows, "p.json", duplicates="keep")
    assert len(kept) == 2 and kept[0]["id"] != kept[1]["id"]
    with pytest.raises(ShedError, match="item 2: exact duplicate"):
        normalize_pool(rows, "p.json", duplicates="error")


@pytest.mark.parametrize("row,message", [
    ({"instruction": "i"}, "item 1: field 'output' is missing"),
    ({"instruction": None, "output": "o"}, "item 1: field 'instruction' is null"),
    ({"instruction": "i", "output": 3}, "item 1: field 'output' must be a string"),
    ({"instruction": " ", "output": "o"}, "item 1: field 'instruction' is empty"),
])
def test_bad_pool_records_name_record_and_field(row, message):
    with pytest.raises(ShedError, match=message):
        normalize_pool([row], "pool.json", fmt="alpaca", empty="error")


def test_blank_records_are_dropped_by_default():
    rows = [{"instruction": "i", "output": ""}, {"instruction": "j", "output": "o"}]
    assert [r["instruction"] for r in normalize_pool(rows, "p.json")] == ["j"]
    with pytest.raises(ShedError, match="no usable records"):
        normalize_pool(rows[:1], "p.json")


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    fails_reading(tmp_path / "pool.jsonl", '{"instruction": "a", "output": "b"}\n{not json}\n', load_rows,
                  r"pool.jsonl: line 2: not valid JSON")


def test_json_array_in_a_jsonl_named_file_is_read(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-8")
    assert load_rows(str(path)) == [{"instruction": "a", "output": "b"}]


def test_choice_sets_validate_answer_range():
    ok = normalize_choice_set([{"question": "q", "choices": ["a", "b"], "answer": "B"}], "e.jsonl")
    assert ok[0]["answer"] == 1
    with pytest.raises(ShedError, match="item 1: field 'answer' is 4, out of range for 2 choices"):
        normalize_choice_set([{"question": "q", "choices": ["a", "b"], "answer": 4}], "e.jsonl")


def test_jsonl_strings_with_unicode_line_separators_round_trip(tmp_path):
    from shed.fileio import read_jsonl, write_jsonl

    rows = [{"question": "a\u2028b\x85c\u2029d\x1ce", "answer": 0}]
    write_jsonl(tmp_path / "q.jsonl", rows)
    assert read_jsonl(tmp_path / "q.jsonl") == rows


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_every_file_format_gives_the_same_records(tmp_path, suffix):
    import pandas as pd

    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Name a color, please", "input": "warm\nones", "output": "Red"}]
    path = tmp_path / f"pool.{suffix}"
    frame = pd.DataFrame(rows)
    {"json": lambda: path.write_text(json.dumps(rows)),
     "jsonl": lambda: path.write_text("".join(json.dumps(r) + "\n" for r in rows)),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[suffix]()
    records = normalize_pool(load_rows(str(path)), str(path))
    assert [r["id"] for r in records] == [record_id(r["instruction"], r["input"], r["output"]) for r in rows]


def test_detected_schema_is_logged(caplog):
    with caplog.at_level("INFO", logger="shed"):
        normalize_pool([{"instruction": "i", "context": "", "response": "o"}], "d.jsonl")
    assert "prepare.format=auto: detected the dolly schema" in caplog.text


# Positions are 1-based and named by what the user opens: one test per reader.
BAD = {"instruction": "x", "output": 3}


def _pool(path, **kw):
    return normalize_pool(load_rows(path), path, **kw)


def test_jsonl_positions_are_file_lines_counting_blank_ones(tmp_path):
    path = tmp_path / "pool.jsonl"
    fails_reading(path, '\n{"instruction": "a", "output": "b"}\n\n' + json.dumps(BAD) + "\n", _pool,
                  r"pool.jsonl: line 4: field 'output' must be a string, got int")
    assert [load_rows(str(path)).where(i) for i in range(2)] == ["line 2", "line 4"]


def test_json_array_positions_are_items(tmp_path):
    fails_reading(tmp_path / "pool.json", json.dumps([{"instruction": "a", "output": "b"}, BAD], indent=2), _pool,
                  r"pool.json: item 2: field 'output' must be a string, got int")


def test_csv_positions_are_spreadsheet_rows_with_the_header_as_row_1(tmp_path):
    fails_reading(tmp_path / "pool.csv", 'instruction,output\n"two\nlines",b\nc,\n',
                  lambda path: _pool(path, empty="error"), r"pool.csv: row 3: field 'output' is empty")
    fails_reading(tmp_path / "other.csv", "prompt,completion\na,b\n", _pool,
                  r"other.csv: row 1 \(the header\): cannot detect the schema")


def test_parquet_positions_are_rows(tmp_path):
    import pandas as pd

    path = tmp_path / "pool.parquet"
    pd.DataFrame([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]).to_parquet(path)
    with pytest.raises(ShedError, match=r"pool.parquet: row 2: field 'output' is null"):
        _pool(str(path))


def test_rows_built_in_memory_are_items():
    from shed.data import where

    assert where([{}, {}], 1) == "item 2"
    with pytest.raises(ShedError, match=r"mem: item 2: field 'choices'"):
        normalize_choice_set([{"question": "q", "choices": ["a", "b"], "answer": 0},
                              {"question": "r", "choices": "ab", "answer": 0}], "mem")
