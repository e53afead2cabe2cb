"""benchmarks/real_quality.py: the harm-planting protocol, the metrics, and one small end-to-end run."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, STAGE_ENV, run_stage, write_stage_params

sys.path.insert(0, str(ROOT / "benchmarks"))
import real_quality as rq  # noqa: E402

needs_alpaca = pytest.mark.skipif(not rq.ALPACA.is_file(), reason=f"shared data file {rq.ALPACA} is absent")
needs_mmlu = pytest.mark.skipif(not (rq.MMLU / "val").is_dir(), reason=f"shared data folder {rq.MMLU} is absent")


@pytest.fixture(scope="module")
def alpaca():
    return json.loads(rq.ALPACA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def concentrated(alpaca):
    return rq.plant(alpaca, "concentrated", seed=1)


@pytest.fixture(scope="module")
def scattered(alpaca):
    return rq.plant(alpaca, "scattered", seed=1)


# --- the planting protocol ---

@needs_alpaca
def test_sources_have_equal_shares(concentrated):
    _, truth = concentrated
    assert len(truth) == 1000
    assert Counter(t["source"] for t in truth) == {s: 200 for s in rq.SOURCES}


@needs_alpaca
def test_concentrated_plants_one_mostly_corrupted_bad_source(concentrated):
    _, truth = concentrated
    bad = {t["source"] for t in truth if t["bad_source"]}
    assert len(bad) == 1 and "plain" not in bad
    for source in rq.SOURCES:
        corrupted = sum(t["corrupted"] for t in truth if t["source"] == source)
        assert corrupted == (round(0.85 * 200) if source in bad else round(0.02 * 200)), source
    assert sum(t["corrupted"] for t in truth) == 170 + 4 * 4


@needs_alpaca
def test_several_bad_sources_and_other_rates(alpaca):
    _, truth = rq.plant(alpaca, "concentrated", seed=2, pool_size=500, dev_size=20, bad_sources=2, bad_rate=0.9,
                        background_rate=0.0)
    bad = {t["source"] for t in truth if t["bad_source"]}
    assert len(bad) == 2 and "plain" not in bad
    assert not any(t["corrupted"] for t in truth if t["source"] not in bad)
    assert {s: sum(t["corrupted"] for t in truth if t["source"] == s) for s in bad} == {s: 90 for s in bad}


@needs_alpaca
def test_scattered_corrupts_exactly_the_rate_with_no_bad_source(scattered):
    _, truth = scattered
    assert sum(t["corrupted"] for t in truth) == 200
    assert not any(t["bad_source"] for t in truth)
    per_source = Counter(t["source"] for t in truth if t["corrupted"])
    assert set(per_source) == set(rq.SOURCES) and max(per_source.values()) < 80  # spread, not concentrated


@needs_alpaca
def test_every_corruption_kind_is_planted_and_only_those_asked_for(alpaca, concentrated):
    _, truth = concentrated
    kinds = Counter(t["kind"] for t in truth if t["corrupted"])
    assert set(kinds) == set(rq.KINDS) and min(kinds.values()) >= 20
    assert all(t["kind"] == "" for t in truth if not t["corrupted"])
    _, only = rq.plant(alpaca, "scattered", seed=1, pool_size=300, dev_size=20, kinds=("shuffled", "refusal"))
    assert {t["kind"] for t in only if t["corrupted"]} == {"shuffled", "refusal"}
    assert sum(t["corrupted"] for t in only) == 60


def test_corruptions_do_what_they_say():
    rng = np.random.default_rng(0)
    response = "The cat sat on the mat and looked at the dog."
    words = response.split()
    assert rq.corrupt(rng, "mismatched", response, [response, "Paris."]) == "Paris."
    truncated = rq.corrupt(rng, "truncated", response, [])
    assert response.startswith(truncated) and 1 <= len(truncated.split()) < len(words)
    shuffled = rq.corrupt(rng, "shuffled", response, [])
    assert shuffled != response and sorted(shuffled.split()) == sorted(words)
    assert rq.corrupt(rng, "refusal", response, []) in rq.REFUSALS
    assert rq.applicable_kinds("No", rq.KINDS) == ["mismatched", "refusal"]
    assert rq.applicable_kinds("ha ha ha ha", rq.KINDS) == ["mismatched", "truncated", "refusal"]


@needs_alpaca
def test_mismatched_responses_come_from_other_pool_records(alpaca, concentrated):
    pool, truth = concentrated
    base, dev = rq.split(alpaca, 1, 1000, 32)
    base_outputs = {r["output"] for r in base}
    dev_outputs = {r["output"] for r in dev} - base_outputs
    plain = [(p, t) for p, t in zip(pool, truth) if t["kind"] == "mismatched" and t["source"] == "plain"]
    assert plain
    for record, t in plain:  # a plain record is unwrapped: its response is another pool record's, whole
        own = alpaca[t["alpaca_index"]]["output"]
        assert record["output"] in base_outputs and record["output"] != own and record["output"] not in dev_outputs


@needs_alpaca
def test_dev_records_are_held_out_and_plain(alpaca, concentrated, scattered):
    dev = rq.dev_records(alpaca, 1, 1000, 32)
    assert len(dev) == 32 and all(set(r) == {"instruction", "input", "output"} for r in dev)
    base, held = rq.split(alpaca, 1, 1000, 32)
    assert not {r["alpaca_index"] for r in base} & {r["alpaca_index"] for r in held}
    prompts = {(r["instruction"], r["input"]) for r in dev}
    assert not prompts & {(r["instruction"], r["input"]) for r in base}  # no dev prompt is a pool prompt
    from shed.data import record_id

    dev_ids = {record_id(r["instruction"], r["input"], r["output"]) for r in dev}
    for _, truth in (concentrated, scattered):
        assert not dev_ids & {t["id"] for t in truth}
        assert not {t["alpaca_index"] for t in truth} & {r["alpaca_index"] for r in held}


@needs_alpaca
def test_truth_ids_are_the_ids_prepare_gives(tmp_path, concentrated):
    from shed.stages.prepare import pool_records

    pool, truth = concentrated
    rq.write_jsonl(tmp_path / "pool.jsonl", pool)
    prepared = list(pool_records(str(tmp_path / "pool.jsonl"), duplicates="error", empty="error"))
    assert [r["id"] for r in prepared] == [t["id"] for t in truth]
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in prepared] == pool


@needs_alpaca
def test_planting_is_deterministic_by_seed_and_differs_across_seeds(alpaca, concentrated):
    assert rq.plant(alpaca, "concentrated", seed=1) == concentrated
    other_pool, other_truth = rq.plant(alpaca, "concentrated", seed=2)
    assert other_pool != concentrated[0]
    assert {t["alpaca_index"] for t in other_truth} != {t["alpaca_index"] for t in concentrated[1]}
    assert rq.dev_records(alpaca, 1, 1000, 32) != rq.dev_records(alpaca, 2, 1000, 32)


@needs_alpaca
def test_clean_records_read_the_same_in_both_protocols(concentrated, scattered):
    (pool_c, truth_c), (pool_s, truth_s) = concentrated, scattered
    assert [t["alpaca_index"] for t in truth_c] == [t["alpaca_index"] for t in truth_s]
    assert [t["source"] for t in truth_c] == [t["source"] for t in truth_s]
    both_clean = [i for i, (a, b) in enumerate(zip(truth_c, truth_s)) if not a["corrupted"] and not b["corrupted"]]
    assert len(both_clean) > 600 and all(pool_c[i] == pool_s[i] for i in both_clean)


@needs_alpaca
def test_each_styled_source_varies_its_packaging(alpaca, concentrated):
    pool, truth = concentrated
    for source in set(rq.SOURCES) - {"plain"}:
        records = [p for p, t in zip(pool, truth) if t["source"] == source and not t["corrupted"]]
        assert len({r["instruction"][:12] for r in records}) >= 3, source  # several openings, not one marker
        assert len({r["output"][-25:] for r in records}) >= 3, source
    for record, t in zip(pool, truth):
        if t["source"] == "plain" and not t["corrupted"]:  # plain keeps Alpaca's text
            assert record == {k: alpaca[t["alpaca_index"]][k] for k in ("instruction", "input", "output")}


@needs_alpaca
def test_plant_refuses_what_it_cannot_plant(alpaca):
    with pytest.raises(ValueError, match="protocol"):
        rq.plant(alpaca, "sprinkled", seed=1)
    with pytest.raises(ValueError, match="kinds"):
        rq.plant(alpaca, "scattered", seed=1, kinds=("typos",))
    with pytest.raises(ValueError, match="bad_sources"):
        rq.plant(alpaca, "concentrated", seed=1, bad_sources=5)
    with pytest.raises(ValueError, match="usable Alpaca records"):
        rq.plant(alpaca, "scattered", seed=1, pool_size=5000)


@needs_mmlu
def test_mmlu_dev_is_seeded_and_never_an_mmlu_test_question():
    from shed.mcdata import mmlu_rows, question_key

    dev = rq.mmlu_dev(1, 40)
    assert len(dev) == 40 and all(set(q) == {"question", "choices", "answer"} for q in dev)
    test = {question_key(r["question"], r["choices"]) for r in mmlu_rows(rq.MMLU, split="test")}
    assert not any(question_key(q["question"], q["choices"]) in test for q in dev)
    assert dev == rq.mmlu_dev(1, 40) and dev != rq.mmlu_dev(2, 40)


# --- the metrics, on hand-made inputs ---

CLUSTER_OF = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2}
HARMFUL = {"a", "b", "c"}  # cluster 0 all harmful, cluster 1 half (not "mostly"), cluster 2 clean


def test_cluster_auroc_flags_mostly_harmful_clusters_by_low_scores():
    assert rq.cluster_shares(CLUSTER_OF, HARMFUL) == {0: 1.0, 1: 0.5, 2: 0.0}
    assert rq.cluster_auroc({0: -1.0, 1: 0.5, 2: 0.2}, CLUSTER_OF, HARMFUL) == 1.0
    assert rq.cluster_auroc({0: 0.9, 1: 0.5, 2: 0.2}, CLUSTER_OF, HARMFUL) == 0.0
    assert rq.cluster_auroc({0: 0.3, 1: 0.5, 2: 0.2}, CLUSTER_OF, HARMFUL) == 0.5
    assert np.isnan(rq.cluster_auroc({0: 1.0, 1: 0.5, 2: 0.2}, CLUSTER_OF, {"c"}))  # no cluster is mostly harmful


def test_record_auroc_gives_each_record_its_clusters_score():
    # Harmful a, b score -1 and c 0.5; clean d 0.5, e and f 0.2. Of the 9 (harmful, clean) pairs, a and b
    # score lower than every clean record (6), c ties d (0.5) and scores above e and f (0): 6.5 / 9.
    assert rq.record_auroc({0: -1.0, 1: 0.5, 2: 0.2}, CLUSTER_OF, HARMFUL) == pytest.approx(6.5 / 9)
    assert np.isnan(rq.record_auroc({0: 0.0, 1: 0.0, 2: 0.0}, CLUSTER_OF, set()))


def test_harm_in_bad_clusters_and_harmful_share():
    assert rq.harm_in_bad_clusters(CLUSTER_OF, HARMFUL) == pytest.approx(2 / 3)
    assert rq.harm_in_bad_clusters(CLUSTER_OF, set()) == 0.0
    assert rq.harmful_share(["a", "c", "e", "f"], HARMFUL) == 0.5
    assert rq.harmful_share(["e"], HARMFUL) == 0.0
    assert np.isnan(rq.harmful_share([], HARMFUL))


def test_proxy_reading_ranks_each_kind_and_flags_low_scored_corrupted_proxies():
    scores = {"p1": 0.4, "p2": -0.3, "p3": 0.1, "p4": 0.9}
    kinds = {"p1": "", "p2": "refusal", "p3": "shuffled", "p4": ""}
    auroc, rank = rq.proxy_reading(scores, kinds)
    assert auroc == pytest.approx(1.0)  # both corrupted proxies score below both clean ones
    assert rank == pytest.approx({"clean": (3 / 4 + 4 / 4) / 2, "refusal": 1 / 4, "shuffled": 2 / 4})
    auroc, _ = rq.proxy_reading({"p1": -1.0, "p2": 1.0, "p3": 0.5, "p4": 0.0}, kinds)
    assert auroc == pytest.approx(0.0)


def test_stats_skip_nan_and_keep_per_seed_values():
    assert rq.stats([0.5, 0.7]) == {"mean": 0.6, "std": 0.1, "values": [0.5, 0.7]}
    assert rq.stats([0.5, float("nan")]) == {"mean": 0.5, "std": 0.0, "values": [0.5, None]}


# --- end to end, tiny model ---

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    ws = tmp_path_factory.mktemp("real-quality-base")
    write_stage_params(ws)
    run_stage(ws, "base")
    return ws / "models/base"


@pytest.mark.slow
@needs_alpaca
@needs_mmlu
def test_end_to_end_tiny_run_prints_one_json_line_with_every_figure(tmp_path, tiny_base):
    cmd = [sys.executable, str(ROOT / "benchmarks/real_quality.py"), "--model", "tiny", "--base-model", str(tiny_base),
           "--pool-size", "60", "--dev-size", "16", "--clusters", "6", "--seeds", "1", "--dev", "both", "--finetune",
           "--limit", "2", "--set", "shapley.k=1", "--set", "train.epochs=1", "--markdown", str(tmp_path / "t.md")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=STAGE_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(line["results"]) == {f"{p}/{d}" for p in rq.PROTOCOLS for d in ("alpaca", "mmlu")}
    for key, r in line["results"].items():
        for name in ("cluster_auroc", "record_auroc", "harm_in_bad_clusters", "pool_harmful_share", "valuation_s"):
            assert set(r[name]) == {"mean", "std", "values"} and len(r[name]["values"]) == 1, (key, name)
        assert set(r["harmful_share"]) == set(rq.METHODS) == set(r["selection_s"]) == set(r["vs_random"])
        assert r["vs_random"]["random"]["mean"] in (1.0, None)
        assert set(r["acc"]) == set(rq.METHODS) | {"full", "base"}
        assert all(set(by_task) == {"arc_easy", "arc_challenge", "mmlu"} for by_task in r["acc"].values())
        assert r["clusters"]["mean"] == 6
    share = line["results"]["concentrated/alpaca"]["pool_harmful_share"]["mean"]
    assert share == pytest.approx((round(0.85 * 12) + 4 * round(0.02 * 12)) / 60, abs=1e-4)
    assert set(line["targets"]["concentrated/alpaca"]) == {"cluster_auroc>=0.9", "qocs_share<=random/3"}
    assert line["targets"]["scattered/alpaca"] == {}
    assert line["settings"]["embed_fields"] == ["instruction", "input", "output"] and line["seeds"] == [1]
    text = (tmp_path / "t.md").read_text()
    assert "cluster AUROC" in text and "arc_easy" in text
    saved = tmp_path / "line.json"
    saved.write_text(result.stdout)
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks/real_quality.py"), "--from-json", str(saved)],
                           capture_output=True, text=True, env=STAGE_ENV, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[4:] == text.splitlines()[4:]  # the same tables; the header names the source


def test_from_json_renders_a_saved_line_and_runs_nothing(tmp_path):
    stat = {"mean": 0.5, "std": 0.0, "values": [0.5]}
    line = {"benchmark": "real_quality", "seeds": [1], "targets": {"concentrated/alpaca": {"cluster_auroc>=0.9": False}},
            "settings": {"model": "tiny", "pool_size": 60, "dev_size": 16, "clusters": 6, "embed_model": "static",
                         "embed_fields": ["output"], "valuations": ["inrun"], "methods": ["qocs", "random"], "subset": 0.1,
                         "limit": 2},
            "results": {"concentrated/alpaca": {
                "cluster_auroc": stat, "record_auroc": stat, "harm_in_bad_clusters": stat, "pool_harmful_share": stat,
                "corrupted_clusters": stat, "clusters": stat, "valuation_s": stat, "stage_s": {"prepare": stat},
                "harmful_share": {"random": stat, "qocs": stat}, "selection_s": {"random": stat, "qocs": stat},
                "vs_random": {"random": stat, "qocs": stat}}},
            "seconds": {"total": 1.0}}
    saved = tmp_path / "line.json"
    saved.write_text("some log\n" + json.dumps(line) + "\n")
    out = tmp_path / "t.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/real_quality.py"), "--from-json", str(saved),
                             "--markdown", str(out)], capture_output=True, text=True, env=STAGE_ENV)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.index("| qocs |") < text.index("| random |")  # the settings' method order
    assert "cluster_auroc>=0.9 missed" in text and not list(Path(tmp_path).glob("shed-*"))


def _saved_run(fields: list[str], methods: list[str], protocol: str, share: float) -> dict:
    stat = lambda x: {"mean": x, "std": 0.0, "values": [x]}  # noqa: E731
    row = {"cluster_auroc": stat(0.5), "record_auroc": stat(0.5), "harm_in_bad_clusters": stat(0.6),
           "pool_harmful_share": stat(0.2), "corrupted_clusters": stat(4.0), "clusters": stat(50.0),
           "valuation_s": stat(200.0), "stage_s": {"prepare": stat(0.1)},
           "harmful_share": {m: stat(share) for m in methods}, "selection_s": {m: stat(0.1) for m in methods},
           "vs_random": {m: stat(1.0) for m in methods}}
    return {"benchmark": "real_quality", "seeds": [1, 2], "targets": {f"{protocol}/alpaca": {}},
            "settings": {"model": "smollm2", "pool_size": 1000, "dev_size": 32, "clusters": 50, "embed_model": "static",
                         "embed_fields": fields, "valuations": ["inrun"], "methods": methods, "subset": 0.1,
                         "protocols": [protocol], "devs": ["alpaca"], "limit": 0},
            "results": {f"{protocol}/alpaca": row}, "seconds": {f"{protocol}/seed 1": 10.0, "total": 20.0}}


def test_merge_marks_runs_on_other_fields_and_sums_their_time():
    record = ["instruction", "input", "output"]
    runs = [_saved_run(record, ["qocs", "random", "length"], "concentrated", 0.1),
            _saved_run(record, ["qocs", "random", "length"], "scattered", 0.2),
            _saved_run(["output"], ["qocs", "random"], "concentrated", 0.3),
            _saved_run(["output"], ["qocs", "random"], "scattered", 0.4)]
    merged = rq.merge(runs)
    assert list(merged["results"]) == ["concentrated/alpaca", "scattered/alpaca", "concentrated/alpaca/output",
                                       "scattered/alpaca/output"]
    assert merged["results"]["concentrated/alpaca/output"]["harmful_share"]["qocs"]["mean"] == 0.3
    assert merged["settings"]["protocols"] == ["concentrated", "scattered"]
    assert merged["settings"]["other_embed_fields"] == [["output"]]
    assert merged["seconds"]["total"] == 80.0 and merged["seconds"]["concentrated/seed 1/output"] == 10.0
    text = rq.markdown(merged, "x.jsonl")
    assert "| length | 0.100 ± 0.000 (1.00) | 0.200 ± 0.000 (1.00) | n/a | n/a |" in text  # absent where not run
    assert text.count("rows marked /output: on output") == 1
    table = rq.summary(merged).splitlines()
    assert table[0].endswith("| qocs | random | length |") and len(table) == 2 + 4
    assert table[-2].startswith("| concentrated/alpaca/output | 0.50 ± 0.00 | 0.60 ± 0.00 | 0.20 | 0.30 ± 0.00")
    other_seeds = _saved_run(record, ["qocs"], "scattered", 0.2)
    other_seeds["seeds"] = [1]
    with pytest.raises(SystemExit, match="different seeds"):
        rq.merge([runs[0], other_seeds])


def test_readme_block_is_replaced_between_its_markers_only(tmp_path):
    import tables

    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- real_quality:begin -->\nold table\n<!-- real_quality:end -->\nafter\n")
    tables.write_block(doc, "real_quality", "| new |\n")
    assert doc.read_text() == "intro\n<!-- real_quality:begin -->\n| new |\n<!-- real_quality:end -->\nafter\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one"):
        tables.write_block(doc, "real_quality", "x\n")
    assert doc.read_text() == "no markers\n"
