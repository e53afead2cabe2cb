"""MMLU CSV / ARC JSONL readers, the dev-set converter, the overlap refusal, and the offline lm-eval tasks."""

import json
from pathlib import Path

import pytest
from helpers import fails_reading

from shed.fileio import ShedError
from shed.mcdata import (
    arc_rows,
    load_choice_set,
    mmlu_rows,
    question_key,
    refuse_overlap,
)
from shed.scoring import TASK_DIR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
ARC = {"id": "x", "question": {"stem": "Pick", "choices": [{"text": t, "label": n} for t, n in
                                                          zip("abcde", "12345")]}, "answerKey": "5"}


def mmlu_tree(root: Path) -> Path:
    for split in ("test", "dev"):
        (root / split).mkdir(parents=True)
        (root / split / f"high_school_physics_{split}.csv").write_text(
            f'"Q1 {split}, with a comma",a,b,c,d,C\n"Q2\nmultiline",e,f,g,h,A\n', encoding="utf-8")
    return root


def test_mmlu_layout_reads_subject_choices_and_answer(tmp_path):
    rows = mmlu_rows(mmlu_tree(tmp_path / "mmlu"))
    assert rows[0] == {"subject": "high_school_physics", "question": "Q1 test, with a comma",
                       "choices": ["a", "b", "c", "d"], "answer": 2}
    assert rows[1]["question"] == "Q2\nmultiline" and len(rows) == 2


def test_arc_keeps_numeric_labels_and_five_choices(tmp_path):
    (tmp_path / "arc.jsonl").write_text(json.dumps(ARC) + "\n")
    row = arc_rows(tmp_path / "arc.jsonl")[0]
    assert row["choices"]["label"] == list("12345") and row["answerKey"] == "5"
    assert load_choice_set(str(tmp_path / "arc.jsonl"))[0]["answer"] == 4


def test_dev_set_from_an_mmlu_split_directory(tmp_path):
    dev = load_choice_set(str(mmlu_tree(tmp_path / "mmlu") / "dev"))
    assert [q["answer"] for q in dev] == [2, 0] and dev[0]["choices"] == ["a", "b", "c", "d"]


def test_overlap_is_refused_whatever_the_spacing_and_order():
    dev = [{"id": "d1", "question": "What  is 2+2?", "choices": ["4", "3"], "answer": 0}]
    with pytest.raises(ShedError, match="1 dev questions also appear in the eval set"):
        refuse_overlap(dev, {question_key("what is 2+2?", ["3", "4"])}, "dev.jsonl", "mmlu")
    refuse_overlap(dev, {question_key("What is 3+3?", ["3", "4"])}, "dev.jsonl", "mmlu")


def lm_eval_config(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path)


@pytest.mark.parametrize("ours,builtin", [
    ("mmlu_local.yaml", "mmlu/default/_default_template_yaml"),
    ("arc_challenge_local.yaml", "arc/arc_easy.yaml"),
])
def test_local_tasks_use_the_builtin_prompt_and_metrics(ours, builtin):
    mine, theirs = lm_eval_config(TASK_DIR / ours), lm_eval_config(LM_EVAL_TASKS / builtin)
    for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "test_split"):
        assert mine[key] == theirs[key], key
    assert callable(mine["custom_dataset"])


def test_mmlu_local_description_matches_every_builtin_subject():
    from lm_eval.utils import apply_template

    template = lm_eval_config(TASK_DIR / "mmlu_local.yaml")["description"]
    subjects = sorted(LM_EVAL_TASKS.glob("mmlu/default/mmlu_*.yaml"))
    assert len(subjects) == 57
    for path in subjects:
        builtin = lm_eval_config(path)
        assert apply_template(template, {"subject": builtin["dataset_name"]}) == builtin["description"]


def test_mmlu_local_prompt_through_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                          metadata={"mmlu_dir": str(mmlu_tree(tmp_path / "mmlu"))})
    task = manager.load(["mmlu_local"])["tasks"]["mmlu_local"]
    doc = task.test_docs()[0]
    assert task.fewshot_context(doc, 0) == ("The following are multiple choice questions (with answers) about high "
                                            "school physics.\n\nQ1 test, with a comma\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert task.doc_to_target(doc) == 2


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared real data not present")
def test_real_files_parse_with_official_counts():
    assert len(mmlu_rows(SHARED / "mmlu", "test")) == 14042
    assert len(load_choice_set(str(SHARED / "mmlu" / "val"))) > 1500
    arc = arc_rows(SHARED / "arc/ARC-Challenge/ARC-Challenge-Test.jsonl")
    assert len(arc) == 1172 and sum(r["answerKey"].isdigit() for r in arc) == 22
    assert {len(r["choices"]["text"]) for r in arc} >= {3, 4, 5}


def test_dev_set_may_be_a_json_array_in_a_jsonl_named_file(tmp_path):
    (tmp_path / "dev.jsonl").write_text(json.dumps([{"question": "q", "choices": ["a", "b"], "answer": "B"}]))
    assert load_choice_set(str(tmp_path / "dev.jsonl"))[0]["answer"] == 1


def test_dev_exclude_drops_questions_of_the_eval_files(tmp_path):
    from shed.config import Params
    from shed.stages.prepare import build

    root = mmlu_tree(tmp_path / "mmlu")
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [
        {"question": "Q1 test,  with a comma", "choices": ["d", "c", "b", "a"], "answer": 0},
        {"question": "Fresh question", "choices": ["x", "y"], "answer": 1}]))
    params = Params()
    params.prepare.dev, params.prepare.dev_exclude = str(tmp_path / "dev.jsonl"), [str(root)]
    assert [q["question"] for q in build(params)["dev"]] == ["Fresh question"]


def test_mmlu_csv_positions_are_rows_even_when_a_field_spans_lines(tmp_path):
    fails_reading(tmp_path / "x_test.csv", '"Two\nlines",a,b,c,d,A\n"Q",a,b,c,d,Z\n', load_choice_set,
                  r"x_test.csv: row 2: field 'answer' is 'Z'")


def test_arc_positions_are_jsonl_lines_counting_blank_ones(tmp_path):
    fails_reading(tmp_path / "arc.jsonl", json.dumps(ARC) + "\n\n" + json.dumps({**ARC, "answerKey": "9"}) + "\n",
                  load_choice_set, r"arc.jsonl: line 3: field 'answerKey' is '9'")


def test_our_choice_jsonl_positions_are_lines(tmp_path):
    rows = [{"question": "q", "choices": ["a", "b"], "answer": 0},
            {"question": "r", "choices": ["a", "b"], "answer": 2}]
    fails_reading(tmp_path / "dev.jsonl", "".join(json.dumps(r) + "\n" for r in rows), load_choice_set,
                  r"dev.jsonl: line 2: field 'answer' is 2, out of range")
