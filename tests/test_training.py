"""LoRA training: the saved adapter is a DVC output, so its bytes must not depend on the process."""

import json
import os
import subprocess
import sys

import pytest

from shed.config import TrainConfig

pytestmark = pytest.mark.slow  # three fresh processes (~6 s of imports each)

SAVE_ADAPTER = """
import sys
from shed import tiny
from shed.config import BaseConfig, TrainConfig
from shed.training import LoraTrainer
tok = tiny.train_tokenizer(["a b c d e f"] * 20, 270)
model = tiny.build_model(BaseConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_length=64), tok)
LoraTrainer(model, tok, TrainConfig()).model.save_pretrained(sys.argv[1], safe_serialization=True)
"""


def test_adapter_config_is_byte_identical_across_processes(tmp_path):
    # String hashing is salted per process (PYTHONHASHSEED): a set of target modules saved as
    # it iterates would list them in a different order in each run.
    configs = []
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", SAVE_ADAPTER, str(out)], env=env, check=True, capture_output=True)
        configs.append((out / "adapter_config.json").read_bytes())
    assert configs[0] == configs[1] == configs[2]
    # All seven default targets exist in a Llama and are listed sorted (not in set order).
    assert json.loads(configs[0])["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert sorted(TrainConfig().lora.target_modules) == json.loads(configs[0])["target_modules"]
