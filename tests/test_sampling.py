"""QOCS, QWCS, random and the cluster_uniform, length and perplexity baselines with exact expectations."""

import dataclasses
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from shed.config import Params
from shed.fileio import ShedError
from shed.prompts import render
from shed.sampling import (cluster_uniform, longest_output, lowest_loss, qfcs, qocs, qwcs, qwcs_probabilities,
                           random_sample, resolve_size)

MEMBERS = {0: ["a0", "a1", "a2"], 1: ["b0", "b1"], 2: ["c0", "c1", "c2", "c3"], 3: ["d0"]}
SCORES = {0: 0.2, 1: 0.9, 2: -0.1, 3: 0.5}


def test_qocs_takes_whole_clusters_in_score_order_and_the_last_partially():
    assert qocs(SCORES, MEMBERS, 5) == ["b0", "b1", "d0", "a0", "a1"]


def test_qocs_includes_the_last_cluster_when_it_fits_exactly():
    # The authors' script lost the final cluster; here size 6 ends exactly after cluster 0.
    assert qocs(SCORES, MEMBERS, 6) == ["b0", "b1", "d0", "a0", "a1", "a2"]
    assert len(qocs(SCORES, MEMBERS, 10)) == 10


def test_qocs_breaks_ties_by_cluster_id():
    assert qocs({0: 1.0, 1: 1.0}, {0: ["x"], 1: ["y"]}, 1) == ["x"]


def test_qfcs_drops_the_lowest_clusters_whole_within_the_share_and_draws_the_rest_at_random():
    # 10 records; exclude 0.5 drops up to 5: cluster 2 (score -0.1, 4 records), then cluster 0 (3 more) would pass 5.
    picked = qfcs(SCORES, MEMBERS, 3, 0.5, seed=7)
    kept = MEMBERS[0] + MEMBERS[1] + MEMBERS[3]  # cluster order, nearest first
    assert picked == random_sample(kept, 3, 7) and not set(picked) & set(MEMBERS[2])
    assert qfcs(SCORES, MEMBERS, 3, 0.5, seed=7) == picked  # seeded
    # exclude 0: nothing dropped, a random sample of the whole pool in cluster order
    every = [i for c in sorted(MEMBERS) for i in MEMBERS[c]]
    assert qfcs(SCORES, MEMBERS, 4, 0.0, seed=1) == random_sample(every, 4, 1)
    # 0.8 would drop clusters 2, 0 and 3 (8 records), but 4 must remain for size 4: only cluster 2 goes.
    assert set(qfcs(SCORES, MEMBERS, 4, 0.8, seed=3)) <= set(kept)
    assert len(qfcs(SCORES, MEMBERS, 6, 0.8, seed=3)) == 6 and not set(qfcs(SCORES, MEMBERS, 6, 0.8, 3)) & set(MEMBERS[2])
    # a tie in score drops the higher cluster id first
    assert qfcs({0: 0.0, 1: 0.0}, {0: ["x"], 1: ["y"]}, 1, 0.5, seed=0) == ["x"]


def test_qfcs_with_a_record_signal_also_leaves_out_the_worst_of_the_kept_records():
    # exclude 0.5: cluster 2 dropped (4 of 10); of the 6 kept, the worst 3 by key (NaN worst, then the highest).
    keys = {"a0": 0.1, "a1": 5.0, "a2": float("nan"), "b0": 0.2, "b1": 4.0, "d0": 0.3,
            "c0": 0.0, "c1": 0.0, "c2": 0.0, "c3": 0.0}
    picked = qfcs(SCORES, MEMBERS, 3, 0.5, seed=5, key_of=keys)
    assert picked == random_sample(["a0", "b0", "d0"], 3, 5)
    # never so many left out that fewer than `size` remain: size 5 of 6 kept leaves out only the NaN one
    assert sorted(qfcs(SCORES, MEMBERS, 5, 0.5, seed=5, key_of=keys)) == ["a0", "a1", "b0", "b1", "d0"]


def test_qwcs_probabilities_are_a_softmax_with_temperature():
    p = qwcs_probabilities(np.array([0.0, np.log(3.0)]), temperature=1.0)
    assert p == pytest.approx([0.25, 0.75])
    sharp = qwcs_probabilities(np.array([0.0, 0.01]), temperature=1e-4)
    assert sharp[1] > 0.999


def test_qwcs_low_temperature_drains_clusters_in_score_order():
    taken = qwcs(SCORES, MEMBERS, 6, temperature=1e-6, seed=0)
    assert sorted(taken[:2]) == ["b0", "b1"]
    assert taken[2] == "d0"
    assert set(taken[3:]) == {"a0", "a1", "a2"}


def test_qwcs_takes_each_record_at_most_once_and_is_deterministic():
    a = qwcs(SCORES, MEMBERS, 10, temperature=1.0, seed=3)
    assert sorted(a) == sorted(sum(MEMBERS.values(), []))
    assert a == qwcs(SCORES, MEMBERS, 10, temperature=1.0, seed=3)
    assert a != qwcs(SCORES, MEMBERS, 10, temperature=1.0, seed=4)


def test_qwcs_first_draw_frequencies_follow_the_weights():
    members = {0: [f"x{i}" for i in range(50)], 1: [f"y{i}" for i in range(50)]}
    scores = {0: 0.0, 1: float(np.log(3.0))}
    firsts = [qwcs(scores, members, 1, temperature=1.0, seed=s)[0][0] for s in range(2000)]
    assert firsts.count("y") / 2000 == pytest.approx(0.75, abs=0.03)


def test_random_sample_is_seeded_and_without_replacement():
    ids = [str(i) for i in range(100)]
    a = random_sample(ids, 30, seed=1)
    assert len(set(a)) == 30 and a == random_sample(ids, 30, seed=1) and a != random_sample(ids, 30, seed=2)


@pytest.mark.parametrize("size,expected", [(0.1, 10), (1.0, 100), (25, 25), (100, 100)])
def test_resolve_size(size, expected):
    assert resolve_size(size, 100) == expected


@pytest.mark.parametrize("size", [101, 0.001])
def test_resolve_size_rejects_impossible_sizes(size):
    with pytest.raises(ShedError, match="sample.subset_size"):
        resolve_size(size, 100)


# --- cluster_uniform: every cluster weighted equally ---
UNEVEN = {0: [f"a{i}" for i in range(5)], 1: [f"b{i}" for i in range(5)], 2: ["c0", "c1"]}


def counts_by_cluster(taken: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(record[0] for record in taken).items()))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cluster_uniform_takes_equal_counts_while_every_cluster_has_members(seed):
    taken = cluster_uniform(UNEVEN, 6, seed)
    assert counts_by_cluster(taken) == {"a": 2, "b": 2, "c": 2}
    assert len(set(taken)) == 6
    # round by round: the first three are one record of each cluster
    assert sorted(record[0] for record in taken[:3]) == ["a", "b", "c"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cluster_uniform_skips_a_cluster_that_ran_out_and_gives_the_extra_record_to_the_first_in_order(seed):
    taken = cluster_uniform(UNEVEN, 9, seed)
    rng = np.random.default_rng([seed, 5])
    first_big = next("ab"[c] for c in rng.permutation(3) if c != 2)  # the documented cluster order
    assert counts_by_cluster(taken) == {"a": 3, "b": 3, "c": 2, first_big: 4}
    assert [record[0] for record in taken[6:]] == sorted("ab", key=lambda c: c != first_big) + [first_big]


def test_cluster_uniform_follows_the_documented_round_robin_exactly():
    # the cluster order is rng.permutation(3), then each cluster's members are shuffled, in ascending id
    rng = np.random.default_rng([0, 5])
    order = [sorted(UNEVEN)[i] for i in rng.permutation(3)]
    shuffled = {c: [UNEVEN[c][i] for i in rng.permutation(len(UNEVEN[c]))] for c in sorted(UNEVEN)}
    expected = [shuffled[c][r] for r in range(5) for c in order if r < len(shuffled[c])]
    assert cluster_uniform(UNEVEN, 12, 0) == expected
    assert cluster_uniform(UNEVEN, 9, 0) == expected[:9]
    assert cluster_uniform(UNEVEN, 9, 0) == ["a1", "b3", "c1", "a4", "b1", "c0", "a0", "b0", "a3"]


def test_cluster_uniform_is_deterministic_by_seed():
    big = {c: [f"{c}-{i}" for i in range(20)] for c in range(6)}
    assert cluster_uniform(big, 30, 7) == cluster_uniform(big, 30, 7)
    assert cluster_uniform(big, 30, 7) != cluster_uniform(big, 30, 8)
    assert sorted(cluster_uniform(big, 120, 7)) == sorted(sum(big.values(), []))


def select_with(method: str, subset_size: float, pool: list[dict], assignments=None, losses=None, scores=None,
                within: str = "nearest", ifd=None, record_scores=None, relevance=None, blend=None,
                cluster_score: str = "value", exclude: float = 0.3) -> list[str]:
    from shed.stages.sample import Inputs, select

    params = Params()
    params.sample.method, params.sample.subset_size, params.sample.within = method, subset_size, within
    params.sample.cluster_score, params.sample.exclude = cluster_score, exclude
    params.sample.blend = blend or params.sample.blend
    inputs = Inputs(pool, pd.DataFrame() if assignments is None else assignments,
                    pd.DataFrame() if scores is None else scores, losses=losses, ifd=ifd, record_scores=record_scores,
                    relevance=relevance)
    return select(params, inputs)


def test_sample_stage_cluster_uniform_sizes_a_fraction_or_a_count_of_the_pool():
    pool = [{"id": r, "instruction": "i", "input": "", "output": "o"} for c in sorted(UNEVEN) for r in UNEVEN[c]]
    assignments = pd.DataFrame({"id": [r["id"] for r in pool], "cluster": [int("abc".index(r["id"][0])) for r in pool],
                                "distance": np.linspace(0, 1, len(pool))})
    half = select_with("cluster_uniform", 0.5, pool, assignments)  # 6 of 12
    assert half == cluster_uniform(UNEVEN, 6, 0) and counts_by_cluster(half) == {"a": 2, "b": 2, "c": 2}
    assert select_with("cluster_uniform", 9, pool, assignments) == cluster_uniform(UNEVEN, 9, 0)


# --- length: longest responses first ---
def test_longest_output_ranks_by_characters_descending_with_ties_by_id():
    assert longest_output(["b", "a", "c", "d"], [3, 5, 5, 1], 3) == ["a", "c", "b"]
    assert longest_output(["b", "a", "c", "d"], [3, 5, 5, 1], 4) == ["a", "c", "b", "d"]


def test_sample_stage_length_counts_characters_of_the_output_only():
    outputs = {"r1": "ééé", "r2": "abcd", "r3": "ab", "r4": "xyz", "r5": ""}  # "ééé": 3 characters, 6 UTF-8 bytes
    pool = [{"id": i, "instruction": "a very long instruction" * (k == 4), "input": "", "output": o}
            for k, (i, o) in enumerate(outputs.items())]
    assert select_with("length", 0.6, pool) == ["r2", "r1", "r4"]  # 0.6 of 5: 3 records
    assert select_with("length", 4, pool) == ["r2", "r1", "r4", "r3"]


def test_sample_stage_length_counts_every_reply_of_a_conversation():
    def conversation(rid, *replies):
        turns = [t for reply in replies for t in ({"role": "user", "content": "q" * 50}, {"role": "assistant",
                                                                                         "content": reply})]
        return {"id": rid, "instruction": "q" * 50, "input": "", "output": replies[0], "messages": turns}

    pool = [{"id": "r1", "instruction": "i", "input": "", "output": "abcdef"}, conversation("r2", "abc", "abcd"),
            conversation("r3", "abcde")]
    assert select_with("length", 3, pool) == ["r2", "r1", "r3"]  # 7 reply characters, 6, 5


# --- perplexity: lowest loss first ---
def test_lowest_loss_ranks_ascending_with_ties_by_id_and_nan_last():
    ids, losses = ["x", "y", "z", "w", "v"], [2.0, 1.0, 2.0, math.nan, math.inf]
    assert lowest_loss(ids, losses, 3) == ["y", "x", "z"]
    assert lowest_loss(ids, losses, 5) == ["y", "x", "z", "v", "w"]


def test_sample_stage_perplexity_selects_from_the_given_losses():
    pool = [{"id": f"r{i}", "instruction": "i", "input": "", "output": "o"} for i in range(4)]
    assert select_with("perplexity", 0.5, pool, losses=[0.3, 0.1, 0.2, 0.1]) == ["r1", "r3"]
    with pytest.raises(ValueError, match="one loss per pool record"):
        select_with("perplexity", 0.5, pool)


RECORDS = [
    {"id": "r0", "instruction": "Say hi.", "input": "", "output": "Hello"},
    {"id": "r1", "instruction": "Translate hello to French.", "input": "hello there my friend",
     "output": "Bonjour mon ami, bonjour"},
    {"id": "r2", "instruction": "Name a colour.", "input": "", "output": "red"},
    {"id": "r3", "instruction": "Repeat the words twice.", "input": "apple pear", "output": "apple pear apple pear"},
    {"id": "r4", "instruction": "Answer.", "input": "", "output": "Hi"},
]


@pytest.fixture(scope="module")
def tiny_lm():
    """A 2-layer fp32 Llama (random weights) whose tokenizer learnt the records' words."""
    from shed import tiny
    from shed.config import BaseConfig

    tokenizer = tiny.train_tokenizer([" ".join(render(r, "qa")) for r in RECORDS] * 20, 300)
    model = tiny.build_model(BaseConfig(vocab_size=300, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                                        max_length=128, pretrain_steps=0), tokenizer)
    return model.eval(), tokenizer


def one_record_loss(model, tokenizer, record: dict, cut: int = 0) -> float:
    """The mean NLL of the response tokens (and EOS) after the qa prompt, of those within the first `cut`
    tokens (0: all): one unpadded sequence, a plain forward pass."""
    import torch

    prompt, response = render(record, "qa")
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    target = target[: cut - len(context)] if cut else target
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([context + target])).logits[0].float(), -1)
    return -sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(target)) / len(target)


def test_response_losses_in_padded_batches_equal_one_record_at_a_time(tiny_lm, one_thread):
    from shed.losses import response_losses

    model, tokenizer = tiny_lm
    expected = [one_record_loss(model, tokenizer, r) for r in RECORDS]
    assert len({round(x, 4) for x in expected}) == len(RECORDS)  # distinct: the order is a real test
    for batch_size in (1, 3, 5):
        losses = response_losses(model, tokenizer, RECORDS, "qa", 0, batch_size)
        assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_response_losses_average_the_response_tokens_left_after_the_cut(tiny_lm, one_thread):
    from shed.losses import response_losses

    model, tokenizer = tiny_lm
    prompt_tokens = [len(tokenizer(render(r, "qa")[0], add_special_tokens=False)["input_ids"]) for r in RECORDS]
    assert prompt_tokens == [12, 38, 17, 29, 8]
    # cut at 12 tokens: only r4's prompt (8 tokens) leaves room for its response (2 tokens and EOS)
    losses = response_losses(model, tokenizer, RECORDS, "qa", 12, 2)
    assert [math.isinf(x) for x in losses] == [True, True, True, True, False]
    assert losses[4] == pytest.approx(one_record_loss(model, tokenizer, RECORDS[4]), rel=1e-5)
    # cut at 20: r2 keeps 3 of its 5 response tokens, and its loss is their mean
    assert response_losses(model, tokenizer, RECORDS, "qa", 20, 2)[2] == pytest.approx(
        one_record_loss(model, tokenizer, RECORDS[2], cut=20), rel=1e-5)


def user_row(i: int, record: dict) -> dict:
    """RECORDS[i]'s row as a user gave it: Dolly fields and a category."""
    return {"instruction": record["instruction"], "context": record["input"], "response": record["output"],
            "category": f"c{i}"}


def write_sample_inputs(ws, model, tokenizer) -> None:
    """The sample stage's inputs in `ws`: RECORDS as the pool (rows: `user_row`), two clusters, their scores,
    models/base."""
    import json

    (ws / "data/prepared").mkdir(parents=True)
    (ws / "data/prepared/pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (ws / "data/prepared/rows.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "source": "pool.jsonl", "at": f"line {i + 1}", "row": user_row(i, r)}) + "\n"
        for i, r in enumerate(RECORDS)))
    (ws / "data/clusters").mkdir(parents=True)
    (ws / "data/clusters/assignments.csv").write_text(
        "id,cluster,distance,proxy\n" + "".join(f"{r['id']},{i % 2},0.{i},{i < 2}\n" for i, r in enumerate(RECORDS)))
    (ws / "data/clusters/proxies.csv").write_text("cluster,proxy_id,size\n0,r0,3\n1,r1,2\n")
    (ws / "data/clusters/duplicates.csv").write_text("id,kept_id,similarity\n")
    (ws / "data/shapley").mkdir(parents=True)
    (ws / "data/shapley/scores.csv").write_text("cluster,score\n0,0.1\n1,0.2\n")
    model.save_pretrained(ws / "models/base")
    tokenizer.save_pretrained(ws / "models/base")


@pytest.mark.parametrize("method", ["cluster_uniform", "length", "perplexity"])
def test_sample_stage_writes_the_baselines_dataset_manifest_and_metrics(tmp_path, monkeypatch, tiny_lm, one_thread,
                                                                        method):
    import json

    from shed.stages.sample import main

    model, tokenizer = tiny_lm
    write_sample_inputs(tmp_path, model, tokenizer)
    monkeypatch.chdir(tmp_path)
    params = Params()
    params.sample.method, params.sample.subset_size = method, 3
    params.train.template, params.shapley.device = "qa", "cpu"
    main(params)
    ids = [r["id"] for r in RECORDS]
    expected = {"cluster_uniform": cluster_uniform({0: ["r0", "r2", "r4"], 1: ["r1", "r3"]}, 3, 0),
                "length": ["r1", "r3", "r0"],
                "perplexity": lowest_loss(ids, [one_record_loss(model, tokenizer, r) for r in RECORDS], 3)}[method]
    dataset = [json.loads(line) for line in (tmp_path / "data/curated/dataset.jsonl").read_text().splitlines()]
    assert dataset == [user_row(ids.index(i), RECORDS[ids.index(i)]) for i in expected]
    places = [json.loads(line) for line in (tmp_path / "data/curated/records.jsonl").read_text().splitlines()]
    assert places == [{"id": i, "source": "pool.jsonl", "at": f"line {ids.index(i) + 1}"} for i in expected]
    manifest = json.loads((tmp_path / "data/curated/manifest.json").read_text())
    assert (manifest["method"], manifest["size"], manifest["pool_size"], manifest["temperature"]) == (method, 3, 5, None)
    metrics = json.loads((tmp_path / "metrics/sample.json").read_text())
    assert {k: metrics[k] for k in ("method", "size", "fraction")} == {"method": method, "size": 3, "fraction": 0.6}


# --- sample.within: cluster scores decide how many, a record signal which ---
WITHIN_POOL = [{"id": f"r{i}", "instruction": "i", "input": "", "output": "o"} for i in range(6)]
# cluster 0: r0 r1 r2 (nearest first), cluster 1: r3 r4 r5; cluster 1 scores higher
WITHIN_ASSIGN = pd.DataFrame({"id": [r["id"] for r in WITHIN_POOL], "cluster": [0, 0, 0, 1, 1, 1],
                              "distance": [0.1, 0.2, 0.3, 0.1, 0.2, 0.3]})
WITHIN_SCORES = pd.DataFrame({"cluster": [0, 1], "score": [0.1, 0.9]})


def test_order_within_sorts_each_cluster_by_its_key_with_nan_last_and_ties_nearest_first():
    from shed.sampling import order_within

    members = {0: ["a", "b", "c", "d"], 1: ["e"]}
    keys = {"a": 2.0, "b": math.nan, "c": 1.0, "d": 2.0, "e": 5.0}
    assert order_within(members, keys) == {0: ["c", "a", "d", "b"], 1: ["e"]}


@pytest.mark.parametrize("within, kw, expected", [
    ("nearest", {}, ["r3", "r4", "r5", "r0"]),
    ("loss", {"losses": [0.5, 0.1, 0.9, 0.3, 0.2, 0.4]}, ["r4", "r3", "r5", "r1"]),
    ("value", {"record_scores": {"r0": 0.0, "r1": 0.0, "r2": 0.7, "r3": 0.1, "r4": 0.3, "r5": 0.2}},
     ["r4", "r5", "r3", "r2"]),
    # Superfiltering's order: IFD below 1 by IFD descending, then IFD >= 1
    ("ifd", {"ifd": [1.2, 0.5, 0.9, 1.5, 0.8, 0.6]}, ["r4", "r5", "r3", "r2"]),
    # the instruction telling most about the response first; NaN (cut to no response token) last
    ("relevance", {"relevance": [0.3, 0.2, 0.1, math.nan, 0.5, -0.2]}, ["r4", "r5", "r3", "r0"]),
])
def test_qocs_takes_the_clusters_by_score_and_their_members_by_the_within_signal(within, kw, expected):
    assert select_with("qocs", 4, WITHIN_POOL, WITHIN_ASSIGN, scores=WITHIN_SCORES, within=within, **kw) == expected


def test_qwcs_with_a_within_signal_takes_each_clusters_best_members_first():
    losses = [0.5, 0.1, 0.9, 0.3, 0.2, 0.4]
    chosen = select_with("qwcs", 4, WITHIN_POOL, WITHIN_ASSIGN, scores=WITHIN_SCORES, within="loss", losses=losses)
    by_cluster = {c: [i for i in chosen if int(i[1]) // 3 == c] for c in (0, 1)}
    for c, order in ((0, ["r1", "r0", "r2"]), (1, ["r4", "r3", "r5"])):
        assert by_cluster[c] == order[: len(by_cluster[c])]


def test_within_value_without_every_record_valued_is_a_clear_error():
    from shed.fileio import ShedError

    with pytest.raises(ShedError, match="shapley.players records"):
        select_with("qocs", 2, WITHIN_POOL, WITHIN_ASSIGN, scores=WITHIN_SCORES, within="value",
                    record_scores={"r0": 1.0})


def test_ifd_takes_the_highest_ifd_below_one_first():
    from shed.sampling import highest_ifd

    assert highest_ifd(["a", "b", "c", "d", "e"], [0.4, 1.1, 0.9, math.nan, 0.95], 4) == ["e", "c", "a", "b"]
    pool = [{"id": f"r{i}", "instruction": "i", "input": "", "output": "o"} for i in range(3)]
    assert select_with("ifd", 2, pool, ifd=[0.2, 0.7, 1.0]) == ["r1", "r0"]


def test_every_sample_method_has_a_sampler_and_says_which_signals_it_reads():
    from shed.config import SampleConfig
    from shed.stages.sample import SAMPLERS, needs

    choices = set(dataclasses.fields(SampleConfig)[0].metadata["choices"])
    assert set(SAMPLERS) == choices
    cfg = SampleConfig()
    for method, within, want in [("perplexity", "nearest", {"losses"}), ("ifd", "nearest", {"losses", "ifd"}),
                                 ("qocs", "loss", {"losses"}), ("qwcs", "ifd", {"losses", "ifd"}),
                                 ("qocs", "value", {"record_scores"}), ("random", "loss", set()),
                                 ("qwcs", "blend", {"record_scores", "losses"}),
                                 ("dsir", "nearest", {"dev"}), ("qocs", "nearest", set()),
                                 ("qfcs", "blend", {"record_scores", "losses"}), ("qfcs", "nearest", set()),
                                 ("qwcs", "relevance", {"losses", "relevance"}), ("ifd", "relevance", {"losses", "ifd"})]:
        cfg.method, cfg.within = method, within
        assert needs(cfg) == want, (method, within)
    cfg.method, cfg.within, cfg.blend = "qwcs", "blend", ["value", "relevance"]
    assert needs(cfg) == {"record_scores", "losses", "relevance"}
    cfg.blend = ["loss"]
    assert needs(cfg) == {"losses"}


CONVERSATION = {"id": "c0", "instruction": "Say hi.", "input": "", "output": "Hello", "messages": [
    {"role": "system", "content": "Answer."}, {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "red"}, {"role": "user", "content": "Repeat the words twice."},
    {"role": "assistant", "content": "apple pear apple pear"}]}


def replies_by_hand(model, tokenizer, record: dict) -> float:
    """A conversation's mean NLL over every reply's tokens (and EOS) under qa, each reply scored as the
    continuation of everything before it (`scoring.token_logliks`, one reply at a time)."""
    from shed.prompts import spans, tokenize
    from shed.scoring import token_logliks

    pieces, rows = spans(record, "qa"), []
    for k, span in enumerate(pieces):
        if span.reply:
            rows.append((tokenize(tokenizer, pieces[:k], responses_only=False)[0], tokenize(tokenizer, [span])[0]))
    scored = token_logliks(model, tokenizer, rows, 1)
    return -sum(total for total, _ in scored) / sum(count for _, count in scored)


def test_a_conversations_loss_averages_every_reply_and_alone_drops_the_user_side(tiny_lm, one_thread):
    from shed.losses import response_losses, responses_alone

    model, tokenizer = tiny_lm
    pool = RECORDS[:2] + [CONVERSATION]
    losses = response_losses(model, tokenizer, pool, "qa", 0, 3)
    assert losses[:2] == pytest.approx([one_record_loss(model, tokenizer, r) for r in RECORDS[:2]], rel=1e-5)
    assert losses[2] == pytest.approx(replies_by_hand(model, tokenizer, CONVERSATION), rel=1e-5)
    alone = responses_alone(CONVERSATION)
    assert alone["messages"] == [{"role": role, "content": content} for role, content in [
        ("user", ""), ("assistant", "Hello"), ("user", ""), ("assistant", "red"), ("user", ""),
        ("assistant", "apple pear apple pear")]]
    assert response_losses(model, tokenizer, pool, "qa", 0, 3, unconditional=True)[2] == pytest.approx(
        replies_by_hand(model, tokenizer, alone), rel=1e-5)


def test_ifd_is_the_conditional_over_the_unconditional_loss_and_the_unconditional_loss_drops_the_instruction(
        tiny_lm, one_thread):
    from shed.losses import ifd, response_losses
    from shed.sampling import relevance

    model, tokenizer = tiny_lm
    conditional = response_losses(model, tokenizer, RECORDS, "qa", 0, 2)
    alone = response_losses(model, tokenizer, RECORDS, "qa", 0, 2, unconditional=True)
    bare = [{**r, "instruction": "", "input": ""} for r in RECORDS]
    assert alone == pytest.approx([one_record_loss(model, tokenizer, r) for r in bare], rel=1e-5)
    assert ifd(conditional, alone) == pytest.approx([c / u for c, u in zip(conditional, alone)])
    assert math.isnan(ifd([math.inf], [1.0])[0]) and math.isnan(ifd([1.0], [0.0])[0])
    assert relevance(conditional, alone) == pytest.approx([u - c for c, u in zip(conditional, alone)])
    assert math.isnan(relevance([math.inf], [1.0])[0]) and relevance([1.5], [1.0]) == [-0.5]


def test_sample_stage_reads_the_forward_valuations_base_losses_instead_of_scoring_again(tmp_path, monkeypatch, tiny_lm,
                                                                                        one_thread):
    import json

    from shed.stages import sample

    model, tokenizer = tiny_lm
    write_sample_inputs(tmp_path, model, tokenizer)
    stored = [0.9, 0.1, 0.5, 0.3, 0.7]  # not the model's losses: the selection shows which were read
    (tmp_path / "data/shapley/record_scores.csv").write_text(
        "id,cluster,score,stderr,tokens,loss\n" + "".join(f"{r['id']},{i % 2},0,,3,{loss}\n"
                                                          for i, (r, loss) in enumerate(zip(RECORDS, stored))))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample, "record_losses", lambda *a, **k: pytest.fail("scored the pool again"))
    params = Params()
    params.sample.method, params.sample.subset_size = "perplexity", 3
    sample.main(params)
    chosen = [json.loads(line)["id"] for line in (tmp_path / "data/curated/records.jsonl").read_text().splitlines()]
    assert chosen == ["r1", "r3", "r2"]


def test_blend_keys_average_the_percentile_ranks_with_ties_sharing_and_nan_last():
    from shed.sampling import blend_keys

    assert blend_keys([3.0, 1.0, 2.0]) == pytest.approx([1.0, 0.0, 0.5])
    assert blend_keys([3.0, 1.0, 2.0], [0.0, 2.0, 1.0]) == pytest.approx([0.5, 0.5, 0.5])
    assert blend_keys([1.0, 1.0, math.nan]) == pytest.approx([0.25, 0.25, 1.0])


def test_qocs_with_blend_orders_members_by_value_and_loss_together():
    # cluster 1 (r3 r4 r5): value ranks r4 > r5 > r3, loss ranks r3 < r4 < r5 -> blend: r4 first, then r3 and r5 tie
    scores = {"r0": 0.0, "r1": 0.0, "r2": 0.7, "r3": 0.1, "r4": 0.3, "r5": 0.2}
    losses = [0.5, 0.1, 0.9, 0.3, 0.35, 0.4]
    chosen = select_with("qocs", 3, WITHIN_POOL, WITHIN_ASSIGN, scores=WITHIN_SCORES, within="blend",
                         record_scores=scores, losses=losses)
    assert chosen[0] == "r4" and set(chosen) == {"r3", "r4", "r5"}


def test_blend_weighs_each_listed_signal_alike_relevance_included():
    # cluster 1 (r3 r4 r5): value r4 > r5 > r3, loss r3 < r4 < r5, relevance r5 > r4 > r3
    scores = {"r0": 0.0, "r1": 0.0, "r2": 0.7, "r3": 0.1, "r4": 0.3, "r5": 0.2}
    losses = [0.5, 0.1, 0.9, 0.3, 0.35, 0.4]
    relevance = [0.0, 0.0, 0.0, 0.1, 0.2, 0.9]
    take = lambda blend: select_with("qocs", 3, WITHIN_POOL, WITHIN_ASSIGN, scores=WITHIN_SCORES, within="blend",  # noqa: E731
                                     record_scores=scores, losses=losses, relevance=relevance, blend=blend)
    assert take(["value", "loss"]) == ["r4", "r3", "r5"]
    assert take(["relevance"]) == ["r5", "r4", "r3"]
    assert take(["value", "loss", "relevance"]) == ["r4", "r5", "r3"]  # relevance puts r5 ahead of r3


def test_member_scores_are_one_minus_the_members_mean_percentile_rank_over_the_pool():
    from shed.sampling import member_scores

    members = {0: ["a", "b"], 1: ["c", "d"], 2: ["e"]}
    keys = {"a": 0.1, "b": 0.2, "c": 0.3, "d": math.nan, "e": 0.2}
    # percentile ranks a 0, b and e (tied) 3/8, c 3/4, d 1 (a NaN key last)
    assert member_scores(members, keys) == pytest.approx({0: 1 - 3 / 16, 1: 1 - 7 / 8, 2: 1 - 3 / 8})


@pytest.mark.parametrize("method", ["qocs", "qwcs", "qfcs"])
def test_cluster_score_members_ranks_the_clusters_by_the_within_signal_not_their_value(method):
    # cluster 1 scores higher (WITHIN_SCORES) but holds the three highest losses: by its members it ranks last
    # (qfcs, half left out: the lower cluster whole, then no record more, as 3 must remain)
    losses = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    take = lambda cluster_score: select_with(method, 3, WITHIN_POOL, WITHIN_ASSIGN, scores=WITHIN_SCORES,  # noqa: E731
                                             within="loss", losses=losses, cluster_score=cluster_score, exclude=0.5)
    assert set(take("value")) == {"r3", "r4", "r5"}
    assert set(take("members")) == {"r0", "r1", "r2"}


def test_cluster_score_members_needs_a_within_signal():
    from shed.config import validate
    from shed.fileio import ShedError

    params = Params()
    params.sample.cluster_score = "members"
    with pytest.raises(ShedError, match="sample.cluster_score.*sample.within"):
        validate(params, "params.yaml")
    params.sample.within = "loss"
    validate(params, "params.yaml")


def test_sample_blend_names_known_signals_each_once():
    from shed.config import validate
    from shed.fileio import ShedError

    for bad in ([], ["value", "value"], ["value", "perplexity"]):
        params = Params()
        params.sample.blend = bad
        with pytest.raises(ShedError, match="sample.blend"):
            validate(params, "params.yaml")


def test_sample_stage_orders_by_relevance_from_the_loss_given_the_instruction_and_alone(tmp_path, monkeypatch,
                                                                                          tiny_lm, one_thread):
    import json

    from shed.losses import response_losses
    from shed.sampling import relevance
    from shed.stages.sample import main

    model, tokenizer = tiny_lm
    write_sample_inputs(tmp_path, model, tokenizer)
    monkeypatch.chdir(tmp_path)
    params = Params()
    params.sample.method, params.sample.within, params.sample.subset_size = "qocs", "relevance", 5
    params.train.template, params.shapley.device = "qa", "cpu"
    main(params)
    given = response_losses(model, tokenizer, RECORDS, "qa", 0, 2)
    alone = response_losses(model, tokenizer, RECORDS, "qa", 0, 2, unconditional=True)
    pmi = dict(zip([r["id"] for r in RECORDS], relevance(given, alone)))
    # qocs takes cluster 1 (r1 r3, scored higher) whole, then cluster 0 (r0 r2 r4): each by relevance, highest first
    expected = sorted(["r1", "r3"], key=lambda i: -pmi[i]) + sorted(["r0", "r2", "r4"], key=lambda i: -pmi[i])
    chosen = [json.loads(line)["id"] for line in (tmp_path / "data/curated/records.jsonl").read_text().splitlines()]
    assert chosen == expected
    assert json.loads((tmp_path / "data/curated/manifest.json").read_text())["within"] == "relevance"


def test_sample_stage_ranks_clusters_by_their_members_relevance_and_records_it(tmp_path, monkeypatch, tiny_lm,
                                                                                one_thread):
    import json

    from shed.losses import response_losses
    from shed.sampling import member_scores, relevance
    from shed.stages.sample import main

    model, tokenizer = tiny_lm
    write_sample_inputs(tmp_path, model, tokenizer)
    (tmp_path / "data/shapley/scores.csv").write_text("cluster,score\n0,0.9\n1,0.1\n")  # value would take cluster 0
    monkeypatch.chdir(tmp_path)
    params = Params()
    params.sample.method, params.sample.within, params.sample.subset_size = "qocs", "relevance", 2
    params.sample.cluster_score = "members"
    params.train.template, params.shapley.device = "qa", "cpu"
    main(params)
    given = response_losses(model, tokenizer, RECORDS, "qa", 0, 2)
    alone = response_losses(model, tokenizer, RECORDS, "qa", 0, 2, unconditional=True)
    keys = {i: -v for i, v in zip([r["id"] for r in RECORDS], relevance(given, alone))}
    members = {0: ["r0", "r2", "r4"], 1: ["r1", "r3"]}
    scores = member_scores(members, keys)
    top = max(scores, key=lambda c: (scores[c], -c))
    assert top == 1  # the members' relevance, not the Shapley scores, decided
    expected = sorted(members[top], key=lambda i: keys[i])[:2]
    chosen = [json.loads(line)["id"] for line in (tmp_path / "data/curated/records.jsonl").read_text().splitlines()]
    assert chosen == expected
    manifest = json.loads((tmp_path / "data/curated/manifest.json").read_text())
    assert (manifest["within"], manifest["cluster_score"]) == ("relevance", "members")
    assert json.loads((tmp_path / "metrics/sample.json").read_text())["cluster_score"] == "members"
