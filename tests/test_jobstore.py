"""The Shapley job store: what it keeps, what it reuses, and what it survives."""

import json

from shed.config import TrainConfig
from shed.jobstore import JobStore, job_context, subset_key


def test_jobs_survive_a_reopen_and_keep_their_per_question_scores(tmp_path):
    path = tmp_path / "jobs.jsonl"
    with JobStore(path, "ctx") as store:
        store.put("a", 0.5, [0.1, 0.9], size=1)
        store.put("b", -1.0)
    reopened = JobStore(path, "ctx")
    reopened.close()
    assert reopened.values == {"a": 0.5, "b": -1.0}
    assert reopened.questions == {"a": [0.1, 0.9]}
    assert reopened.has("a", questions=True) and reopened.has("b") and not reopened.has("b", questions=True)
    assert not reopened.has("c")
    assert json.loads(path.read_text().splitlines()[0]) == {"context": "ctx", "key": "a", "value": 0.5,
                                                            "questions": [0.1, 0.9], "size": 1}


def test_jobs_of_another_context_are_kept_but_never_reused(tmp_path):
    path = tmp_path / "jobs.jsonl"
    with JobStore(path, "old") as store:
        store.put("a", 1.0)
    with JobStore(path, "new") as store:
        assert store.values == {} and store.other_contexts == 1
        store.put("a", 2.0)
    assert JobStore(path, "old").values == {"a": 1.0}
    assert JobStore(path, "new").values == {"a": 2.0}


def test_a_line_cut_by_a_crash_is_skipped_and_later_jobs_still_append(tmp_path):
    path = tmp_path / "jobs.jsonl"
    with JobStore(path, "ctx") as store:
        store.put("a", 1.0)
    with path.open("a") as fh:
        fh.write('{"context": "ctx", "key": "b", "val')  # killed mid-write
    with JobStore(path, "ctx") as store:
        assert store.values == {"a": 1.0}
        store.put("c", 3.0)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "c"]
    assert JobStore(path, "ctx").values == {"a": 1.0, "c": 3.0}


def test_subset_keys_ignore_order_and_differ_by_content():
    assert subset_key(["b", "a"]) == subset_key(["a", "b"])
    assert subset_key(["a"]) != subset_key(["a", "b"]) != subset_key([])


def test_context_changes_with_everything_that_decides_a_value(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0" * 10)
    base = dict(model=str(model), train=TrainConfig(), value="loglik", dev_ids=["q1", "q2"], code="c1")
    ref = job_context(**base)
    assert job_context(**base) == ref
    changed = [dict(base, train=TrainConfig(lr=0.1)), dict(base, value="choice_logprob"),
               dict(base, dev_ids=["q1"]), dict(base, code="c2")]
    assert all(job_context(**c) != ref for c in changed)
    (model / "weights.bin").write_bytes(b"\1" * 10)
    assert job_context(**base) != ref
