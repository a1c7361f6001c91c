"""Data-driven inits through `deltatune.algorithms.inits.initialize`: EVA, CorDA (both modes), LoRA-GA, LoRA-One,
LoRA-SB — unchanged output at step 0, each init's defining property, PEFT parity (CorDA), the saved format, errors."""

from __future__ import annotations

import pytest
import torch
from peft_roundtrip import peft
from torch import nn
from toys import make, perturb, run

import deltatune
from deltatune import DeltatuneError
from deltatune.algorithms import inits
from deltatune.algorithms.collect import batch_loss, collect_gradients
from deltatune.core.slot import slots_of

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _lm_batches(n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 64, (3, 8), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt that carries no loss
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def _llama(method: str = "lora", r: int = 2, **fields):
    model, x = make("llama")
    base = run(model, x)
    deltatune.attach(model, deltatune.config(method, r=r, alpha=2 * r, targets=LLAMA_TARGETS, **fields))
    return model, x, base


def _deltas(model, adapter: str = "default") -> dict:
    return {p: (m, s[adapter]) for p, m, s in slots_of(model) if adapter in s}


def _regression(seed: int = 0) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 10, generator=g), torch.randn(16, 6, generator=g)) for _ in range(2)]
    return model, batches


@pytest.mark.parametrize("name,options", [("eva", {}), ("corda", {"mode": "ipm"}), ("corda", {"mode": "kpm"}),
                                          ("lora_ga", {}), ("lora_one", {}), ("pissa", {"niter": 0})])
def test_output_unchanged_at_step_zero(name, options):
    model, x, base = _llama()
    inits.initialize(model, "default", name, _lm_batches(), progress=False, **options)
    torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=0)
    expected = {"corda": f"corda_{options.get('mode')}"}.get(name, name)
    assert deltatune.adapters(model)["default"].init == expected
    assert any(d.lora_B.abs().max() > 0 for _, d in _deltas(model).values()) != (name == "eva")


def test_progress_is_reported(capsys):
    model, _, _ = _llama()
    inits.initialize(model, "default", "lora_ga", _lm_batches(2), progress=True)
    assert "lora_ga" in capsys.readouterr().err


def _layer_inputs(model, path: str, batches: list) -> torch.Tensor:
    rows = []
    module = dict(model.named_modules())[path]
    handle = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    with deltatune.use(model, None), torch.no_grad():
        for b in batches:
            model(b["input_ids"])
    handle.remove()
    return torch.cat([r[b["labels"] != -100] for r, b in zip(rows, batches)])


def test_eva_takes_the_top_principal_directions_and_redistributes_the_budget():
    model, _, _ = _llama(r=2)
    batches = _lm_batches(4)
    inits.initialize(model, "default", "eva", batches, progress=False, rho=2.0)
    deltas = _deltas(model)
    ranks = {p: d.r for p, (_, d) in deltas.items()}
    assert sum(ranks.values()) == 2 * len(ranks) and max(ranks.values()) <= 4 and min(ranks.values()) >= 1
    assert len(set(ranks.values())) > 1, "the budget should move between layers"
    path = "model.layers.1.mlp.down_proj"
    rows = _layer_inputs(model, path, batches)
    centred = rows - rows.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    a = deltas[path][1].lora_A
    overlap = torch.linalg.svdvals(a @ vh[: a.shape[0]].t())  # cosines of the principal angles
    torch.testing.assert_close(overlap, torch.ones_like(overlap), atol=1e-4, rtol=0)
    config = deltatune.adapters(model)["default"]
    for p, r in ranks.items():
        assert config.rank_for(p) == r
        assert config.scaling_for(p) == pytest.approx(4 / 2)  # alpha rescaled with r: the scaling stays alpha / r


def test_eva_ranks_follow_explained_variance():
    ratios = {"a": torch.tensor([0.9, 0.05, 0.03]), "b": torch.tensor([0.4, 0.3, 0.2]), "c": torch.tensor([1.0, 0, 0])}
    assert inits.eva_ranks(ratios, {"a": 1, "b": 1, "c": 1}, rho=3.0) == {"a": 1, "b": 1, "c": 1}
    assert inits.eva_ranks(ratios, {"a": 2, "b": 2, "c": 2}, rho=2.0) == {"a": 2, "b": 3, "c": 1}
    weak = {"a": ratios["a"], "b": ratios["b"], "d": torch.tensor([0.01, 0.0])}
    assert inits.eva_ranks(weak, {"a": 1, "b": 1, "d": 1}, rho=2.0) == {"a": 1, "b": 1, "d": 1}  # never 0


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_splits_w_times_covariance_by_mode(mode):
    model, _, _ = _llama(r=2)
    batches = _lm_batches(3)
    inits.initialize(model, "default", "corda", batches, progress=False, mode=mode)
    path = "model.layers.0.mlp.up_proj"
    module, delta = _deltas(model)[path]
    rows = _layer_inputs(model, path, [{**b, "labels": torch.zeros_like(b["labels"])} for b in batches])
    per_batch = rows.view(len(batches), -1, rows.shape[-1])
    cov = sum((r / r.max().abs()).t() @ (r / r.max().abs()) for r in per_batch) / len(batches)
    fixed, _ = inits.damped_inverse(cov)
    weight = module.weight.detach()
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    keep = slice(0, 2) if mode == "ipm" else slice(-2, None)
    expected = u[:, keep] @ torch.diag(s[keep]) @ vh[keep]  # the chosen components of W·C
    got = delta.scaling * delta.lora_B @ delta.lora_A @ fixed
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_corda_matches_peft(tmp_path):
    from peft.tuners.lora.corda import preprocess_corda

    samples = [b["input_ids"][i : i + 1] for b in _lm_batches(2) for i in range(3)]
    for mode in ("ipm", "kpm"):
        model, _ = make("llama")
        config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="corda", target_modules=["up_proj", "o_proj"],
                                 corda_config=peft.tuners.lora.config.CordaConfig(corda_method=mode))
        preprocess_corda(model, config, run_model=lambda m=model: [m(s) for s in samples])
        peft_model = peft.get_peft_model(model, config)
        ours, _ = make("llama")
        deltatune.attach(ours, deltatune.config("lora", r=2, alpha=4, targets=["up_proj", "o_proj"]))
        inits.initialize(ours, "default", "corda", [{"input_ids": s} for s in samples], progress=False, mode=mode)
        for path, (_, delta) in _deltas(ours).items():
            layer = peft_model.get_submodule(f"base_model.model.{path}")
            torch.testing.assert_close(delta.lora_A, layer.lora_A["default"].weight, atol=2e-4, rtol=2e-3)
            torch.testing.assert_close(delta.lora_B, layer.lora_B["default"].weight, atol=2e-4, rtol=2e-3)


def _updates(model) -> dict:
    """Every delta's ΔW (matrix view), from its factors."""
    out = {}
    for path, (_, delta) in _deltas(model).items():
        down, up = delta.factors(None)
        out[path] = (up @ down).detach().clone()
    return out


def _first_sgd_step(model, batches, lr: float) -> dict:
    """The change of every delta's ΔW after one SGD step on the batches' mean loss."""
    before = _updates(model)
    opt = torch.optim.SGD(deltatune.trainable_parameters(model), lr=lr)
    sum(batch_loss(model, b) for b in batches).div(len(batches)).backward()
    opt.step()
    after = _updates(model)
    return {p: after[p] - before[p] for p in before}


def test_lora_ga_first_step_follows_the_rank_2r_projection_of_the_full_gradient():
    model, batches = _regression()
    deltatune.attach(model, deltatune.config("lora", r=2, alpha=2, targets=["0", "2"]))
    hosts = {p: m for p, m, _ in slots_of(model)}
    grads = collect_gradients(model, hosts, batches, progress=False)
    inits.initialize(model, "default", "lora_ga", batches, progress=False, scale="unit")
    lr = 1e-4
    steps = _first_sgd_step(model, batches, lr)
    for path, grad in grads.items():
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        torch.testing.assert_close(steps[path], -lr * best, atol=1e-7, rtol=1e-3)


def test_lora_one_starts_along_the_best_rank_r_full_step():
    model, batches = _regression()
    deltatune.attach(model, deltatune.config("lora", r=2, alpha=2, targets=["0", "2"]))
    grads = collect_gradients(model, {p: m for p, m, _ in slots_of(model)}, batches, progress=False)
    inits.initialize(model, "default", "lora_one", batches, progress=False)
    for path, (_, delta) in _deltas(model).items():
        u, s, vh = torch.linalg.svd(-grads[path], full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        start = delta.scaling * delta.offset_B @ delta.offset_A
        ratio = (start.flatten() @ best.flatten()) / best.flatten().pow(2).sum()
        assert ratio > 0
        torch.testing.assert_close(start, ratio * best, atol=1e-6, rtol=1e-4)


def test_lora_sb_first_step_is_the_best_rank_r_full_step():
    model, batches = _regression()
    deltatune.attach(model, deltatune.config("lora_sb", r=2, alpha=2, targets=["0", "2"]))
    grads = collect_gradients(model, {p: m for p, m, _ in slots_of(model)}, batches, progress=False)
    inits.initialize(model, "default", "lora_sb", batches, progress=False)
    assert [n for n, _ in model.named_parameters() if "deltatune" in n] == ["0.deltatune.default.lora_R",
                                                                            "2.deltatune.default.lora_R"]
    lr = 1e-3
    steps = _first_sgd_step(model, batches, lr)
    for path, grad in grads.items():
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(steps[path], -lr * best, atol=2e-7, rtol=1e-3)  # s = 1 here


def test_initialized_adapter_saves_and_peft_loads_it(tmp_path):
    for name in ("eva", "lora_ga"):
        model, x, _ = _llama()
        inits.initialize(model, "default", name, _lm_batches(), progress=False)
        perturb(model, "default", seed=0)
        expected = run(model, x)
        deltatune.save(model, tmp_path / name)
        fresh, _ = make("llama")
        deltatune.load(fresh, tmp_path / name)
        torch.testing.assert_close(run(fresh, x), expected, atol=1e-5, rtol=1e-5)
        peft_model = peft.PeftModel.from_pretrained(make("llama")[0], tmp_path / name).eval()
        torch.testing.assert_close(run(peft_model, x), expected, atol=1e-5, rtol=1e-5)


def test_routing_is_kept_and_other_adapters_untouched():
    model, x, _ = _llama()
    deltatune.attach(model, deltatune.config("lora", r=2, targets=["q_proj"]), name="other")
    perturb(model, "other", seed=3)
    deltatune.use(model, ["default", "other"])
    before = run(model, x)
    inits.initialize(model, "default", "corda", _lm_batches(), progress=False)
    assert deltatune.active(model) == ("default", "other")
    torch.testing.assert_close(run(model, x), before, atol=1e-5, rtol=0)


def test_bad_requests_raise_one_clear_error():
    model, _, _ = _llama()
    with pytest.raises(DeltatuneError, match="unknown init 'evaa'"):
        inits.initialize(model, "default", "evaa", _lm_batches())
    with pytest.raises(DeltatuneError, match="unknown adapter"):
        inits.initialize(model, "nope", "eva", _lm_batches())
    with pytest.raises(DeltatuneError, match="at least one batch"):
        inits.initialize(model, "default", "eva", [])
    with pytest.raises(DeltatuneError, match="needs a loss"):
        inits.initialize(model, "default", "lora_ga", [torch.randint(0, 64, (2, 5))], progress=False)
    with pytest.raises(DeltatuneError, match="rho must be"):
        inits.initialize(model, "default", "eva", _lm_batches(), rho=0.5)
    with pytest.raises(DeltatuneError, match="mode must be"):
        inits.initialize(model, "default", "corda", _lm_batches(), mode="xpm")
    assert deltatune.adapters(model)["default"].init == "default"  # nothing was half-done
    vera, _ = make("llama")
    deltatune.attach(vera, deltatune.config("vera", r=2, targets=["q_proj"]))
    with pytest.raises(DeltatuneError, match="applies to LoraDelta"):
        inits.initialize(vera, "default", "eva", _lm_batches())
