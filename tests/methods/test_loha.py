"""LoHa: Hadamard structure of ΔW, rank beyond r, parameter count, PEFT parity (Linear, Conv, CP convs).

Also holds the PEFT round-trip helpers that the other structured-method tests import.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import deltatune
import deltatune.methods.loha  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.hosts import HostInfo

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared toy models (until a conftest adds it)
from toys import make, perturb, run  # noqa: E402

peft = pytest.importorskip("peft")

LAYER_576 = HostInfo("linear", 576, 576, (), (576, 576), True, -1)


def peft_saved_loads_in_deltatune(peft_config, toy: str, tmp_path: Path, seed: int = 0) -> None:
    """A PEFT adapter with random non-zero weights gives PEFT's logits once loaded into deltatune."""
    model, x = make(toy)
    base = run(model, x)
    peft_model = peft.get_peft_model(model, peft_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in peft_model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.eval()
    expected = run(peft_model, x)
    assert (expected - base).abs().max() > 1e-3, "the PEFT adapter must change the output"
    peft_model.save_pretrained(tmp_path / "p")
    ours, _ = make(toy)
    deltatune.load(ours, tmp_path / "p")
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)


def deltatune_saved_loads_in_peft(method: str, peft_kwargs: dict, toy: str, tmp_path: Path,
                                  renames: dict | None = None) -> None:
    """A deltatune adapter with random non-zero weights gives the same logits once loaded into PEFT. The config
    is written with PEFT's field names, renamed to ours by `renames` (target_modules -> targets always)."""
    names = {"target_modules": "targets", **(renames or {})}
    fields = {names.get(k, k): v for k, v in peft_kwargs.items()}
    model, x = make(toy)
    base = run(model, x)
    deltatune.attach(model, deltatune.config(method, **fields))
    perturb(model, "default", seed=0)
    expected = run(model, x)
    assert (expected - base).abs().max() > 1e-3, "the adapter must change the output"
    deltatune.save(model, tmp_path / "d")
    fresh, _ = make(toy)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "d").eval()
    torch.testing.assert_close(run(peft_model, x), expected, atol=1e-5, rtol=1e-5)


def delta_of(model, path: str, name: str = "default"):
    return model.get_submodule(path).deltatune[name]


def test_delta_weight_is_the_hadamard_product_of_two_low_rank_matrices():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("loha", r=2, alpha=6, targets=["lin1"], init="random"))
    d = delta_of(model, "lin1")
    expected = (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b) * (6 / 2)
    torch.testing.assert_close(d.delta_weight(None), expected)
    assert torch.linalg.matrix_rank(expected.detach()) > 2  # Hadamard product of rank-2 factors: rank up to 4


def test_identity_at_init_and_only_w2_b_is_zero():
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("loha", r=2, targets=["lin0"]))
    d = delta_of(model, "lin0")
    assert torch.count_nonzero(d.hada_w2_b) == 0
    assert all(torch.count_nonzero(p) > 0 for n, p in d.named_parameters() if n != "hada_w2_b")
    assert torch.count_nonzero(d.delta_weight(None)) == 0


def test_cp_conv_factor_matches_the_written_out_contraction():
    model, _ = make("conv")
    cfg = deltatune.config("loha", r=2, targets=["conv2d"], use_effective_conv2d=True, init="random")
    deltatune.attach(model, cfg)
    d = delta_of(model, "conv2d")
    first = torch.einsum("ijkl,ip,jq->pqkl", d.hada_t1, d.hada_w1_a, d.hada_w1_b)
    second = torch.einsum("ijkl,ip,jq->pqkl", d.hada_t2, d.hada_w2_a, d.hada_w2_b)
    torch.testing.assert_close(d.delta_weight(None), first * second * d.scaling)


def test_parameter_count_on_a_576_layer():
    cfg = deltatune.config("loha")  # r = 8: two rank-8 pairs, 2·r·(576 + 576)
    count = deltatune.get_method("loha").delta.num_parameters(cfg, LAYER_576, "x")
    assert count == 2 * 8 * (576 + 576) == 18432


@pytest.mark.parametrize("field,value", [("r", 0), ("rank_dropout", 1.0), ("module_dropout", -0.1)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("loha", **{field: value})


def test_rank_dropout_only_while_training():
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("loha", r=2, targets=["lin1"], init="random", rank_dropout=0.5))
    model.eval()  # new deltas start in training mode whatever the model's mode
    adapted = run(model, x)
    torch.testing.assert_close(run(model, x), adapted)  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), adapted)


PEFT_CASES = [
    ("llama", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("conv", {"r": 2, "alpha": 3, "target_modules": ["conv2d", "conv1d", "head"]}),
    ("conv", {"r": 2, "alpha": 3, "target_modules": ["conv2d", "conv1d", "head"],
              "use_effective_conv2d": True}),
    ("llama", {"r": 2, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 3},
               "alpha_pattern": {"q_proj": 5}}),
]


@pytest.mark.parametrize("toy,kwargs", PEFT_CASES)
def test_peft_saved_loha_loads_in_deltatune(toy, kwargs, tmp_path):
    peft_saved_loads_in_deltatune(peft.LoHaConfig(init_weights=False, **kwargs), toy, tmp_path)


@pytest.mark.parametrize("toy,kwargs", PEFT_CASES)
def test_deltatune_saved_loha_loads_in_peft(toy, kwargs, tmp_path):
    deltatune_saved_loads_in_peft("loha", kwargs, toy, tmp_path)
