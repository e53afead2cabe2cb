"""benchmarks/real_quality.py: the MMLU dev set, the harm metrics (benchmarks/harm.py), and one small end-to-end
run. The planted pool itself: tests/test_planting.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, STAGE_ENV, run_stage, write_stage_params

sys.path.insert(0, str(ROOT / "benchmarks"))
import real_quality as rq  # noqa: E402

needs_alpaca = pytest.mark.skipif(not rq.ALPACA.is_file(), reason=f"shared data file {rq.ALPACA} is absent")
needs_mmlu = pytest.mark.skipif(not (rq.MMLU / "val").is_dir(), reason=f"shared data folder {rq.MMLU} is absent")


# --- the MMLU dev set ---

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


def test_kind_shares_and_record_level_aurocs():
    import harm

    kinds = {"a": "refusal", "b": "generic", "c": "generic", "d": "", "e": "", "f": ""}
    assert harm.kind_shares(["a", "b", "d", "e"], kinds) == {"generic": 0.25, "refusal": 0.25}  # clean not reported
    assert harm.kind_shares(["d", "e"], kinds) == {"generic": 0.0, "refusal": 0.0}
    assert all(np.isnan(v) for v in harm.kind_shares([], kinds).values())
    # generic b, c score below every clean record; refusal a ties one clean record (0.5) and beats the others
    scores = {"a": 0.5, "b": -1.0, "c": -2.0, "d": 0.5, "e": 0.2, "f": 0.1}
    assert harm.kind_auroc(scores, kinds) == pytest.approx({"generic": 1.0, "refusal": 0.5 / 3})
    assert harm.record_level_auroc(scores, {"b", "c"}) == 1.0
    assert harm.record_level_auroc(scores, {"a"}) == pytest.approx(0.5 / 5)
    assert np.isnan(harm.record_level_auroc(scores, set()))
    assert rq.cluster_auroc is harm.cluster_auroc and rq.harmful_share is harm.harmful_share  # one implementation


def test_summarize_reports_each_methods_kind_share_over_seeds():
    def row(share: float) -> dict:
        return {"cluster_auroc": 0.5, "record_auroc": 0.5, "harm_in_bad_clusters": 0.5, "pool_harmful_share": 0.2,
                "corrupted_clusters": 1, "clusters": 5, "valuation_s": 1.0, "harmful_share": {"random": share},
                "kind_share": {"random": {"generic": share, "refusal": 0.0}}, "selection_s": {"random": 0.1},
                "acc": {}, "stage_s": {}}

    out = rq.summarize([row(0.1), row(0.3)])
    assert out["kind_share"]["random"]["generic"] == {"mean": 0.2, "std": 0.1, "values": [0.1, 0.3]}
    assert out["kind_share"]["random"]["refusal"]["mean"] == 0.0


def test_kinds_take_names_and_families():
    assert rq.parse([]).kinds == list(rq.LOSS_KINDS)  # the default: the loss kinds, as before
    assert rq.parse(["--kinds", "fluent"]).kinds == ["generic", "wrong_facts", "other_question", "restatement"]
    assert rq.parse(["--kinds", "mixed"]).kinds == list(rq.KINDS)
    assert rq.parse(["--kinds", "refusal", "generic"]).kinds == ["refusal", "generic"]
    assert rq.family_of(rq.parse(["--kinds", "fluent"]).kinds) == "fluent"
    assert rq.family_of(["refusal", "generic"]) == "custom"
    with pytest.raises(SystemExit):
        rq.parse(["--kinds", "typos"])


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


# one of each kind of method (cluster scores, a within order ranking the clusters too, the reference, record-level,
# random): every one is fine-tuned and evaluated, so the full list would triple the test's time
METHODS = ["qocs", "qwcs+blend@members", "qocs@meanloss", "perplexity", "random"]


@pytest.mark.slow
@needs_alpaca
@needs_mmlu
def test_end_to_end_tiny_run_prints_one_json_line_with_every_figure(tmp_path, tiny_base):
    cmd = [sys.executable, str(ROOT / "benchmarks/real_quality.py"), "--model", "tiny", "--base-model", str(tiny_base),
           "--pool-size", "60", "--dev-size", "16", "--clusters", "6", "--seeds", "1", "--dev", "both", "--finetune",
           "--limit", "2", "--heldout", "5", "--methods", *METHODS, "--set", "shapley.k=1", "--set", "train.epochs=1",
           "--markdown", str(tmp_path / "t.md")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=STAGE_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(line["results"]) == {f"{p}/{d}" for p in rq.PROTOCOLS for d in ("alpaca", "mmlu")}
    for key, r in line["results"].items():
        for name in ("cluster_auroc", "record_auroc", "harm_in_bad_clusters", "pool_harmful_share", "valuation_s"):
            assert set(r[name]) == {"mean", "std", "values"} and len(r[name]["values"]) == 1, (key, name)
        assert set(r["harmful_share"]) == set(METHODS) == set(r["selection_s"]) == set(r["vs_random"])
        assert r["vs_random"]["random"]["mean"] in (1.0, None)
        assert set(r["acc"]) == set(METHODS) | {"full", "base"}
        # every record valued (the default valuation, forward): its own AUROC, per kind, and the references
        assert set(r["reference_auroc"]) == {"length", "perplexity"} and "record_auroc_inherited" in r
        assert set(r["record_auroc_by_kind"]) <= set(rq.LOSS_KINDS) and r["record_auroc_by_kind"]
        assert -1 <= r["length_spearman"]["mean"] <= 1
        # each record order a scored method drew by, once: its AUROC for a planted record
        # and its clusters' by that order (sample.cluster_score members)
        orders = {m.partition("+")[2].partition("@")[0] for m in METHODS if "+" in m and rq.scored(m)}
        assert set(r["within_auroc"]) == orders == set(r["within_cluster_auroc"]) == {"blend"}
        assert 0 <= r["within_cluster_auroc"]["blend"]["mean"] <= 1
        assert all(set(by_task) == {"arc_easy", "arc_challenge", "mmlu", "heldout"} for by_task in r["acc"].values())
        assert all(by_task["heldout"]["mean"] < 0 for by_task in r["acc"].values())  # a mean log-likelihood
        assert r["clusters"]["mean"] == 6
    share = line["results"]["concentrated/alpaca"]["pool_harmful_share"]["mean"]
    assert share == pytest.approx((round(0.85 * 12) + 4 * round(0.02 * 12)) / 60, abs=1e-4)
    assert set(line["targets"]["concentrated/alpaca"]) == {"cluster_auroc>=0.9", "qocs_share<=random/3",
                                                           "cluster_auroc(@members, blend)>=0.9"}
    assert line["targets"]["scattered/alpaca"] == {}
    assert line["settings"]["embed_fields"] == ["instruction", "input", "output"] and line["seeds"] == [1]
    # saved settings name the shared data relative to the repository, not this machine's folders
    assert line["settings"]["params"]["evaluate.mmlu_dir"] == "../shared/data/mmlu"
    text = (tmp_path / "t.md").read_text()
    assert "cluster AUROC" in text and "arc_easy" in text and "held-out log-lik (5 records)" in text
    saved = tmp_path / "line.json"
    saved.write_text(result.stdout)
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks/real_quality.py"), "--from-json", str(saved)],
                           capture_output=True, text=True, env=STAGE_ENV, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[4:] == text.splitlines()[4:]  # the same tables; the header names the source


def test_a_method_name_sets_a_copy_of_the_params_and_qfcs_digits_its_share_left_out():
    raw = {"sample": {"method": "random", "within": "nearest", "exclude": 0.3, "blend": ["value", "loss"]}}
    out = rq.tables.with_method(raw, "qfcs60+blend3")
    assert out["sample"] == {"method": "qfcs", "within": "blend", "exclude": 0.6,
                             "blend": ["value", "loss", "relevance"]}
    assert raw["sample"]["exclude"] == 0.3 and raw["sample"]["method"] == "random"  # the run's params untouched
    assert rq.tables.with_method(raw, "qfcs+value")["sample"] == {"method": "qfcs", "within": "value",
                                                                  "exclude": 0.3, "blend": ["value", "loss"]}
    assert rq.tables.with_method(raw, "qwcs")["sample"]["within"] == "nearest"
    assert rq.scored("qfcs60+blend3") and rq.scored("qocs+blend3@members") and not rq.scored("qocs@meanloss")
    ranked = rq.tables.with_method(raw, "qfcs60+blend3@members")["sample"]
    assert ranked == {"method": "qfcs", "within": "blend", "exclude": 0.6, "blend": ["value", "loss", "relevance"],
                      "cluster_score": "members"}
    assert "cluster_score" not in rq.tables.with_method(raw, "qfcs60+blend3")["sample"]
    assert rq.parse(["--methods", "qfcs60+blend3@members"]).methods == ["qfcs60+blend3@members"]
    assert [rq.method_name(m) for m in rq.DEFAULT_METHODS] == list(rq.DEFAULT_METHODS)
    assert rq.parse(["--methods", "qfcs45+blend3", "qfcs80", "random"]).methods == ["qfcs45+blend3", "qfcs80", "random"]
    for bad in ("qfcs6+blend3", "qfcs600+blend3", "qfcs60+nearest_ish", "qocs60", "qocs@members"):
        with pytest.raises(SystemExit):
            rq.parse(["--methods", bad])


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
    assert table[0].endswith("| record AUROC | pool | qocs | length | random |") and len(table) == 2 + 4 + 1
    assert table[-3] == "| concentrated/alpaca/output | 0.50 | 20.0% | 30.0% | n/a | 30.0% |"
    # the last row: each method's worst share over random's across the rows, saying where a method did not run
    assert table[-1] == "| **worst share / random's** | | | **1.00** | **1.00** (2 of 4 rows) | **1.00** |"
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


def test_runs_of_single_seeds_are_joined_into_one_over_all_seeds():
    record = ["instruction", "input", "output"]
    one, two = _saved_run(record, ["qocs", "random"], "concentrated", 0.1), _saved_run(record, ["qocs", "random"],
                                                                                        "concentrated", 0.3)
    one["seeds"], two["seeds"] = [1], [2]
    other = _saved_run(record, ["qocs", "random"], "scattered", 0.2)
    other["seeds"] = [1, 2]
    merged = rq.merge([one, other, two])
    assert merged["seeds"] == [1, 2] and list(merged["results"]) == ["concentrated/alpaca", "scattered/alpaca"]
    share = merged["results"]["concentrated/alpaca"]["harmful_share"]["qocs"]
    assert share["values"] == [0.1, 0.3] and share["mean"] == pytest.approx(0.2) and share["std"] == pytest.approx(0.1)
    assert merged["results"]["concentrated/alpaca"]["clusters"]["values"] == [50.0, 50.0]
    with pytest.raises(SystemExit, match="sharing seeds"):
        rq.merge_seeds([one, one])


def test_downstream_gaps_are_paired_by_seed_and_rendered_against_random_and_perplexity():
    seeds = lambda *v: rq.stats(list(v))  # noqa: E731
    acc = {"qwcs+blend": {"heldout": seeds(-1.0, -1.2, -0.9)}, "random": {"heldout": seeds(-1.1, -1.3, -1.0)},
           "perplexity": {"heldout": seeds(-1.0, -1.1, -0.95)}, "base": {"heldout": seeds(-1.5, -1.5, -1.5)}}
    gap = rq.paired_gap(acc, "qwcs+blend", "random", "heldout")
    assert gap["values"] == pytest.approx([0.1, 0.1, 0.1]) and gap["z"] is None  # no spread: no ratio
    gap = rq.paired_gap(acc, "qwcs+blend", "perplexity", "heldout")
    assert gap["mean"] == pytest.approx(-0.0167, abs=1e-4)
    assert gap["z"] == pytest.approx(-0.0167 / np.std([0.0, -0.1, 0.05], ddof=1), abs=1e-3)
    assert rq.paired_gap(acc, "qwcs+blend", "full", "heldout") is None
    line = json.loads(json.dumps(_saved_run(["instruction", "input", "output"], ["qwcs+blend", "perplexity", "random"],
                                            "concentrated", 0.1)))
    line["seeds"] = [1, 2, 3]
    line["settings"]["heldout"] = 200
    line["results"]["concentrated/alpaca"]["acc"] = acc
    text = rq.markdown(line, "x.jsonl")
    assert "| qwcs+blend - random | +0.1000 ± 0.0000 (n/a) |" in text
    assert "| perplexity - random |" in text and "| qwcs+blend - perplexity |" in text and "base - " not in text


def test_each_kinds_share_of_a_subset_is_rendered_per_result_row():
    line = _saved_run(["instruction", "input", "output"], ["qocs", "random"], "concentrated", 0.1)
    stat = lambda x: {"mean": x, "std": 0.0, "values": [x, x]}  # noqa: E731
    line["results"]["concentrated/alpaca"]["kind_share"] = {"qocs": {"generic": stat(0.02), "refusal": stat(0.0)},
                                                            "random": {"generic": stat(0.1), "refusal": stat(0.09)}}
    text = rq.markdown(line, "x.jsonl")
    assert "| method | generic | refusal |" in text
    assert "| qocs | 2.0% | 0.0% |" in text and "| random | 10.0% | 9.0% |" in text


def test_a_method_one_seeds_run_lacks_stays_aligned_by_seed_when_runs_are_joined():
    record = ["instruction", "input", "output"]
    one, two, three = (_saved_run(record, ["qocs", "random"], "concentrated", x) for x in (0.1, 0.2, 0.3))
    for run, seed in zip((one, two, three), (1, 2, 3)):
        run["seeds"] = [seed]
        run["results"]["concentrated/alpaca"]["acc"] = {"random": {"heldout": rq.stats([-1.0 - seed / 10])}}
    for run in (one, three):  # the whole pool fine-tuned on seeds 1 and 3 only
        run["results"]["concentrated/alpaca"]["acc"]["full"] = {"heldout": rq.stats([-0.5 - run["seeds"][0] / 10])}
    acc = rq.merge([one, two, three])["results"]["concentrated/alpaca"]["acc"]
    assert acc["random"]["heldout"]["values"] == [-1.1, -1.2, -1.3]
    assert acc["full"]["heldout"]["values"] == [-0.6, None, -0.8] and acc["full"]["heldout"]["mean"] == -0.7
    gap = rq.paired_gap(acc, "full", "random", "heldout")
    assert gap["values"] == [0.5, 0.5] and gap["z"] is None
    assert "| full pool (seeds 1, 3 only) | -0.700 ± 0.100 |" in rq.markdown(rq.merge([one, two, three]), "x.jsonl")


def test_each_within_orders_record_auroc_is_rendered_per_result_row():
    line = _saved_run(["instruction", "input", "output"], ["qwcs+blend3", "random"], "concentrated", 0.1)
    stat = lambda x: {"mean": x, "std": 0.01, "values": [x - 0.01, x + 0.01]}  # noqa: E731
    line["results"]["concentrated/alpaca"]["within_auroc"] = {"blend3": stat(0.88), "relevance": stat(0.73)}
    text = rq.markdown(line, "x.jsonl")
    assert "| protocol / dev set | blend3 | relevance |" in text
    assert "| concentrated/alpaca | 0.88 ± 0.01 | 0.73 ± 0.01 |" in text
    assert "sample.cluster_score members" not in text  # no cluster AUROC by order measured: no table
    line["results"]["concentrated/alpaca"]["within_cluster_auroc"] = {"blend3": stat(0.97)}
    text = rq.markdown(line, "x.jsonl")
    assert "| protocol / dev set | valuation | blend3 |" in text
    assert "| concentrated/alpaca | 0.50 ± 0.00 | 0.97 ± 0.01 |" in text


def test_the_cluster_target_by_order_counts_only_orders_that_read_the_valuation():
    stat = lambda x: {"mean": x, "std": 0.0, "values": [x]}  # noqa: E731
    summary = {"cluster_auroc": stat(0.8),
               "within_cluster_auroc": {"blendlr": stat(0.99), "blend3": stat(0.85), "value": stat(0.88), "loss": stat(1)}}
    assert rq.targets(summary, "concentrated") == {"cluster_auroc>=0.9": False,
                                                   "cluster_auroc(@members, value)>=0.9": False}
    assert rq.targets(summary, "scattered") == {}


def test_a_qfcs_variant_run_at_several_shares_gets_a_sweep_table_beside_perplexity():
    line = _saved_run(["instruction", "input", "output"],
                      ["qfcs30+blend3", "qfcs60+blend3", "qfcs60+blend3@members", "perplexity"], "concentrated", 0.05)
    line["results"]["concentrated/alpaca"]["harmful_share"]["qfcs60+blend3"]["mean"] = 0.0
    text = rq.markdown(line, "x.jsonl")
    assert "QFCS+blend3's share left out (sample.exclude), swept" in text
    assert "| protocol / dev set | 0.3 | 0.6 | perplexity |" in text
    assert "| concentrated/alpaca | 5.0% | 0.0% | 5.0% |" in text
    assert "QFCS+blend3@members's share" not in text  # one share only: no sweep
    line = _saved_run(["instruction", "input", "output"], ["qfcs60+blend3", "perplexity"], "concentrated", 0.05)
    assert "swept" not in rq.markdown(line, "x.jsonl")
