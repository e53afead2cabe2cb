import pytest

from shed.config import load_params
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
