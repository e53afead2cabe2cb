import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from shed.config import Params, as_dict, describe, load_params
from shed.fileio import ShedError


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_fill_missing_blocks(tmp_path):
    params = load_params(write(tmp_path, "cluster:\n  C: 10\n"))
    assert params.cluster.C == 10 and params.sample.method == "qocs"


def test_shipped_params_file_is_valid():
    params = load_params("params.yaml")
    assert params.prepare.pool == "embedded"


@pytest.mark.parametrize("text,message", [
    ("sample:\n  method: best\n", "sample.method: unknown value 'best'"),
    ("shapley:\n  n: 0\n", "shapley.n: must be at least 1"),
    ("shapley:\n  dev_neighbours: -1\n", r"shapley.dev_neighbours: must be 0 \(whole dev set\) or positive"),
    ("shapley:\n  value: accuracy\n", "shapley.dev_neighbours: needs per-question scores"),
    ("cluster:\n  C: 5\nshapley:\n  n: 6\n", "shapley.n: must not exceed cluster.C=5"),
    ("sample:\n  subset_size: -1\n", "sample.subset_size: must be positive"),
    ("cluster:\n  C: ten\n", "cluster.C: expected an integer"),
    ("clutser:\n  C: 10\n", "clutser: unknown key"),
    ("train:\n  template: pirate\n", "train.template: unknown value 'pirate'"),
    ("sample: [1, 2\n", "not valid YAML"),
])
def test_bad_params_name_the_key(tmp_path, text, message):
    with pytest.raises(ShedError, match=message):
        load_params(write(tmp_path, text))


def test_no_param_is_named_like_a_key_the_dvc_run_cache_ignores():
    from shed.config import Params, as_dict

    def keys(d):
        for k, v in d.items():
            yield k
            if isinstance(v, dict):
                yield from keys(v)

    assert not {"size", "nfiles"} & set(keys(as_dict(Params())))


ROOT = Path(__file__).resolve().parents[1]


def test_the_schema_defaults_are_the_shipped_params_file():
    """One set of defaults: Params() is exactly what params.yaml spells out (the embedded default)."""
    assert as_dict(Params()) == yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def rules():
    """(dotted key, a value its choices or bounds refuse) for every field that has a rule."""
    def walk(obj, where):
        for f in dataclasses.fields(obj):
            key, value, meta = f"{where}.{f.name}" if where else f.name, getattr(obj, f.name), f.metadata
            if dataclasses.is_dataclass(value):
                yield from walk(value, key)
            elif "choices" in meta:
                yield key, ["no_such_choice"] if isinstance(value, list) else "no_such_choice"
            elif {"ge", "gt", "le", "lt"} & set(meta):
                step = 1 if isinstance(value, int) else 0.5
                bad = (meta["ge"] - step if "ge" in meta else meta["gt"] if "gt" in meta
                       else meta["le"] + step if "le" in meta else meta["lt"])
                yield key, type(value)(bad)
    return list(walk(Params(), ""))


def nested(key, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def test_every_block_field_has_help():
    def walk(obj):
        for f in dataclasses.fields(obj):
            assert f.metadata.get("help"), f"{type(obj).__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                walk(getattr(obj, f.name))
    walk(Params())


@pytest.mark.parametrize("key,bad", rules(), ids=[key for key, _ in rules()])
def test_each_rule_refuses_a_bad_value_in_one_line(tmp_path, key, bad):
    path = write(tmp_path, yaml.safe_dump(nested(key, bad)))
    with pytest.raises(ShedError) as exc:
        load_params(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {key}: ") and "\n" not in message
    assert ("unknown" in message) if isinstance(bad, (str, list)) else ("must be" in message)


@pytest.mark.parametrize("text,message", [
    ("base:\n  heads: 5\n", "params.yaml: base.hidden_size: must be a multiple of base.heads=5"),
    ("sample:\n  subset_size: 2.5\n", "params.yaml: sample.subset_size: a count must be a whole number, got 2.5"),
    ("prepare:\n  embedded:\n    corrupt_fraction: 1\n",
     "params.yaml: prepare.embedded.corrupt_fraction: must be in [0, 1), got 1.0"),
    ("train:\n  max_grad_norm: -1\n", "params.yaml: train.max_grad_norm: must be 0 (off) or positive, got -1.0"),
    ("prepare:\n  max_records: -1\n", "params.yaml: prepare.max_records: must be 0 (all) or positive, got -1"),
    ("shapley:\n  dtype: float64\n",
     "params.yaml: shapley.dtype: unknown value 'float64' (choose one of auto, bf16, bfloat16, float16, float32, fp16, fp32)"),
    # Moved here from the embed and evaluate stages: refused before any stage starts.
    ("embed:\n  fields: [instruction, title]\n",
     "params.yaml: embed.fields: unknown field 'title' (instruction, input, output)"),
    ("evaluate:\n  tasks: [mmlu_local]\n", "params.yaml: evaluate.mmlu_dir: needed by task mmlu_local (a path), got ''"),
    ("evaluate:\n  tasks: [shed_embedded, arc_challenge_local]\n  mmlu_dir: mmlu\n",
     "params.yaml: evaluate.arc_file: needed by task arc_challenge_local (a path), got ''"),
])
def test_messages_users_see(tmp_path, text, message):
    with pytest.raises(ShedError) as exc:
        load_params(write(tmp_path, text))
    assert str(exc.value).endswith(message)


def test_file_tasks_with_their_paths_and_a_subset_of_fields_are_valid(tmp_path):
    params = load_params(write(tmp_path, "embed:\n  fields: output\nevaluate:\n  tasks: [mmlu_local, "
                                         "arc_challenge_local]\n  mmlu_dir: mmlu\n  arc_file: arc.jsonl\n"))
    assert params.embed.fields == ["output"] and params.evaluate.arc_file == "arc.jsonl"


def test_describe_gives_key_value_and_help_with_the_rule(tmp_path):
    params = load_params(write(tmp_path, "train:\n  lora:\n    r: 8\n"))
    rows = {key: (value, text) for key, value, text in describe("train", params)}
    assert rows["train.lora.r"][0] == 8 and "at least 1" in rows["train.lora.r"][1]
    assert "one of qa, alpaca, vicuna, chat" in rows["train.template"][1]
    assert "0 (off) or positive" in rows["train.max_grad_norm"][1]
    assert describe("embed.model", params) == [describe("embed")[0]]
    assert [key for key, _, _ in describe("cluster")] == ["cluster.C", "cluster.algorithm", "cluster.seed",
                                                         "cluster.dedup_threshold"]


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_is_valid_params(preset):
    sys.path.insert(0, str(ROOT / "presets"))
    from apply import check

    check(yaml.safe_load(preset.read_text(encoding="utf-8")), [], str(ROOT / "params.yaml"))
