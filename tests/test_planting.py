"""benchmarks/planting.py: the planted pool (sources, protocols, corruption kinds), the loss kinds and the
fluent-harm kinds (generic, wrong_facts, other_question, restatement)."""

import json
import re
import sys
from collections import Counter

import numpy as np
import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import planting  # noqa: E402

ALPACA = ROOT.parent / "shared/data/instruction_pools/alpaca_5000.json"
needs_alpaca = pytest.mark.skipif(not ALPACA.is_file(), reason=f"shared data file {ALPACA} is absent")
FLUENT = planting.FLUENT_KINDS


@pytest.fixture(scope="module")
def alpaca():
    return json.loads(ALPACA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def concentrated(alpaca):
    return planting.plant(alpaca, "concentrated", seed=1)


@pytest.fixture(scope="module")
def scattered(alpaca):
    return planting.plant(alpaca, "scattered", seed=1)


@pytest.fixture(scope="module")
def fluent_raw(alpaca):
    """Per protocol, the 1,000-record pool's records before packaging, fluent kinds only (seed 1)."""
    return {p: planting.plant_raw(alpaca, p, seed=1, kinds=FLUENT) for p in planting.PROTOCOLS}


@pytest.fixture(scope="module")
def fluent_pools(alpaca):
    return {p: planting.plant(alpaca, p, seed=1, kinds=FLUENT) for p in planting.PROTOCOLS}


@pytest.fixture(scope="module")
def mixed_raw(alpaca):
    return planting.plant_raw(alpaca, "concentrated", seed=1, kinds=planting.resolve_kinds(["mixed"]))


def within_ten_percent(new: str, old: str) -> bool:
    return 10 * abs(len(new) - len(old)) <= len(old)


def phrases(text: str, n: int = 5) -> set[str]:
    """The text's n-word phrases: lower-cased words, punctuation stripped."""
    words = [w for w in (re.sub(r"[^\w']", "", w.lower()) for w in text.split()) if w]
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


# --- the planting protocol (loss kinds, the default) ---

@needs_alpaca
def test_sources_have_equal_shares(concentrated):
    _, truth = concentrated
    assert len(truth) == 1000
    assert Counter(t["source"] for t in truth) == {s: 200 for s in planting.SOURCES}


@needs_alpaca
def test_concentrated_plants_one_mostly_corrupted_bad_source(concentrated):
    _, truth = concentrated
    bad = {t["source"] for t in truth if t["bad_source"]}
    assert len(bad) == 1 and "plain" not in bad
    for source in planting.SOURCES:
        corrupted = sum(t["corrupted"] for t in truth if t["source"] == source)
        assert corrupted == (round(0.85 * 200) if source in bad else round(0.02 * 200)), source
    assert sum(t["corrupted"] for t in truth) == 170 + 4 * 4


@needs_alpaca
def test_several_bad_sources_and_other_rates(alpaca):
    _, truth = planting.plant(alpaca, "concentrated", seed=2, pool_size=500, dev_size=20, bad_sources=2, bad_rate=0.9,
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
    assert set(per_source) == set(planting.SOURCES) and max(per_source.values()) < 80  # spread, not concentrated


@needs_alpaca
def test_every_corruption_kind_is_planted_and_only_those_asked_for(alpaca, concentrated):
    _, truth = concentrated
    kinds = Counter(t["kind"] for t in truth if t["corrupted"])
    assert set(kinds) == set(planting.LOSS_KINDS) and min(kinds.values()) >= 20  # the default: the loss kinds
    assert all(t["kind"] == "" for t in truth if not t["corrupted"])
    _, only = planting.plant(alpaca, "scattered", seed=1, pool_size=300, dev_size=20, kinds=("shuffled", "refusal"))
    assert {t["kind"] for t in only if t["corrupted"]} == {"shuffled", "refusal"}
    assert sum(t["corrupted"] for t in only) == 60


def test_corruptions_do_what_they_say():
    rng = np.random.default_rng(0)
    response = "The cat sat on the mat and looked at the dog."
    words = response.split()
    assert planting.corrupt(rng, "mismatched", response, [response, "Paris."]) == "Paris."
    truncated = planting.corrupt(rng, "truncated", response, [])
    assert response.startswith(truncated) and 1 <= len(truncated.split()) < len(words)
    shuffled = planting.corrupt(rng, "shuffled", response, [])
    assert shuffled != response and sorted(shuffled.split()) == sorted(words)
    assert planting.corrupt(rng, "refusal", response, []) in planting.REFUSALS
    assert planting.applicable_kinds("No", planting.LOSS_KINDS) == ["mismatched", "refusal"]
    assert planting.applicable_kinds("ha ha ha ha", planting.LOSS_KINDS) == ["mismatched", "truncated", "refusal"]
    with pytest.raises(ValueError, match="unknown corruption kind"):
        planting.corrupt(rng, "typos", response, [])


@needs_alpaca
def test_mismatched_responses_come_from_other_pool_records(alpaca, concentrated):
    pool, truth = concentrated
    base, dev = planting.split(alpaca, 1, 1000, 32)
    base_outputs = {r["output"] for r in base}
    dev_outputs = {r["output"] for r in dev} - base_outputs
    plain = [(p, t) for p, t in zip(pool, truth) if t["kind"] == "mismatched" and t["source"] == "plain"]
    assert plain
    for record, t in plain:  # a plain record is unwrapped: its response is another pool record's, whole
        own = alpaca[t["alpaca_index"]]["output"]
        assert record["output"] in base_outputs and record["output"] != own and record["output"] not in dev_outputs


@needs_alpaca
def test_dev_records_are_held_out_and_plain(alpaca, concentrated, scattered):
    dev = planting.dev_records(alpaca, 1, 1000, 32)
    assert len(dev) == 32 and all(set(r) == {"instruction", "input", "output"} for r in dev)
    base, held = planting.split(alpaca, 1, 1000, 32)
    assert not {r["alpaca_index"] for r in base} & {r["alpaca_index"] for r in held}
    prompts = {(r["instruction"], r["input"]) for r in dev}
    assert not prompts & {(r["instruction"], r["input"]) for r in base}  # no dev prompt is a pool prompt
    from shed.data import record_id

    dev_ids = {record_id(r["instruction"], r["input"], r["output"]) for r in dev}
    for _, truth in (concentrated, scattered):
        assert not dev_ids & {t["id"] for t in truth}
        assert not {t["alpaca_index"] for t in truth} & {r["alpaca_index"] for r in held}


def test_heldout_records_are_in_neither_the_pool_nor_the_dev_set(alpaca):
    held = planting.heldout_records(alpaca, 1, 1000, 32, 200)
    assert len(held) == 200 and all(set(r) == {"instruction", "input", "output"} for r in held)
    base, dev = planting.split(alpaca, 1, 1000, 32)
    prompts = {(r["instruction"], r["input"]) for r in held}
    assert len(prompts) == 200 and not prompts & {(r["instruction"], r["input"]) for r in base + dev}
    assert held == planting.heldout_records(alpaca, 1, 1000, 32, 200)
    assert held != planting.heldout_records(alpaca, 2, 1000, 32, 200)
    with pytest.raises(ValueError, match="held-out"):
        planting.heldout_records(alpaca, 1, 1000, 32, len(planting.alpaca_base(alpaca)))


@needs_alpaca
def test_truth_ids_are_the_ids_prepare_gives(tmp_path, concentrated):
    from shed.stages.prepare import pool_records

    pool, truth = concentrated
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool),
                                         encoding="utf-8")
    prepared = list(pool_records(str(tmp_path / "pool.jsonl"), duplicates="error", empty="error"))
    assert [r["id"] for r in prepared] == [t["id"] for t in truth]
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in prepared] == pool


@needs_alpaca
def test_planting_is_deterministic_by_seed_and_differs_across_seeds(alpaca, concentrated):
    assert planting.plant(alpaca, "concentrated", seed=1) == concentrated
    other_pool, other_truth = planting.plant(alpaca, "concentrated", seed=2)
    assert other_pool != concentrated[0]
    assert {t["alpaca_index"] for t in other_truth} != {t["alpaca_index"] for t in concentrated[1]}
    assert planting.dev_records(alpaca, 1, 1000, 32) != planting.dev_records(alpaca, 2, 1000, 32)


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
    for source in set(planting.SOURCES) - {"plain"}:
        records = [p for p, t in zip(pool, truth) if t["source"] == source and not t["corrupted"]]
        assert len({r["instruction"][:12] for r in records}) >= 3, source  # several openings, not one marker
        assert len({r["output"][-25:] for r in records}) >= 3, source
    for record, t in zip(pool, truth):
        if t["source"] == "plain" and not t["corrupted"]:  # plain keeps Alpaca's text
            assert record == {k: alpaca[t["alpaca_index"]][k] for k in ("instruction", "input", "output")}


@needs_alpaca
def test_plant_refuses_what_it_cannot_plant(alpaca):
    with pytest.raises(ValueError, match="protocol"):
        planting.plant(alpaca, "sprinkled", seed=1)
    with pytest.raises(ValueError, match="kinds"):
        planting.plant(alpaca, "scattered", seed=1, kinds=("typos",))
    with pytest.raises(ValueError, match="bad_sources"):
        planting.plant(alpaca, "concentrated", seed=1, bad_sources=5)
    with pytest.raises(ValueError, match="usable Alpaca records"):
        planting.plant(alpaca, "scattered", seed=1, pool_size=5000)


@needs_alpaca
def test_plant_packages_what_plant_raw_planted(alpaca, concentrated):
    raw = planting.plant_raw(alpaca, "concentrated", seed=1)
    pool, truth = concentrated
    assert [(r["source"], r["corrupted"], r["kind"], r["alpaca_index"]) for r in raw] == \
        [(t["source"], t["corrupted"], t["kind"], t["alpaca_index"]) for t in truth]
    for r, record in zip(raw, pool):
        if not r["corrupted"]:
            assert r["response"] == r["output"]
        if r["source"] == "plain":
            assert record["output"] == r["response"]


# --- kinds and families ---

def test_families_resolve_to_their_kinds_and_bad_names_are_refused():
    assert planting.KINDS == planting.LOSS_KINDS + planting.FLUENT_KINDS
    assert planting.LOSS_KINDS == ("mismatched", "truncated", "shuffled", "refusal")
    assert planting.FLUENT_KINDS == ("generic", "wrong_facts", "other_question", "restatement")
    assert planting.resolve_kinds(["fluent"]) == planting.FLUENT_KINDS
    assert planting.resolve_kinds(["mixed"]) == planting.KINDS
    assert planting.resolve_kinds(["loss"]) == planting.LOSS_KINDS
    assert planting.resolve_kinds(["refusal", "fluent", "generic"]) == ("refusal",) + planting.FLUENT_KINDS
    assert planting.resolve_kinds(("shuffled", "refusal")) == ("shuffled", "refusal")  # the order given, kept
    for bad in (["typos"], ["fluent", "Fluent"], []):
        with pytest.raises(ValueError):
            planting.resolve_kinds(bad)
    assert planting.family_of(planting.FLUENT_KINDS) == "fluent" and planting.family_of(planting.KINDS) == "mixed"
    assert planting.family_of(("refusal", "generic")) == "custom"


def test_applicable_kinds_knows_the_fluent_kinds():
    assert planting.applicable_kinds("No", planting.KINDS) == ["mismatched", "refusal", "wrong_facts"]
    assert planting.applicable_kinds("No", FLUENT, donors=["No", "Ok", "A much longer response."]) == \
        ["wrong_facts", "other_question"]  # "Ok" is within 10% of the length, "No" itself does not count
    assert planting.applicable_kinds("ha ha ha ha", FLUENT) == ["generic", "wrong_facts", "restatement"]
    assert planting.applicable_kinds("!?", FLUENT, donors=["?!"]) == ["other_question"]


def test_fluent_kinds_on_a_hand_made_record():
    response = "In 1969, Armstrong walked on the Moon before Aldrin, and more people watched than ever before."
    instruction, inp = "Describe the first Moon landing and the astronauts involved.", ""
    donors = ["Paris is the capital of France, and Berlin is the capital of Germany today.",
              "Vincent van Gogh painted The Starry Night in Saint-Remy in the year 1889, a few months later.",
              "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen in green plants."]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for kind in ("generic", "wrong_facts", "restatement"):
            new = planting.corrupt(rng, kind, response, donors, instruction=instruction, inp=inp)
            assert new != response and within_ten_percent(new, response), (kind, new)
        restated = planting.corrupt(rng, "restatement", response, donors, instruction=instruction, inp=inp)
        assert "moon landing" in restated.lower() or "astronauts" in restated.lower()
    prompts = ["Explain what photosynthesis is.", "Describe Van Gogh's most famous painting.", "Name two capitals."]
    rng = np.random.default_rng(0)
    picked = planting.corrupt(rng, "other_question", response, donors, instruction=instruction,
                              donor_instructions=prompts)
    assert picked == donors[1]  # within 10% of the length (as is donors[2]) and a "describe" instruction too
    picked = planting.corrupt(rng, "other_question", response, donors, instruction="Write about the Moon.",
                              donor_instructions=prompts)
    assert picked in donors[1:]  # no "write" donor: any within 10%


# --- the fluent kinds in the planted pool ---

@needs_alpaca
def test_fluent_kinds_keep_the_response_length_within_ten_percent(fluent_raw):
    for protocol, rows in fluent_raw.items():
        planted = [r for r in rows if r["corrupted"]]
        assert Counter(r["kind"] for r in planted).keys() == set(FLUENT), protocol
        assert min(Counter(r["kind"] for r in planted).values()) >= 20, protocol
        for r in planted:
            assert r["kind"] in FLUENT
            assert within_ten_percent(r["response"], r["output"]), (protocol, r["kind"], r["output"], r["response"])


@needs_alpaca
def test_fluent_kinds_keep_the_length_on_every_kind_of_record(alpaca):
    base, _ = planting.split(alpaca, 1, 1000, 32)
    donors, prompts = [r["output"] for r in base], [r["instruction"] for r in base]
    for i in range(0, len(base), 4):  # a quarter of the pool, each fluent kind that applies
        r = base[i]
        others, other_prompts = donors[:i] + donors[i + 1:], prompts[:i] + prompts[i + 1:]
        for kind in planting.applicable_kinds(r["output"], FLUENT, others):
            new = planting.corrupt(np.random.default_rng([7, i]), kind, r["output"], others, r["instruction"],
                                   r["input"], other_prompts)
            assert new != r["output"] and within_ten_percent(new, r["output"]), (kind, r["output"], new)


@needs_alpaca
def test_plant_raw_responses_are_corrupt_on_the_base_records(alpaca, fluent_raw):
    base, _ = planting.split(alpaca, 1, 1000, 32)
    donors, prompts = [r["output"] for r in base], [r["instruction"] for r in base]
    for i, r in enumerate(fluent_raw["scattered"]):
        if r["corrupted"]:  # the record's own stream (seed, 4, i) draws its kind, then corrupts
            rng = np.random.default_rng([1, 4, i])
            options = planting.applicable_kinds(base[i]["output"], FLUENT, donors)
            assert options[int(rng.integers(len(options)))] == r["kind"]
            again = planting.corrupt(rng, r["kind"], base[i]["output"], donors[:i] + donors[i + 1:],
                                     base[i]["instruction"], base[i]["input"], prompts[:i] + prompts[i + 1:])
            assert again == r["response"]


@needs_alpaca
def test_source_style_markers_survive_on_fluent_records(alpaca, fluent_pools, fluent_raw):
    for protocol, (pool, truth) in fluent_pools.items():
        raw = fluent_raw[protocol]
        seen = Counter()
        for record, t, r in zip(pool, truth, raw):
            if t["kind"] not in FLUENT:
                continue
            seen[t["source"]] += 1
            out = record["output"]
            if t["source"] == "exam":
                assert "[1 mark]" in out
            elif t["source"] == "forum":
                assert "<p>" in out and "</p>" in out
            elif t["source"] == "wiki":
                assert re.search(r"^\* ", out, re.MULTILINE)
            elif t["source"] == "assistant":
                assert re.search(r"^1\. ", out, re.MULTILINE) or "**" in out
            else:  # plain: the prompt unchanged, the planted response as it is
                assert (record["instruction"], record["input"]) == (r["instruction"], r["input"])
                assert out == r["response"]
        assert set(seen) == set(planting.SOURCES), (protocol, seen)


@needs_alpaca
def test_fluent_planting_is_deterministic_by_seed_and_the_truth_records_each_kind(alpaca, fluent_pools, fluent_raw):
    pool, truth = fluent_pools["scattered"]
    assert planting.plant(alpaca, "scattered", seed=1, kinds=FLUENT) == (pool, truth)
    other_pool, other_truth = planting.plant(alpaca, "scattered", seed=2, kinds=FLUENT)
    assert other_pool != pool and [t["kind"] for t in other_truth] != [t["kind"] for t in truth]
    assert sum(t["corrupted"] for t in truth) == 200
    assert {t["kind"] for t in truth if t["corrupted"]} == set(FLUENT)
    assert all(t["kind"] == "" for t in truth if not t["corrupted"])
    assert [t["kind"] for t in truth] == [r["kind"] for r in fluent_raw["scattered"]]


@needs_alpaca
def test_no_phrase_is_shared_by_more_than_five_percent_of_fluent_records(mixed_raw, fluent_raw):
    records = [r for r in mixed_raw + fluent_raw["scattered"] if r["kind"] in FLUENT]
    assert len(records) > 250
    counts = Counter()
    for r in records:
        own = phrases(r["instruction"]) | phrases(r["input"]) | phrases(r["output"])
        counts.update(phrases(r["response"]) - own)
    phrase, count = counts.most_common(1)[0]
    assert count / len(records) <= 0.05, (phrase, count, len(records))


@needs_alpaca
def test_each_fluent_kind_does_what_it_says(alpaca, mixed_raw, fluent_raw):
    base, dev = planting.split(alpaca, 1, 1000, 32)
    kind_of = planting._instruction_type
    records = [r for r in mixed_raw + fluent_raw["concentrated"] + fluent_raw["scattered"] if r["kind"] in FLUENT]
    same_type = 0
    for r in records:
        assert r["response"] != r["output"], r["kind"]
        if r["kind"] == "wrong_facts":  # the original with words changed, most of them kept
            old, new = planting._TOKEN.findall(r["output"]), planting._TOKEN.findall(r["response"])
            assert old != new
            if len(old) >= 4:
                assert len(set(old) & set(new)) >= len(set(old)) / 3, (r["output"], r["response"])
        elif r["kind"] == "other_question":  # another pool record's response, never a dev record's
            donors = [b for b in base if b["output"] == r["response"]]
            assert donors and r["response"] not in {d["output"] for d in dev} - {b["output"] for b in base}
            fits = [b for b in base if b["output"] != r["output"] and within_ten_percent(b["output"], r["output"])
                    and kind_of(b["instruction"]) == kind_of(r["instruction"])]
            if fits:
                assert any(kind_of(d["instruction"]) == kind_of(r["instruction"]) for d in donors)
                same_type += 1
        else:  # generic and restatement: on the prompt's topic, and never the answer's facts
            words = {w.lower() for w in planting._TOKEN.findall(r["instruction"] + " " + r["input"])}
            assert words & {w.lower() for w in planting._TOKEN.findall(r["response"])}
            blank = "x" * len(r["output"])  # the same length, none of the answer's words: the same text
            i = next(k for k, b in enumerate(base) if b["alpaca_index"] == r["alpaca_index"])
            rng, again = np.random.default_rng(99), np.random.default_rng(99)
            assert planting.corrupt(rng, r["kind"], r["output"], [], r["instruction"], r["input"]) == \
                planting.corrupt(again, r["kind"], blank, [], base[i]["instruction"], base[i]["input"])
    assert same_type > 50
