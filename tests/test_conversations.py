"""Multi-turn conversations end to end: a ShareGPT pool and an OpenAI pool (a system prompt and three exchanges per
row) go through prepare, base, embed, cluster, shapley and sample on the tiny model, every turn kept and every
reply trained on."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import run_stage, write_stage_params

from shed import artifacts

TOPICS = ["apples", "rivers", "violins", "glaciers", "lanterns", "otters", "comets", "bridges", "tulips", "kettles",
          "deserts", "pianos", "beetles", "harbours", "mosses", "kites"]
COLOURS = ["red", "blue", "green", "grey", "gold", "brown", "white", "black"]


def conversation(i: int, topic: str) -> list[tuple[str, str]]:
    """(role, text) turns: a system prompt, then three exchanges about `topic`."""
    colour, other = COLOURS[i % len(COLOURS)], COLOURS[(i + 3) % len(COLOURS)]
    return [("system", f"You answer questions about {topic} in one short sentence."),
            ("user", f"What colour are {topic}?"), ("assistant", f"Most {topic} I know are {colour}."),
            ("user", f"And the rarest {topic}?"), ("assistant", f"The rarest {topic} are {other}."),
            ("user", f"Say something kind about {topic}."), ("assistant", f"Everyone likes {topic} number {i}.")]


LAYOUTS = {
    "sharegpt": lambda turns: {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(role, role),
                                                  "value": text} for role, text in turns]},
    "openai": lambda turns: {"messages": [{"role": role, "content": text} for role, text in turns]},
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_conversation_pool_goes_from_prepare_to_sample_with_every_turn(tmp_path, layout):
    write_stage_params(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["prepare"]["pool"] = "pool.jsonl"
    params["cluster"]["C"] = 4
    params["train"]["max_length"] = 256  # the tiny base model's own: no reply cut
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    conversations = [conversation(i, topic) for i, topic in enumerate(TOPICS)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(LAYOUTS[layout](turns)) + "\n" for turns in conversations))

    for stage in ["prepare", "base", "embed", "cluster", "shapley", "sample"]:
        run_stage(tmp_path, stage)

    pool = [json.loads(line) for line in (tmp_path / artifacts.POOL).read_text().splitlines()]
    assert [[(m["role"], m["content"]) for m in r["messages"]] for r in pool] == conversations  # every turn, in order
    assert [(r["instruction"], r["input"], r["output"]) for r in pool] == [(c[1][1], "", c[2][1])
                                                                           for c in conversations]
    assert (tmp_path / artifacts.EMBED_IDS).read_text().split() == [r["id"] for r in pool]
    assert np.isfinite(np.load(tmp_path / artifacts.EMBEDDINGS)).all()

    # The valued proxies were trained and scored on every reply: their labelled tokens are all three replies' (and
    # EOS after each), as the base model's tokenizer counts them.
    from shed.models import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "models/base"))
    by_id = {r["id"]: r for r in pool}
    valued = pd.read_csv(tmp_path / artifacts.RECORD_SCORES, dtype={"id": str})
    assert len(valued) == 4 and np.isfinite(valued["score"]).all()
    for rid, tokens in zip(valued["id"], valued["tokens"]):
        replies = [m["content"] for m in by_id[rid]["messages"] if m["role"] == "assistant"]
        assert tokens == sum(len(tokenizer(" " + reply, add_special_tokens=False)["input_ids"]) + 1
                             for reply in replies)
    jobs = [json.loads(line) for line in (tmp_path / artifacts.JOBS).read_text().splitlines()]
    assert jobs and all(np.isfinite(job["train_loss"]) for job in jobs if job["size"])

    # The curated set: each selected line holds one whole conversation (every turn's text, whatever the layout).
    curated = (tmp_path / artifacts.DATASET).read_text().splitlines()
    assert len(curated) == 2  # 10% of 16
    for line in curated:
        assert sum(all(text in line for _, text in turns) for turns in conversations) == 1
    # sample.method full: the curated rows are the input rows, JSON-equal (every field, every turn).
    params["sample"]["method"] = "full"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage(tmp_path, "sample")
    given = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    curated = [json.loads(line) for line in (tmp_path / artifacts.DATASET).read_text().splitlines()]
    assert sorted(curated, key=json.dumps) == sorted(given, key=json.dumps) and len(curated) == len(given)
