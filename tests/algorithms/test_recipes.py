"""The recipe fields `initialize:` and `optimizer:` drive the algorithms through the trainer, end to end on a tiny
Llama: a data-driven init before the first step, a registered optimizer, a rank schedule's `after_step`, and the
saved adapter reloads with the trained outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import demo_rows, make_tiny_llama, write_jsonl, write_recipe

import deltatune
import deltatune.algorithms
import deltatune.methods.adalora
from deltatune import DeltatuneError
from deltatune.train.loop import train
from deltatune.train.recipe import load_recipe

pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(tmp_path: Path, tiny: Path, **fields) -> Path:
    write_jsonl(tmp_path / "train.jsonl", demo_rows("train", 16))
    write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval", 2))
    base = {"model": str(tiny), "method": "lora", "delta": {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
            "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 96}, "batch_size": 4, "steps": 3,
            "eval": {"max_new_tokens": 1, "before": False}, "precision": "fp32", "output_dir": str(tmp_path / "out")}
    return write_recipe(tmp_path / "recipe.yaml", **(base | fields))


CASES = {
    "eva+lorafa": {"initialize": {"name": "eva", "batches": 2}, "optimizer": {"name": "lorafa", "lr": 1e-3}},
    "corda_kpm+riemannian": {"initialize": {"name": "corda", "batches": 2, "options": {"mode": "kpm"}},
                             "optimizer": {"name": "riemannian", "lr": 1e-3, "options": {"damping": 0.01}}},
    "pissa+lora_pro": {"delta": {"r": 2, "alpha": 4, "init": "pissa", "targets": ["q_proj", "v_proj"]},
                       "optimizer": {"name": "lora_pro", "lr": 1e-3}},
    "adalora": {"method": "adalora", "delta": {"init_r": 3, "target_r": 2, "alpha": 4.0, "total_step": 3,
                                               "tinit": 0, "tfinal": 0, "delta_t": 1, "targets": ["q_proj"]}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recipe_trains_saves_and_reloads(case, tmp_path, tiny):
    recipe = load_recipe(_recipe(tmp_path, tiny, **CASES[case]))
    results = train(recipe, progress=False)
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert results["trainable_parameters"] > 0
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        before = base(ids).logits
    deltatune.load(base, out / "adapter")
    with torch.no_grad():
        after = base(ids).logits
    assert not torch.allclose(before, after), "the saved adapter should carry the trained update"
    if case == "adalora":  # after_step ran: the final budget (target_r per module) is what the file keeps
        from safetensors.torch import load_file

        tensors = load_file(out / "adapter" / "adapter_model.safetensors")
        kept = [int((t != 0).any(dim=1).sum()) for k, t in tensors.items() if k.endswith("lora_E")]
        assert sum(kept) == 2 * len(kept) and len(kept) == 2


def test_bad_recipe_fields_are_one_clear_error(tmp_path, tiny):
    with pytest.raises(DeltatuneError, match="unknown option"):
        train(load_recipe(_recipe(tmp_path, tiny, optimizer={"name": "lorafa", "options": {"rank": 2}})),
              progress=False)
    with pytest.raises(DeltatuneError, match="unknown init"):
        train(load_recipe(_recipe(tmp_path, tiny, initialize={"name": "evaa", "batches": 1})), progress=False)
