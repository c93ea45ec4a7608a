"""Multi-process training through the shipped accelerate FSDP2 config: two CPU processes (gloo) run the tiny stage-2
recipe, padded and padding-free packed with `internvl_varlen` attention, and agree. Slow (~1-2 min):

    pytest -q -m slow tests/test_fsdp.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_training import TINY, TOKENIZERS

CONFIG = Path(__file__).parents[1] / "src" / "internvl_chat" / "training" / "configs" / "fsdp.yaml"


@pytest.fixture
def toy(tmp_path):
    from internvl_chat.training.toydata import write_toy_dataset

    write_toy_dataset(tmp_path / "toy")
    return str(tmp_path / "toy")


def _launch(tmp_path, toy_folder, name, *overrides):
    # The shipped config, only moved to 2 CPU processes (no GPU here) in fp32.
    config = yaml.safe_load(CONFIG.read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    config_file = tmp_path / "fsdp_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "-m",
        "internvl_chat.training.train",
        str(TINY / "llava-finetune.yaml"),
        "--model.pretrain_mm_mlp_adapter",
        "null",
        "--model.tokenizer",
        str(TOKENIZERS / "vicuna-v1.5"),
        "--data.builtin_folder",
        toy_folder,
        "--training.output_dir",
        str(out),
        "--training.gradient_checkpointing",
        "false",
        "--training.warmup_ratio",
        "0",
        "--training.disable_tqdm",
        "true",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "train_summary.json").read_text())


@pytest.mark.slow
def test_fsdp_two_processes_padded_and_packed_varlen_agree(tmp_path, toy):
    from internvl_chat import InternVLChatForConditionalGeneration

    _, padded = _launch(tmp_path, toy, "padded")
    packed_dir, packed = _launch(
        tmp_path, toy, "packed", "--data.packing", "true", "--model.attn_implementation", "internvl_varlen"
    )
    assert padded["global_step"] == packed["global_step"] == 2
    # Same samples per step on each rank: the padding-free rows with varlen attention give the padded loss.
    assert packed["first_loss"] == pytest.approx(padded["first_loss"], rel=1e-5)
    assert packed["last_loss"] == pytest.approx(padded["last_loss"], rel=1e-4)
    # The sharded run writes one full checkpoint that loads back.
    model = InternVLChatForConditionalGeneration.from_pretrained(packed_dir)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_fsdp_bench_runs_on_two_processes_with_a_text_only_batch(tmp_path):
    """`bench/stage2_fsdp.py` on 2 CPU processes (tiny shapes): the second rank's last batch has no image, which
    desynchronised FSDP's collectives before the model ran its tower on a blank image in that case."""
    bench = Path(__file__).parents[1] / "bench" / "stage2_fsdp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    common = ["--cpu", "--tiny", "--samples", "8", "--batch-size", "2", "--variants", "ours_varlen"]
    run = [sys.executable, "-m", "torch.distributed.run"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for procs, extra in (("1", ["--out", str(one)]), ("2", ["--baseline", str(one), "--out", str(two)])):
        proc = subprocess.run(
            [*run, "--nproc-per-node", procs, str(bench), *common, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(two.read_text())
    assert result["world_size"] == 2 and result["sharding"].startswith("FSDP2")
    assert isinstance(result["ours_varlen"], dict) and result["scaling_efficiency"]["ours_varlen"] > 0
