"""Malformed input, through the CLI as users run it: one error line naming file, record and field,
exit 1, no partial output, and earlier outputs left byte for byte as they were."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Name a color.", "input": "", "output": "Blue"}]
MC = [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}]
ARC_OK = {"id": "q1", "question": {"stem": "Which?", "choices": [{"text": "a", "label": "1"},
                                                                  {"text": "b", "label": "2"}]}, "answerKey": "2"}


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def embeddings(tmp_path, n=4):
    (tmp_path / "data/embed").mkdir(parents=True)
    np.save(tmp_path / "data/embed/embeddings.npy", np.eye(n, 8, dtype=np.float32))
    (tmp_path / "data/embed/ids.txt").write_text("".join(f"{i:016x}\n" for i in range(n)))


def sample_inputs(tmp_path):
    pool = [{"id": f"{i:016x}", "instruction": f"i{i}", "input": "", "output": "o"} for i in range(4)]
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/pool.jsonl").write_text(jsonl(pool))
    (tmp_path / "data/clusters").mkdir(parents=True)
    (tmp_path / "data/clusters/assignments.csv").write_text(
        "id,cluster,distance,proxy\n" + "".join(f"{i:016x},{i % 2},0.1,{i < 2}\n" for i in range(4)))
    (tmp_path / "data/clusters/proxies.csv").write_text("cluster,proxy_id,size\n0,0000000000000000,2\n1,0000000000000001,2\n")
    (tmp_path / "data/clusters/duplicates.csv").write_text("id,kept_id,similarity\n")
    (tmp_path / "data/shapley").mkdir(parents=True)
    (tmp_path / "data/shapley/scores.csv").write_text("cluster,score\n0,0.1\n1,0.2\n")


def mmlu_dev(tmp_path):
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/dev.jsonl").write_text(jsonl([{"id": "d0", "question": "What is 1+1?",
                                                              "choices": ["1", "2", "3", "4"], "answer": 1}]))


def records_dev(tmp_path):
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/dev.jsonl").write_text(jsonl([{"id": "d0", **ALPACA[0]}]))


CHAT_OK = [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]


def chat_pool(*turns):
    """A ShareGPT pool: a good conversation on line 1, then one of these (from, value) turns on line 2."""
    return jsonl([{"conversations": CHAT_OK}, {"conversations": [{"from": f, "value": v} for f, v in turns]}])


def pool(name, content):
    return {name: content}, f"prepare:\n  pool: {name}\n"


def mc_file(name, content, key="eval"):
    return {"pool.json": json.dumps(ALPACA), name: content}, f"prepare:\n  pool: pool.json\n  {key}: {name}\n"


MMLU_OK = '"What is 1+1?",1,2,3,4,B\n'


def parquet(rows) -> bytes:
    import io

    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    return buffer.getvalue()


# id: (stage, files, params, setup, expected text in the one error line)
CASES = {
    "empty_file": ("prepare", *pool("pool.jsonl", ""), None, "pool.jsonl: empty file"),
    "line_not_json": ("prepare", *pool("pool.jsonl", jsonl(ALPACA) + "{oops\n"), None,
                      "pool.jsonl: line 3: not valid JSON"),
    "truncated_json_array": ("prepare", *pool("pool.json", json.dumps(ALPACA)[:-5]), None,
                             "pool.json: line 1: not valid JSON"),
    "array_item_not_object": ("prepare", *pool("pool.json", '[{"instruction": "a", "output": "b"}, 7]'), None,
                              "pool.json: item 2: expected a JSON object, got int"),
    "missing_field": ("prepare", *pool("pool.jsonl", jsonl([ALPACA[0], {"instruction": "x"}])), None,
                      "pool.jsonl: line 2: field 'output' is missing"),
    "null_field": ("prepare", *pool("pool.json", json.dumps([{"instruction": None, "output": "o"}])), None,
                   "pool.json: item 1: field 'instruction' is null"),
    "wrong_type": ("prepare", *pool("pool.jsonl", jsonl([ALPACA[0], {"instruction": "x", "output": 3}])), None,
                   "pool.jsonl: line 2: field 'output' must be a string, got int"),
    "not_utf8": ("prepare", *pool("pool.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n'), None,
                 "pool.jsonl: line 1: not UTF-8 (byte 0xe9"),
    "csv_wrong_header": ("prepare", *pool("pool.csv", "prompt,completion\na,b\n"), None,
                         "pool.csv: row 1 (the header): cannot detect the schema from fields ['completion', 'prompt']"),
    "csv_header_for_other_format": ("prepare", {"pool.csv": "instruction,output\na,b\n"},
                                    "prepare:\n  pool: pool.csv\n  format: dolly\n", None,
                                    "pool.csv: row 2: field 'response' is missing"),
    "corrupt_parquet": ("prepare", *pool("pool.parquet", b"PAR1 not really"), None,
                        "pool.parquet: not a readable Parquet file"),
    "unsupported_suffix": ("prepare", *pool("pool.xml", "<a/>"), None, "pool.xml: unsupported file type '.xml'"),
    "pool_not_found": ("prepare", {}, "prepare:\n  pool: nowhere.jsonl\n", None, "nowhere.jsonl: file not found"),
    "chat_without_assistant": ("prepare", *pool("pool.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}])),
                               None, "pool.jsonl: line 1: field 'messages' has no user turn followed by an assistant"),
    # A conversation that cannot be trained on (shed.data._conversation), on line 2 after a good one.
    "chat_roles_out_of_order": ("prepare", *pool("pool.jsonl", chat_pool(("human", "a"), ("human", "b"), ("gpt", "c"))),
                                None, "pool.jsonl: line 2: field conversations[1]: role 'human' out of order: expected "
                                      "an assistant turn after the user turn at conversations[0]"),
    "chat_system_not_first": ("prepare", *pool("pool.jsonl", chat_pool(("human", "a"), ("gpt", "b"), ("system", "s"),
                                                                       ("gpt", "c"))),
                              None, "pool.jsonl: line 2: field conversations[2]: role 'system' out of order: expected "
                                    "a user turn after the assistant turn at conversations[1]"),
    "chat_starts_with_assistant": ("prepare", *pool("pool.jsonl", chat_pool(("gpt", "a"), ("human", "b"), ("gpt", "c"))),
                                   None, "pool.jsonl: line 2: field conversations[0]: role 'gpt' out of order: expected "
                                         "a system or user turn first"),
    "chat_ends_with_a_user_turn": ("prepare", *pool("pool.jsonl", chat_pool(("human", "a"), ("gpt", "b"), ("human", "c"))),
                                   None, "pool.jsonl: line 2: field conversations[2]: the conversation ends with a user "
                                         "turn (expected an assistant reply after it)"),
    "chat_no_assistant_turn": ("prepare", *pool("pool.jsonl", chat_pool(("system", "s"), ("human", "a"))), None,
                               "pool.jsonl: line 2: field 'conversations' has no user turn followed by an assistant turn"),
    "chat_empty_content": ("prepare", *pool("pool.jsonl", chat_pool(("human", "a"), ("gpt", "b"), ("human", ""),
                                                                    ("gpt", "d"))),
                           None, "pool.jsonl: line 2: field conversations[2]: content is empty"),
    "chat_blank_content": ("prepare", *pool("pool.jsonl", chat_pool(("system", "s"), ("human", "a"), ("gpt", " \n"))),
                           None, "pool.jsonl: line 2: field conversations[2]: content is blank (only whitespace)"),
    "chat_unknown_role": ("prepare", *pool("pool.jsonl", chat_pool(("human", "a"), ("tool", "b"), ("gpt", "c"))), None,
                          "pool.jsonl: line 2: field conversations[1]: unknown role 'tool' (expected system, user/human "
                          "or assistant/gpt/bot/model)"),
    "chat_turn_not_an_object": ("prepare", *pool("pool.jsonl", jsonl([{"conversations": CHAT_OK},
                                                                      {"conversations": [CHAT_OK[0], "gpt: b"]}])),
                                None, "pool.jsonl: line 2: field conversations[1] must be an object, got str"),
    "duplicate_refused": ("prepare", {"pool.json": json.dumps(ALPACA + ALPACA[:1])},
                          "prepare:\n  pool: pool.json\n  duplicates: error\n", None,
                          "pool.json: item 3: exact duplicate"),
    "eval_answer_out_of_range": ("prepare", *mc_file("eval.jsonl", jsonl([{**MC[0], "answer": 5}])), None,
                                 "eval.jsonl: line 1: field 'answer' is 5, out of range for 2 choices"),
    "eval_choices_not_list": ("prepare", *mc_file("eval.jsonl", jsonl([{**MC[0], "choices": "4"}])), None,
                              "eval.jsonl: line 1: field 'choices' must be a list"),
    "mmlu_csv_bad_answer": ("prepare", *mc_file("dev.csv", MMLU_OK + '"Q?",1,2,3,4,E\n', key="dev"), None,
                            "dev.csv: row 2: field 'answer' is 'E', expected one of A, B, C, D"),
    "mmlu_csv_wrong_columns": ("prepare", *mc_file("dev.csv", "question,A,B,C,D\n", key="dev"), None,
                               "dev.csv: row 1: expected 6 columns"),
    "arc_answer_not_a_label": ("prepare", *mc_file("arc.jsonl", jsonl([ARC_OK, {**ARC_OK, "answerKey": "E"}])), None,
                               "arc.jsonl: line 2: field 'answerKey' is 'E', not one of the labels ['1', '2']"),
    "dev_eval_overlap": ("prepare", {"pool.json": json.dumps(ALPACA), "dev.jsonl": jsonl(MC), "eval.jsonl": jsonl(MC)},
                         "prepare:\n  pool: pool.json\n  dev: dev.jsonl\n  eval: eval.jsonl\n", None,
                         "dev.jsonl: 1 dev questions also appear in the eval set eval.jsonl"),
    # A dev set of instruction records (prepare.dev in a pool layout).
    "dev_record_in_pool": ("prepare", *mc_file("dev.jsonl", jsonl([{"instruction": "Add 1 and 1.", "output": "2"},
                                                                   ALPACA[1]]), key="dev"), None,
                           "dev.jsonl: line 2: dev record 6dbb61bc278daad0 is also in the pool pool.json"),
    "dev_record_blank_output": ("prepare", *mc_file("dev.jsonl", jsonl([{"instruction": "Add 1 and 1.", "output": " "}]),
                                                    key="dev"), None, "dev.jsonl: line 1: field 'output' is empty"),
    "dev_record_missing_output": ("prepare", *mc_file("dev.json", json.dumps([{"instruction": "a", "output": "b"},
                                                                               {"instruction": "c"}]), key="dev"), None,
                                  "dev.json: item 2: field 'output' is missing"),
    "dev_records_with_dev_exclude": ("prepare", {"pool.json": json.dumps(ALPACA), "dev.jsonl": jsonl([{"instruction": "a",
                                                                                                      "output": "b"}])},
                                     "prepare:\n  pool: pool.json\n  dev: dev.jsonl\n  dev_exclude: [mmlu]\n", None,
                                     "params.yaml: prepare.dev_exclude: removes multiple-choice questions"),
    "dev_records_with_a_choice_value": ("shapley", {}, "shapley:\n  value: accuracy\n  dev_neighbours: 0\n", records_dev,
                                        "params.yaml: shapley.value: accuracy scores the answer choices of multiple-choice "
                                        "questions, and the dev set (prepare.dev) holds instruction records"),
    "C_larger_than_pool": ("cluster", {}, "cluster:\n  C: 10\nshapley:\n  n: 2\n", embeddings,
                           "params.yaml: cluster.C: 10 clusters asked for, but the pool has only 4 records"),
    "n_below_one": ("cluster", {}, "shapley:\n  n: 0\n", None, "params.yaml: shapley.n: must be at least 1, got 0"),
    "n_larger_than_C": ("cluster", {}, "cluster:\n  C: 5\nshapley:\n  n: 9\n", None,
                        "params.yaml: shapley.n: must not exceed cluster.C=5, got 9"),
    "sample_size_larger_than_pool": ("sample", {}, "sample:\n  subset_size: 50\n", sample_inputs,
                                     "sample.subset_size: 50 records asked for, but the pool has only 4"),
    "sample_size_not_positive": ("sample", {}, "sample:\n  subset_size: 0\n", sample_inputs,
                                 "params.yaml: sample.subset_size: must be positive"),
    "unknown_sampler": ("sample", {}, "sample:\n  method: best\n", sample_inputs,
                        "params.yaml: sample.method: unknown value 'best'"),
    "unknown_template": ("finetune", {}, "train:\n  template: pirate\n", None,
                         "params.yaml: train.template: unknown value 'pirate'"),
    "wrong_param_type": ("cluster", {}, "cluster:\n  C: ten\n", None, "params.yaml: cluster.C: expected an integer"),
    "model_path_missing": ("evaluate", {}, "finetune:\n  model: ./no_such_model\n", None,
                           "./no_such_model: model path does not exist"),
    "gguf_file_missing": ("evaluate", {}, "finetune:\n  model: models/none.gguf\n", None,
                          "models/none.gguf: model file not found"),
    "eval_mmlu_answer_out_of_range": ("evaluate", {"mmlu/test/x_test.csv": MMLU_OK + '"Q?",1,2,3,4,F\n'},
                                      "evaluate:\n  tasks: [mmlu_local]\n  mmlu_dir: mmlu\n", None,
                                      "x_test.csv: row 2: field 'answer' is 'F'"),
    "eval_arc_missing_stem": ("evaluate", {"arc.jsonl": jsonl([ARC_OK, {**ARC_OK, "question": {"choices": []}}])},
                              "evaluate:\n  tasks: [arc_challenge_local]\n  arc_file: arc.jsonl\n", None,
                              "arc.jsonl: line 2: field 'question.stem' is missing"),
    "eval_overlaps_dev": ("evaluate", {"mmlu/test/x_test.csv": MMLU_OK},
                          "evaluate:\n  tasks: [mmlu_local]\n  mmlu_dir: mmlu\n", mmlu_dev,
                          "data/prepared/dev.jsonl: 1 dev questions also appear in the eval set mmlu"),
    # One case per reader: the position counts what the user sees (blank lines, the CSV header, rows that span lines).
    "reader_jsonl_counts_blank_lines": ("prepare", *pool("pool.jsonl", jsonl(ALPACA[:1]) + "\n\n" + jsonl([{"instruction": "x", "output": 3}])),
                                        None, "pool.jsonl: line 4: field 'output' must be a string, got int"),
    "reader_json_array_items": ("prepare", *pool("pool.json", json.dumps([ALPACA[0], {"instruction": "x"}])), None,
                                "pool.json: item 2: field 'output' is missing"),
    "reader_csv_rows_count_the_header": ("prepare", {"pool.csv": "instruction,output\na,b\n\"multi\nline\",\nc,d\n"},
                                         "prepare:\n  pool: pool.csv\n  empty: error\n", None,
                                         "pool.csv: row 3: field 'output' is empty (prepare.empty=error)"),
    "reader_parquet_rows": ("prepare", *pool("pool.parquet", parquet([ALPACA[0], {**ALPACA[1], "output": None}])), None,
                            "pool.parquet: row 2: field 'output' is null"),
    "reader_mmlu_csv_rows_not_lines": ("prepare", *mc_file("dev.csv", '"Two\nlines?",1,2,3,4,B\n"Q?",1,2,3,4,E\n', key="dev"),
                                       None, "dev.csv: row 2: field 'answer' is 'E'"),
    "reader_arc_jsonl_counts_blank_lines": ("prepare", *mc_file("arc.jsonl", jsonl([ARC_OK]) + "\n" + jsonl([{**ARC_OK, "answerKey": "E"}])),
                                            None, "arc.jsonl: line 3: field 'answerKey' is 'E'"),
    "hub_dataset_offline": ("prepare", {}, "prepare:\n  pool: hf:nobody/no-such-dataset\n", None,
                            "hf:nobody/no-such-dataset: could not load split 'train' from the hub"),
    "eval_mmlu_dir_unset": ("evaluate", {}, "evaluate:\n  tasks: [mmlu_local]\n", None,
                            "params.yaml: evaluate.mmlu_dir: needed by task mmlu_local"),
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(tmp_path, case):
    stage, files, params, setup, expected = CASES[case]
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
    if setup:
        setup(tmp_path)
    # Earlier outputs of every stage: they must survive the failed run untouched.
    for earlier in ("data/prepared/eval.jsonl", "data/clusters/keep.csv", "data/curated/dataset.jsonl",
                    "metrics/prepare.json", "metrics/cluster.json", "metrics/sample.json", "metrics/eval.json"):
        path = tmp_path / earlier
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"earlier {earlier}\n")
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, "-m", "shed", stage], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"shed {stage}: error: "), result.stderr[-2000:]
    assert expected in errors[0]
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before  # no partial output, no temporary leftovers, nothing overwritten
