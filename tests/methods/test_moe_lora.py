"""MoE-LoRA and MoLA: the routed sum of LoRA experts, top-k and dense routing, the decisions a router exposes, the
Switch load-balancing loss, MoLA's per-layer expert counts, parameter counts, compositions and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import deltatune
import deltatune.methods.moe_lora  # noqa: F401
from deltatune import DeltatuneError, Stack
from deltatune.methods.mixture import records_training_terms, routing, switch_balance_loss
from deltatune.train.distributed import regularization
from toys import make, perturb, run

from test_multilora import attached, layer_info, randomize


def expected_output(delta, x, y, weights):
    """y + s·Σₑ wₑ·Bₑ·Aₑ·x computed expert by expert."""
    out = y.clone()
    for e in range(delta.experts):
        out = out + delta.scaling * weights[..., e : e + 1] * (x @ delta.lora_A[e].t() @ delta.lora_B[e].t())
    return out


def test_top_k_output_is_the_renormalised_sum_of_the_chosen_experts():
    model, delta, host, x = attached("moe_lora", r=2, alpha=4, num_experts=4, top_k=2)
    randomize(delta)
    with torch.no_grad():
        y0 = F.linear(x, model[0].weight, model[0].bias)
        probs = torch.softmax(x @ delta.router.t(), dim=-1)
        top, idx = probs.topk(2, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        torch.testing.assert_close(model(x), expected_output(delta, x, y0, weights))
    decision = delta.last_routing
    assert torch.equal(decision.indices, idx) and torch.allclose(decision.weights, weights)
    assert ((decision.weights > 0).sum(-1) == 2).all()


def test_dense_routing_mixes_every_expert_by_the_softmax():
    model, delta, host, x = attached("moe_lora", r=2, num_experts=3, top_k=None)
    randomize(delta)
    with torch.no_grad():
        y0 = F.linear(x, model[0].weight, model[0].bias)
        weights = torch.softmax(x @ delta.router.t(), dim=-1)
        torch.testing.assert_close(model(x), expected_output(delta, x, y0, weights))
    assert delta.last_routing.indices is None and (delta.last_routing.weights > 0).all()


def test_a_top1_router_with_one_dominant_expert_sends_every_token_there():
    model, delta, host, _ = attached("moe_lora", r=2, num_experts=3, top_k=1)
    randomize(delta)
    x = torch.rand(6, 24) + 0.1  # positive inputs: a positive router row wins on every token
    with torch.no_grad():
        delta.router.zero_()
        delta.router[2].fill_(3.0)
        out = model(x)
        y0 = F.linear(x, model[0].weight, model[0].bias)
        alone = y0 + delta.scaling * x @ delta.lora_A[2].t() @ delta.lora_B[2].t()
    torch.testing.assert_close(out, alone)
    record = routing(model, "default")["0"]
    assert (record.indices == 2).all() and torch.allclose(record.weights[:, 2], torch.ones(6))


def test_balance_loss_is_one_when_even_and_the_expert_count_when_collapsed():
    even = torch.full((8, 4), 0.25)
    assert switch_balance_loss(even, torch.arange(8).remainder(4).unsqueeze(-1)).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 1] = 1.0
    assert switch_balance_loss(collapsed, torch.ones(8, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_balance_loss_reaches_the_trainer_once_and_trains_the_router():
    model, delta, _, x = attached("moe_lora", r=2, num_experts=3, top_k=1, balance_weight=0.5)
    model.train()
    model(x)
    loss = regularization(model)
    # Σₑ fₑ·Pₑ lies in (0, max P] (f sums to 1), so α·E·Σ f·P is in (0, α·E]; it is not bounded below by α
    assert loss is not None and 0 < loss.item() <= 0.5 * 3 + 1e-6
    loss.backward()
    assert delta.router.grad.abs().sum() > 0
    assert delta.regularization_loss() is None  # read once, then cleared
    model.eval()
    model(x)
    assert delta.regularization_loss() is None  # nothing recorded outside training


def test_activation_checkpointing_records_the_term_of_the_forward_only():
    _, delta, _, x = attached("moe_lora", r=2, num_experts=3, top_k=1)
    delta.train()
    seen = []

    def body(h):
        seen.append(records_training_terms(delta))
        return (h * h).sin()

    checkpoint(body, x.requires_grad_(), use_reentrant=False).sum().backward()
    assert seen == [True, False]  # the forward, then its recomputation inside backward


def test_not_mergeable_and_identity_at_init():
    model, x = make("llama")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("moe_lora", r=2, num_experts=2, targets=["q_proj", "v_proj"]))
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)
    assert not deltatune.get_method("moe_lora").mergeable
    with pytest.raises(DeltatuneError, match="cannot be merged"):
        deltatune.merge(model)


def test_mola_gives_each_layer_group_its_expert_count():
    config = deltatune.config("mola", experts_per_group=[2, 4, 6, 8], num_layers=32)
    counts = [config.experts_for(f"model.layers.{i}.self_attn.q_proj") for i in range(32)]
    assert counts == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("mola", r=2, experts_per_group=[2, 5], targets=["q_proj"]))
    experts = [m.deltatune["default"].experts for n, m in model.named_modules() if n.endswith("q_proj")]
    assert experts == [2, 5]


def test_mola_refuses_a_module_outside_the_layer_stack_without_default_experts():
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="default_experts"):
        deltatune.attach(model, deltatune.config("mola", experts_per_group=[2, 3], targets=["lin0"]))
    with pytest.raises(DeltatuneError, match="num_layers"):
        deltatune.config("mola", experts_per_group=[2, 3], num_layers=2).experts_for("model.layers.5.q_proj")


def test_parameter_counts_of_a_576_layer():
    info = layer_info()
    cls = deltatune.get_method("moe_lora").delta
    assert cls.num_parameters(deltatune.config("moe_lora", r=8, num_experts=4), info, "x") == 4 * 8 * 1152 + 4 * 576
    mola = deltatune.config("mola", r=8, experts_per_group=[2, 4], num_layers=30)
    assert cls.num_parameters(mola, info, "model.layers.29.mlp") == 4 * 8 * 1152 + 4 * 576


def test_inside_a_stack_with_lora_the_updates_add():
    model, x = make("mlp")
    for name, method, fields in [("m", "moe_lora", {"r": 2, "num_experts": 3}), ("l", "lora", {"r": 2})]:
        deltatune.attach(model, deltatune.config(method, targets=["lin0"], **fields), name=name)
        perturb(model, name, seed=len(name))
    with torch.no_grad():
        with deltatune.use(model, None):
            y0 = model.lin0(x)
        ys = {}
        for name in ("m", "l"):
            with deltatune.use(model, name):
                ys[name] = model.lin0(x)
        with deltatune.use(model, Stack("m", "l")):
            both = model.lin0(x)
    torch.testing.assert_close(both - y0, (ys["m"] - y0) + (ys["l"] - y0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fields,field", [({"num_experts": 0}, "num_experts"), ({"top_k": 5}, "top_k"),
                                          ({"r": 0}, "r"), ({"balance_weight": -1.0}, "balance_weight")])
def test_bad_config_names_the_field(fields, field):
    with pytest.raises(DeltatuneError, match=field):
        deltatune.config("moe_lora", **fields)
    with pytest.raises(DeltatuneError, match="experts_per_group"):
        deltatune.config("mola", experts_per_group=[2, 0])
