"""Data-parallel training: 2 CPU ranks under torchrun (gloo) give the adapter of one process with the same global
batch, for DDP and FSDP2, and an FSDP run resumes from its (gathered) checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import demo_rows, make_tiny_llama, write_jsonl, write_recipe

pytestmark = pytest.mark.xdist_group("train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], ranks: int = 1) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                    f"--master_port={_free_port()}", "-m", "deltatune.cli"]
    else:
        launcher = [sys.executable, "-m", "deltatune.cli"]
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_llama(root / "model")
    write_jsonl(root / "train.jsonl", demo_rows("train", 24))
    recipe = write_recipe(root / "recipe.yaml", model=str(model), method="lora",
                          delta={"r": 4, "alpha": 8, "targets": "all-linear"},
                          data={"train": "train.jsonl", "max_length": 128}, batch_size=2, grad_accum=2, steps=6,
                          optimizer={"lr": 5e-3}, precision="fp32", eval={"before": False})
    single = root / "single"
    _run(["train", str(recipe), "--quiet", "--set", "batch_size=4", "--set", f"output_dir={single}"])
    return root, recipe, _adapter(single)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(setup, strategy):
    root, recipe, expected = setup
    out = root / strategy
    _run(["train", str(recipe), "--quiet", "--set", f"distributed={strategy}", "--set", f"output_dir={out}"], ranks=2)
    got = _adapter(out)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
    assert not (out / "adapter" / "rank1").exists()


def test_fsdp_checkpoint_resumes_exactly(setup):
    """Finish a 6-step FSDP run, roll it back to its step-4 checkpoint (as if killed there) and resume."""
    import shutil

    root, recipe, _ = setup
    out = root / "fsdp-resume"
    common = ["--quiet", "--set", "distributed=fsdp", "--set", f"output_dir={out}", "--set", "checkpoint.every=2"]
    _run(["train", str(recipe), *common], ranks=2)
    finished = _adapter(out)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    shutil.rmtree(out / "adapter")
    _run(["train", str(recipe), *common, "--resume"], ranks=2)
    resumed = _adapter(out)
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key], rtol=0, atol=1e-6, msg=key)
