"""The DSIR baseline: importance weights from the data-selection package, a seeded Gumbel top-k draw."""

import numpy as np

from shed import dsir
from shed.records import question_as_record, record_text
from shed.sampling import dsir_sample

TARGET = ["What is the capital of France?\nParis", "What is the capital of Peru?\nLima"]
RAW = ["What is the capital of Chile?\nSantiago", "Sort these numbers: 3 1 2\n1 2 3",
       "Write a poem about rain.\nDrops fall.", "What is the capital of Spain?\nMadrid"]


def test_weights_favour_text_like_the_target():
    w = dsir.log_importance_weights(RAW, TARGET)
    assert w.shape == (4,)
    assert min(w[0], w[3]) > max(w[1], w[2])


def test_dsir_sample_is_seeded_without_replacement_and_follows_the_weights():
    ids = [f"r{i}" for i in range(50)]
    weights = np.where(np.arange(50) < 5, 20.0, 0.0)  # five records dominate
    first = dsir_sample(ids, weights, 10, seed=0)
    assert first == dsir_sample(ids, weights, 10, seed=0)
    assert len(set(first)) == 10 and set(first[:5]) == {"r0", "r1", "r2", "r3", "r4"}
    assert dsir_sample(ids, np.zeros(50), 10, seed=0) != dsir_sample(ids, np.zeros(50), 10, seed=1)


def test_question_text_is_the_question_with_its_answer():
    q = {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}
    assert record_text(question_as_record(q)) == "2 + 2?\n4"


def test_sample_stage_selects_dsir_at_the_requested_size():
    import pandas as pd

    from shed.config import Params
    from shed.stages.sample import Inputs, select

    params = Params()
    params.sample.method, params.sample.subset_size = "dsir", 0.5
    pool = [{"id": f"r{i}", "instruction": t.split("\n")[0], "input": "", "output": t.split("\n")[1]}
            for i, t in enumerate(RAW)]
    dev = [{"question": t.split("\n")[0], "choices": [t.split("\n")[1]], "answer": 0} for t in TARGET]
    chosen = select(params, Inputs(pool, pd.DataFrame(), pd.DataFrame(), dev=dev))
    assert sorted(chosen) == ["r0", "r3"]
