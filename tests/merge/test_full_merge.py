"""Full-model merges: out of core (memory bound), sharded loadable output, and one clear error with no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltatune import DeltatuneError
from deltatune.cli import main
from deltatune.merging import parse_merge_config, run_merge
from deltatune.merging.checkpoint import Checkpoint
from deltatune.merging.config import evaluate_setting


def _toy_checkpoint(directory: Path, seed: int, tensors: int, size: int) -> str:
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    half = tensors // 2  # two shards, to exercise the index
    for shard in range(2):
        save_file({f"layers.{i}.w": torch.randn(size, generator=g) for i in range(shard * half, (shard + 1) * half)},
                  directory / f"model-{shard}.safetensors")
    (directory / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
    return str(directory)


def _ties(models: list[str]) -> dict:
    return {"merge_method": "ties", "base_model": models[0], "parameters": {"density": 0.5},
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models[1:]]}


def test_inputs_are_read_one_tensor_at_a_time(tmp_path, monkeypatch):
    models = [_toy_checkpoint(tmp_path / f"m{i}", i, tensors=12, size=50_000) for i in range(3)]
    live, peak = [0], [0]
    read = Checkpoint.read

    def counting_read(self, name):
        tensor = read(self, name)
        live[0] += tensor.nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda n=tensor.nbytes: live.__setitem__(0, live[0] - n))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    run_merge(parse_merge_config(_ties(models)), tmp_path / "out")
    one_tensor = 50_000 * 4
    assert peak[0] <= 3 * one_tensor  # the three models' copies of one tensor, never more
    assert live[0] == 0


def test_peak_memory_stays_near_a_few_tensors(tmp_path):
    """RSS growth during a TIES merge of 3 × 32 MB models stays under 16 tensors (of 2 MB), in a fresh process."""
    models = [_toy_checkpoint(tmp_path / f"m{i}", i, tensors=16, size=1 << 19) for i in range(3)]
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(_ties(models)))
    script = textwrap.dedent(f"""
        import resource, torch
        from deltatune.merging import load_merge_config, run_merge
        from deltatune.merging.registry import get_merge_method
        get_merge_method("ties")([torch.randn(1 << 19)] * 2, torch.randn(1 << 19), density=0.5)  # warm allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run_merge(load_merge_config({str(tmp_path / 'merge.yaml')!r}), {str(tmp_path / 'out')!r})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    growth_mb = int(done.stdout.split()[-1]) / 1024
    print(f"peak RSS growth {growth_mb:.1f} MB")
    assert growth_mb < 32, f"peak RSS grew by {growth_mb:.0f} MB for 96 MB of models"


def test_output_is_sharded_and_loads_in_transformers(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = {"merge_method": "linear", "models": [{"model": m} for m in tiny_models[:2]], "shard_size": "4KB",
           "out_dtype": "bfloat16"}
    out = run_merge(parse_merge_config(raw), tmp_path / "merged")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = (load_file(Path(m) / "model.safetensors") for m in tiny_models[:2])
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p.float(), ((a[name] + b[name]) / 2).bfloat16().float())
    assert (out / "deltatune_merge.yaml").is_file()


def test_copies_the_tokenizer(tmp_path):
    from train_helpers import make_tiny_llama
    from transformers import AutoTokenizer

    base = make_tiny_llama(tmp_path / "base")
    raw = {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(base)}]}
    out = run_merge(parse_merge_config(raw), tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids == AutoTokenizer.from_pretrained(base)("hello").input_ids


def _broken_copy(source: str, target: Path, edit) -> str:
    target.mkdir()
    tensors = load_file(Path(source) / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors")
    (target / "config.json").write_text((Path(source) / "config.json").read_text())
    return str(target)


@pytest.mark.parametrize("problem", ["shape", "missing", "architecture", "nan", "unknown_key", "method", "param"])
def test_bad_input_is_one_error_and_no_output(problem, tiny_models, tmp_path):
    m0, m1, _ = tiny_models
    raw = _ties([m0, m1])
    match = {"shape": "different shapes", "missing": "missing from model", "architecture": "different architectures",
             "nan": "NaN/Inf", "unknown_key": "unknown key.*modles", "method": "unknown merge method",
             "param": "unknown parameter.*densty"}[problem]
    if problem == "shape":
        raw["models"][0]["model"] = _broken_copy(m1, tmp_path / "bad", lambda t: t.update(
            {"model.norm.weight": torch.ones(17)}))
    elif problem == "missing":
        raw["models"][0]["model"] = _broken_copy(m1, tmp_path / "bad", lambda t: t.pop("model.norm.weight"))
    elif problem == "architecture":
        bad = _broken_copy(m1, tmp_path / "bad", lambda t: None)
        (Path(bad) / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
        raw["models"][0]["model"] = bad
    elif problem == "nan":
        raw = {"merge_method": "linear", "models": [{"model": m0, "parameters": {"weight": 1.0}},
                                                   {"model": m1, "parameters": {"weight": -1.0}}]}
    elif problem == "unknown_key":
        raw["modles"] = []
    elif problem == "method":
        raw["merge_method"] = "tie"
    else:
        raw["parameters"] = {"densty": 0.5}
    with pytest.raises(DeltatuneError, match=match):
        run_merge(parse_merge_config(raw), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging directory left


def test_refuses_a_non_empty_output_directory(tiny_models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DeltatuneError, match="exists and is not empty"):
        run_merge(parse_merge_config(_ties(tiny_models[:2])), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_parameters_by_filter_and_gradient():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate_setting([1.0, 0.0, 1.0], "x", 0.75) == 0.5
    rules = [{"filter": "mlp", "value": 0.7}, {"filter": "self_attn", "value": [0, 1]}, {"value": 0.3}]
    assert evaluate_setting(rules, "model.layers.1.mlp.up_proj.weight", 1.0) == 0.7
    assert evaluate_setting(rules, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(rules, "model.norm.weight", 0.0) == 0.3
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "attn", 0) is None


def test_cli_merge_and_its_errors(tiny_models, tmp_path, capsys):
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump(_ties(tiny_models)))
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    config.write_text(yaml.safe_dump({**_ties(tiny_models), "dtype": "float13"}))
    assert main(["merge", str(config), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dtype must be one of" in err and not (tmp_path / "out2").exists()
