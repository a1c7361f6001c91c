"""Generic hooks of the contract that the LoRA family does not use: adapter-wide shared tensors and norm hosts.

A throw-away method is registered for the duration of each test only.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import deltatune
from deltatune.core import registry
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta
from deltatune.core.hosts import ALL_KINDS
from toys import make, run, save_and_reload


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig(DeltaConfig):
    width: int = 4


class ProbeDelta(Delta):
    """ΔW = diag-free toy: every host adds (shared vector)[:out] ⊙ its own gain, as a bias-like weight update."""

    @classmethod
    def make_shared(cls, config, hosts):
        widest = max(info.out_features for info in hosts.values())
        module = nn.Module()
        module.bank = nn.Parameter(torch.linspace(-1, 1, widest))
        return module

    def __init__(self, config, info, path):
        super().__init__(config, info, path)
        self.gain = nn.Parameter(torch.full((info.out_features,), 0.5))

    def delta_weight(self, host):
        w = host.weight()
        if self.info.kind == "norm":
            return self.gain * self.shared.bank[: self.info.out_features]
        scale = (self.gain * self.shared.bank[: self.info.out_features]).unsqueeze(1)
        return scale * (w if self.info.kind != "conv1d_hf" else w.t())

    def forward(self, x, y, host):
        return y + host.apply(x, self.delta_weight(host))

    @classmethod
    def num_parameters(cls, config, info, path):
        return info.out_features


@pytest.fixture()
def probe():
    registry.register_method("probe", config=ProbeConfig, family="test", paper="probe https://arxiv.org/abs/0000.00000",
                             hosts=ALL_KINDS)(ProbeDelta)
    yield
    registry._METHODS.pop("probe")


def test_shared_module_is_trained_saved_and_removed_once(probe, tmp_path):
    model, x = make("mlp")
    deltatune.attach(model, deltatune.config("probe", targets=["lin0", "norm", "lin2"]))
    from deltatune.core.api import shared_of

    names = [n for n, _ in deltatune.named_trainable_parameters(model)]
    assert names.count("lin0.deltatune.default.shared.bank") == 1 and len(names) == 4
    assert model.norm.deltatune["default"].shared is shared_of(model, "default")
    with torch.no_grad():
        shared_of(model, "default").bank.mul_(3)
    out = run(model, x)
    keys, fresh = save_and_reload(model, "mlp", tmp_path)
    assert "base_model.model.deltatune_shared.bank" in keys
    assert deltatune.trainable_parameters(fresh) == []
    deltatune.merge(fresh)
    torch.testing.assert_close(run(fresh, x), out, atol=1e-5, rtol=1e-5)
    deltatune.unmerge(fresh)
    deltatune.detach(fresh)
    assert not [n for n, _ in fresh.named_parameters() if "shared" in n]


def test_shared_module_on_a_sequential_root(probe):
    """The adapter-wide module must not become a child of the root: nn.Sequential would call it."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    deltatune.attach(model, deltatune.config("probe", targets=["0", "1"]))
    assert list(model._modules) == ["0", "1"]
    model(torch.randn(3, 4))


def test_norm_hosts_apply_through_the_module_itself(probe):
    for toy, target in (("mlp", "norm"), ("llama", "model.layers.0.input_layernorm"), ("gpt2", "transformer.h.0.ln_1")):
        model, x = make(toy)
        deltatune.attach(model, deltatune.config("probe", targets=[target]))
        module = model.get_submodule(target)
        slot = module.deltatune
        from deltatune.core.slot import Host

        host = Host(module, slot)
        assert slot.info.kind == "norm"
        h = torch.randn(2, 3, slot.info.in_features)
        new_w = torch.randn(slot.info.in_features)
        with deltatune.use(model, None):  # the module's own forward, without the delta
            expected = torch.func.functional_call(module, {"weight": new_w, **(
                {"bias": torch.zeros_like(module.bias)} if getattr(module, "bias", None) is not None else {})}, (h,))
        torch.testing.assert_close(host.apply(h, new_w), expected)
        adapted = run(model, x)
        deltatune.merge(model)
        torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=1e-5)
