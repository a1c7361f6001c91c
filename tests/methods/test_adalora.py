"""AdaLoRA against PEFT: the forward and the file format both ways (with and without an allocated rank_pattern),
the orthogonality regulariser, and the budget allocation step by step on the same gradients."""

from __future__ import annotations

import pytest
import torch
from peft_roundtrip import deltatune_saved_loads_in_peft, peft, peft_saved_loads_in_deltatune
from toys import make, run

import deltatune
from deltatune import DeltatuneError
from deltatune.core.slot import slots_of
from deltatune.methods.adalora import AdaloraDelta, budget_schedule

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "mlp": ["lin0", "lin1"]}


def _peft_config(toy: str, **fields):
    fields = {"init_r": 3, "target_r": 2, "lora_alpha": 4, "total_step": 10, **fields}
    return peft.AdaLoraConfig(target_modules=TARGETS[toy], **fields)


@pytest.mark.parametrize("toy", sorted(TARGETS))
def test_peft_saved_adalora_loads_with_peft_logits(toy, tmp_path):
    peft_saved_loads_in_deltatune(_peft_config(toy), toy, tmp_path)


@pytest.mark.parametrize("toy", sorted(TARGETS))
def test_deltatune_saved_adalora_loads_in_peft(toy, tmp_path):
    config = deltatune.config("adalora", init_r=3, target_r=2, alpha=4.0, targets=TARGETS[toy])
    deltatune_saved_loads_in_peft(config, toy, tmp_path)


def _pair(toy: str = "llama", **fields):
    """A PEFT AdaLoRA model and ours with the very same factors (E non-zero so every factor has a gradient)."""
    model, x = make(toy)
    peft_model = peft.get_peft_model(model, _peft_config(toy, **fields))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_E" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    ours, _ = make(toy)
    ours_fields = {"init_r": 3, "target_r": 2, "alpha": 4.0, "total_step": 10, **fields}
    ours_fields["delta_t"] = ours_fields.pop("deltaT", 1)
    deltatune.attach(ours, deltatune.config("adalora", targets=TARGETS[toy], **ours_fields))
    deltas = {p: s["default"] for p, _, s in slots_of(ours)}
    with torch.no_grad():
        for path, delta in deltas.items():
            layer = peft_model.get_submodule(f"base_model.model.{path}")
            for name in ("lora_A", "lora_B", "lora_E"):
                getattr(delta, name).copy_(getattr(layer, name)["default"])
    return peft_model, ours, deltas, x


def test_forward_and_regulariser_match_peft():
    peft_model, ours, deltas, x = _pair()
    torch.testing.assert_close(run(ours, x), run(peft_model.eval(), x), atol=1e-6, rtol=1e-5)
    labels = x.clone()
    ours.train()
    ours(x)  # the deltas learn the adapter's size in a forward pass
    reg = sum(d.regularization_loss() for d in deltas.values())
    with_reg = peft_model.base_model(input_ids=x, labels=labels).loss  # AdaLoraModel.forward adds the term
    peft_model.peft_config["default"].orth_reg_weight = 0.0
    without = peft_model.base_model(input_ids=x, labels=labels).loss
    torch.testing.assert_close(reg, with_reg - without, atol=1e-5, rtol=1e-5)


def test_budget_allocation_matches_peft_step_by_step():
    peft_model, ours, deltas, _ = _pair(tinit=1, tfinal=2, deltaT=2)
    opt_peft = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    opt_ours = torch.optim.SGD(deltatune.trainable_parameters(ours), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(10):
        batch = torch.randint(0, 64, (3, 6), generator=g)
        for model, opt in ((peft_model, opt_peft), (ours, opt_ours)):
            out = model(batch)
            out.logits.pow(2).mean().backward()
            opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt_peft.zero_grad()
        opt_ours.zero_grad(set_to_none=True)  # our allocator reads the gradients the trainer already cleared
        AdaloraDelta.after_step(deltas, step, 10)
        for path, delta in deltas.items():
            theirs = peft_model.get_submodule(f"base_model.model.{path}").lora_E["default"]
            torch.testing.assert_close(delta.lora_E, theirs, atol=1e-5, rtol=1e-4, msg=f"step {step} {path}")
    kept = sum(int((d.lora_E != 0).sum()) for d in deltas.values())
    assert kept == 2 * len(deltas)  # the final budget: target_r per module


def test_peft_file_with_allocated_rank_pattern_loads(tmp_path):
    peft_model, _, _, x = _pair(tinit=1, tfinal=2, deltaT=1)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    for step in range(9):
        peft_model(x).logits.pow(2).mean().backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    assert peft_model.peft_config["default"].rank_pattern
    expected = run(peft_model.eval(), x)
    peft_model.save_pretrained(tmp_path / "p")
    ours, _ = make("llama")
    deltatune.load(ours, tmp_path / "p")
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)
    ranks = [s["default"].r for _, _, s in slots_of(ours)]
    assert sum(ranks) == 2 * len(ranks) and max(ranks) <= 3


def test_budget_schedule_is_cubic_and_bad_schedules_are_refused():
    assert budget_schedule(1, 10, 1, 2, 1, 30, 20) == (30, False)
    assert budget_schedule(9, 10, 1, 2, 1, 30, 20) == (20, True)
    middle, _ = budget_schedule(4, 10, 1, 2, 1, 30, 20)
    assert middle == int(10 * (1 - 3 / 7) ** 3 + 20)
    model, _ = make("mlp")
    deltatune.attach(model, deltatune.config("adalora", init_r=2, target_r=1, tinit=5, tfinal=5, targets=["lin0"]))
    deltas = {p: s["default"] for p, _, s in slots_of(model)}
    with pytest.raises(DeltatuneError, match="no budgeting phase"):
        AdaloraDelta.after_step(deltas, 1, 10)
    with pytest.raises(DeltatuneError, match="beta1 and beta2"):
        deltatune.config("adalora", beta1=1.5)
