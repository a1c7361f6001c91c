"""What defines each rank-allocation / schedule method, checked with the trainer's step order (optimizer step,
gradients cleared, then `after_step`): DyLoRA, SoRA, PRILoRA, AFLoRA, COLA, IncreLoRA, ElaLoRA."""

from __future__ import annotations

import pytest
import torch
from peft_roundtrip import deltatune_saved_loads_in_peft
from toys import assert_per_sample_matches_alone, make, run

import deltatune
from deltatune import DeltatuneError
from deltatune.core.slot import slots_of
from deltatune.methods import aflora, cola, dylora, prilora, sora  # noqa: F401 (registers)
from deltatune.methods.rank_growth import RankGrowthDelta

LLAMA = ["q_proj", "v_proj", "down_proj"]


def _attach(method: str, toy: str = "llama", targets=None, **fields):
    model, x = make(toy)
    base = run(model, x)
    deltatune.attach(model, deltatune.config(method, targets=targets or LLAMA, **fields))
    return model, x, base


def _deltas(model, adapter: str = "default") -> dict:
    return {p: s[adapter] for p, _, s in slots_of(model) if adapter in s}


def _train(model, x, steps: int, total: int, lr: float = 0.05, start: int = 0) -> list:
    """SGD steps in the trainer's order; returns what after_step returned at each step."""
    model.train()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=lr)
    deltas = _deltas(model)
    cls = type(next(iter(deltas.values())))
    returned = []
    for step in range(start, start + steps):
        out = model(x)
        (out.logits if hasattr(out, "logits") else out).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        returned.append(cls.after_step(deltas, step + 1, total))
    model.eval()
    return returned


# ---- DyLoRA ---------------------------------------------------------------------------------------------------------
def test_dylora_samples_every_rank_reproducibly():
    ranks = [dylora.sampled_rank(4, 0, s) for s in range(200)]
    assert set(ranks) == {1, 2, 3, 4} and ranks == [dylora.sampled_rank(4, 0, s) for s in range(200)]


def test_dylora_updates_only_the_sampled_component():
    model, x, _ = _attach("dylora", r=4, alpha=8.0)
    for delta in _deltas(model).values():
        delta.lora_B.data.normal_()  # every component has a gradient
    before = {p: (d.lora_A.clone(), d.lora_B.clone()) for p, d in _deltas(model).items()}
    for delta in _deltas(model).values():
        delta.train_rank = 3
    model.train()
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=0.1)
    model(x).logits.pow(2).mean().backward()
    opt.step()
    for path, delta in _deltas(model).items():
        changed_a = (delta.lora_A != before[path][0]).any(dim=1)
        changed_b = (delta.lora_B != before[path][1]).any(dim=0)
        assert changed_a.tolist() == [False, False, True, False] and changed_b.tolist() == [False, False, True, False]


def test_dylora_truncated_to_rank_k_is_the_rank_k_lora_it_trained():
    model, x, _ = _attach("dylora", r=4, alpha=8.0)
    _train(model, x, 6, 6)
    for k in (1, 2, 4):
        dylora.set_rank(model, "default", k)
        lora, _ = make("llama")
        deltatune.attach(lora, deltatune.config("lora", r=k, alpha=8.0, targets=LLAMA))
        for path, delta in _deltas(lora).items():
            delta.lora_A.data.copy_(_deltas(model)[path].lora_A[:k])
            delta.lora_B.data.copy_(_deltas(model)[path].lora_B[:, :k])
        torch.testing.assert_close(run(model, x), run(lora, x), atol=1e-6, rtol=1e-5)
    with pytest.raises(DeltatuneError, match="rank must be in 1..4"):
        dylora.set_rank(model, "default", 5)


def test_dylora_mixed_batch_follows_each_adapters_rank():
    model, x, _ = _attach("dylora", r=3, alpha=6.0, eval_rank=1)
    deltatune.attach(model, deltatune.config("dylora", r=3, alpha=6.0, targets=LLAMA), name="b")
    for name in ("default", "b"):
        for delta in _deltas(model, name).values():
            delta.lora_B.data.normal_()
    assert_per_sample_matches_alone(model, x, ["default", None, "b"])
    dylora.set_rank(model, "default", 2)  # the cached stack must notice
    assert_per_sample_matches_alone(model, x, ["default", None, "b"])


# ---- SoRA -----------------------------------------------------------------------------------------------------------
def test_sora_proximal_step_zeroes_small_gates_and_shrinks_the_rest():
    model, _, _ = _attach("sora", r=4, alpha=8.0, threshold=0.1)
    deltas = _deltas(model)
    for delta in deltas.values():
        delta.lora_B.data.normal_()
        delta.lora_gate.data.copy_(torch.tensor([0.05, -0.08, 0.5, -1.0]))
    sora.SoraDelta.after_step(deltas, 1, 10)
    for delta in deltas.values():
        torch.testing.assert_close(delta.lora_gate, torch.tensor([0.0, 0.0, 0.4, -0.9]))
        weight = delta.factors(None)[1] @ delta.factors(None)[0]
        assert torch.linalg.matrix_rank(weight) == 2
    assert set(sora.effective_ranks(model).values()) == {2}


def test_sora_linear_schedule_and_training_make_gates_sparse():
    model, x, _ = _attach("sora", r=4, alpha=8.0, threshold=0.4, schedule="linear")
    _train(model, x, 4, 4)
    assert all(r < 4 for r in sora.effective_ranks(model).values())


# ---- PRILoRA --------------------------------------------------------------------------------------------------------
def test_prilora_rank_grows_with_depth_and_peft_reads_it(tmp_path):
    config = deltatune.config("prilora", r=4, r_min=2, num_layers=2, alpha=8.0, targets=LLAMA)
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 4
    assert deltatune.config("prilora", r=4, r_min=2).rank_for("model.layers.0.mlp.down_proj") == 4  # no num_layers
    deltatune_saved_loads_in_peft(config, "llama", tmp_path)


def test_prilora_prunes_the_entries_with_the_smallest_wanda_score():
    model, x, _ = _attach("prilora", r=3, r_min=3, alpha=6.0, prune_every=2, prune_ratio=0.25)
    _train(model, x, 1, 10)
    delta = _deltas(model)["model.layers.0.mlp.down_proj"]
    score = delta.lora_A.abs() * delta.input_norm
    k = int(0.25 * delta.lora_A.shape[1])
    expected_zero = score.topk(k, dim=1, largest=False).indices
    type(delta).after_step(_deltas(model), 2, 10)
    assert (delta.lora_A.gather(1, expected_zero) == 0).all()
    assert int((delta.lora_A == 0).sum(dim=1).min()) >= k


# ---- AFLoRA ---------------------------------------------------------------------------------------------------------
def test_aflora_freezes_projections_on_a_cubic_schedule_lowest_score_first():
    model, x, _ = _attach("aflora", r=2, tinit=1, tfinal=1)
    assert aflora.frozen_fraction(1, 6, 1, 1) == 0 and aflora.frozen_fraction(5, 6, 1, 1) == 1
    deltas = _deltas(model)
    _train(model, x, 2, 6)
    frozen = [(p, n) for p, d in deltas.items() for n in ("lora_A", "lora_B") if d.frozen(n)]
    assert len(frozen) == round(aflora.frozen_fraction(2, 6, 1, 1) * 2 * len(deltas)) > 0
    snapshot = {(p, n): getattr(deltas[p], n).clone() for p, n in frozen}
    _train(model, x, 3, 6, start=2)
    assert all(d.frozen("lora_A") and d.frozen("lora_B") for d in deltas.values())
    for (p, n), value in snapshot.items():
        assert torch.equal(getattr(deltas[p], n), value), "a frozen projection changed"
    assert all(d.aflora_b.requires_grad and d.aflora_b.abs().max() > 0 for d in deltas.values())


# ---- COLA -----------------------------------------------------------------------------------------------------------
def test_cola_merges_and_restarts_without_changing_the_output(tmp_path):
    model, x, _ = _attach("cola", r=2, alpha=4.0, links=2)
    returned = _train(model, x, 3, 9)  # evenly spaced: restarts after steps 3 and 6
    deltas = _deltas(model)
    assert [bool(r) for r in returned] == [False, False, True]
    assert {id(p) for p in returned[2]} == {id(p) for d in deltas.values() for p in (d.lora_A, d.lora_B)}
    assert all(d.links_used == 1 and not d.lora_B.any() for d in deltas.values())
    _train(model, x, 4, 9, start=3)
    delta = deltas["model.layers.0.mlp.down_proj"]
    assert delta.links_used == 2 and torch.linalg.matrix_rank(delta.update_matrix()) > 2  # beyond one LoRA's rank
    peft_model = deltatune_saved_loads_in_peft(deltatune.config("cola", r=2, alpha=4.0, links=2, targets=LLAMA),
                                               "llama", tmp_path)
    assert peft_model.peft_config["default"].r == 6


def test_cola_restart_keeps_the_output_exactly():
    model, x, _ = _attach("cola", r=2, alpha=4.0, links=1, restart_every=2)
    _train(model, x, 1, 10)
    before = run(model, x)
    for delta in _deltas(model).values():
        delta.restart()
    torch.testing.assert_close(run(model, x), before, atol=1e-6, rtol=1e-5)


# ---- IncreLoRA / ElaLoRA --------------------------------------------------------------------------------------------
def test_increlora_grows_the_most_important_modules_without_changing_the_output():
    model, x, _ = _attach("increlora", init_r=1, target_r=3, max_r=3, delta_t=1, total_step=6)
    deltas = _deltas(model)
    _train(model, x, 1, 6)
    scores = {p: d.module_score() for p, d in deltas.items()}
    before = run(model, x)
    RankGrowthDelta.reallocate(deltas, deltas[next(iter(deltas))].config, 0.5)
    torch.testing.assert_close(run(model, x), before, atol=1e-6, rtol=1e-5)  # new triplets start at Λ = 0
    grown = [p for p, d in deltas.items() if d.active > 1]
    assert grown and min(scores[p] for p in grown) >= max(scores[p] for p in deltas if p not in grown)
    _train(model, x, 5, 6, start=1)
    assert sum(d.active for d in deltas.values()) == 3 * len(deltas)


def test_increlora_inactive_triplets_get_no_gradient():
    model, x, _ = _attach("increlora", init_r=1, target_r=2, max_r=3)
    model.train()
    model(x).logits.pow(2).mean().backward()
    for delta in _deltas(model).values():
        assert not delta.lora_A.grad[1:].any() and not delta.lora_B.grad[:, 1:].any()
        assert not delta.lora_E.grad[1:].any()


def test_elalora_moves_rank_between_modules_at_a_constant_budget():
    torch.manual_seed(0)  # whether a triplet moves depends on the random importances: fix them (4/20 seeds keep all)
    model, x, _ = _attach("elalora", init_r=2, max_r=4, change=2, delta_t=1, total_step=20)
    deltas = _deltas(model)
    _train(model, x, 2, 20)
    budget = sum(d.active for d in deltas.values())
    assert budget == 2 * len(deltas)
    for delta in deltas.values():
        delta.lora_E.data[:2].normal_()  # live triplets that matter, so pruning shows in the output
    before = run(model, x)
    masks = {p: d.mask.clone() for p, d in deltas.items()}
    type(next(iter(deltas.values()))).reallocate(deltas, next(iter(deltas.values())).config, 0.0)
    assert sum(d.active for d in deltas.values()) == budget
    assert any(not torch.equal(masks[p], d.mask) for p, d in deltas.items())
    assert all(d.active >= 1 for d in deltas.values())
    assert not torch.allclose(run(model, x), before)  # pruning removed live triplets
