"""shed.env: kernel and thread pinning (set by `shed` before torch loads), and the environment every
stage's metrics record (shed.artifacts.write_metrics)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shed import artifacts, env

PIN_VARS = (*env.PINNED, *env.THREAD_VARS, "SHED_THREADS", env.OPT_IN)


@pytest.fixture
def clean_env(monkeypatch):
    for var in PIN_VARS:
        # setenv first: monkeypatch restores only what it recorded, and delenv of an unset variable records
        # nothing, so what env.pin() then sets would leak into every later test's subprocesses.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv(env.OPT_IN, "1")
    return monkeypatch


def test_pinning_is_opt_in(clean_env):
    clean_env.delenv(env.OPT_IN)
    env.pin()
    assert not any(var in os.environ for var in (*env.PINNED, *env.THREAD_VARS))


def test_pin_sets_defaults_and_keeps_what_the_user_set(clean_env):
    clean_env.setenv("MKL_CBWR", "COMPATIBLE")
    env.pin()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"  # the user's choice wins
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(env.THREADS)


def test_thread_count_comes_from_shed_threads_then_omp(clean_env):
    assert env.threads() == env.THREADS
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert env.threads() == 3
    clean_env.setenv("SHED_THREADS", "1")
    assert env.threads() == 1
    clean_env.delenv("OMP_NUM_THREADS")
    env.pin()
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_describe_is_stable_json_with_versions_kernels_and_device(clean_env):
    env.pin()
    first = env.describe()
    assert first == env.describe() == json.loads(json.dumps(first))
    assert any(v.startswith("torch==") for v in first["versions"])
    assert any(v.startswith("transformers==") for v in first["versions"])
    assert "MKL_CBWR=AVX2" in first["kernels"] and first["device"] == ["cpu"]
    assert env.describe("cuda:0")["device"] == ["cuda:0"]


def test_write_metrics_adds_env_and_the_headline_to_the_stage_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    artifacts.write_metrics("shapley", {"seconds": 3.5, "jobs": 12}, headline={"shapley_s": 3.5})
    artifacts.write_metrics("evaluate", {"finetuned": {"t1": {"acc": 0.5}}}, device="cuda:0")
    first = Path(artifacts.metrics("shapley")).read_bytes()
    assert json.loads(first) == {"seconds": 3.5, "jobs": 12, "shapley_s": 3.5, "env": env.describe()}
    assert json.loads(Path(artifacts.metrics("evaluate")).read_text())["env"]["device"] == ["cuda:0"]
    artifacts.write_metrics("shapley", {"seconds": 3.5, "jobs": 12}, headline={"shapley_s": 3.5})
    assert Path(artifacts.metrics("shapley")).read_bytes() == first  # rerun: same bytes (no timestamps)
    assert sorted(p.name for p in Path("metrics").iterdir()) == ["eval.json", "shapley.json"]


def test_the_shed_entry_point_pins_before_numpy_and_torch_load():
    code = ("import sys, os\nimport shed.cli\nimport torch\n"
            "print(os.environ['MKL_CBWR'], os.environ['OPENBLAS_CORETYPE'], torch.get_num_threads())")
    environ = {**{k: v for k, v in os.environ.items() if k not in PIN_VARS}, env.OPT_IN: "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["AVX2", "Haswell", str(env.THREADS)]


def _intel_with_avx2() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "GenuineIntel" in cpuinfo and " avx2" in cpuinfo


# Layers of the kinds the pipeline runs (matmuls, softmax, layer norm, GELU, a reduction), trained a few
# steps: its bytes depend on which kernels ran.
KERNELS = """
import hashlib
import shed.cli  # the `shed` entry point: pins before numpy and torch load
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(96, 384), torch.nn.GELU(), torch.nn.LayerNorm(384), torch.nn.Linear(384, 96))
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x = torch.randn(512, 96)
for _ in range(5):
    a = torch.softmax(x @ x.T / 10, dim=-1) @ x
    loss = (net(a) - x).pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
blob = b"".join(p.detach().numpy().tobytes() for p in net.parameters())
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(blob).hexdigest())
"""


def _run(extra: dict) -> tuple[str, str]:
    environ = {**{k: v for k, v in os.environ.items() if k not in PIN_VARS}, env.OPT_IN: "1"}
    result = subprocess.run([sys.executable, "-c", KERNELS], capture_output=True, text=True, env={**environ, **extra})
    assert result.returncode == 0, result.stderr[-2000:]
    capability, digest = result.stdout.split()[-2:]
    return capability, digest


@pytest.mark.slow
@pytest.mark.skipif(not _intel_with_avx2(), reason="MKL's AVX2 branch is reproducible on Intel CPUs with AVX2 only "
                                                  "(MKL runs other code on AMD): docs/method.md#reproducibility")
def test_pinned_kernels_give_the_same_bytes_whatever_mkl_would_pick():
    """MKL's own choice of instruction set (AVX-512 on this kind of Xeon, AVX2 on older ones) no longer changes
    the bytes, and ATen runs its AVX2 kernels. (ATen's and oneDNN's instruction sets are pinned outright.)"""
    pinned = _run({})
    assert pinned[0] == "AVX2"
    # MKL free to use its AVX-512 code (an empty value is no instruction cap): MKL_CBWR still holds it to AVX2.
    assert _run({"MKL_ENABLE_INSTRUCTIONS": ""}) == pinned
    # An older Intel CPU: MKL and oneDNN stop at AVX2 (ATen and OpenBLAS are pinned there already).
    assert _run({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}) == pinned
