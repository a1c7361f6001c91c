"""The paper methods' defining properties, on pure tensors (and one data-aware merge through the YAML path)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import save_tiny_llama
from safetensors.torch import load_file

from deltatune.merging import get_merge_method, load_merge_config, run_merge
from deltatune.merging.registry import TensorInfo
from deltatune.merging.statistics import diagonal_fisher, gram_matrices, save_statistics

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def test_lines_scales_updates_linearly_with_depth():
    lines = get_merge_method("lines")
    base, model = torch.zeros(4, 4, dtype=torch.float64), rand(4, 4)
    for layer, scale in ((0, 0.2), (2, 0.6), (4, 1.0)):
        out = lines([model], base, info=TensorInfo("x", layer, 5), alpha=0.2, beta=0.8)
        torch.testing.assert_close(out, scale * model)
    torch.testing.assert_close(lines([model], base, info=TensorInfo("embed"), alpha=0.2, beta=0.8), 0.2 * model)


def test_iso_c_flattens_the_spectrum_of_the_summed_update():
    base = rand(12, 8)
    models = [base + rand(12, 8) for _ in range(3)]
    out = get_merge_method("iso_c")(models, base)
    summed = sum(m - base for m in models)
    s = torch.linalg.svdvals(out - base)
    torch.testing.assert_close(s, torch.full_like(s, float(torch.linalg.svdvals(summed).mean())))
    cts = get_merge_method("iso_cts")(models, base, common=1.0)
    torch.testing.assert_close(cts, out)
    flat = torch.linalg.svdvals(get_merge_method("iso_cts")(models, base, common=0.5) - base)
    kept = flat[flat > 1e-8]  # 4 common directions + 1 per task (rank 8: (8 - 4) // 3 each)
    assert kept.numel() == 7 and float(kept.max() - kept.min()) < 1e-8


def _orthogonal_rank_one_updates(n, shape):
    q_left = torch.linalg.qr(rand(shape[0], n))[0]
    q_right = torch.linalg.qr(rand(shape[1], n))[0]
    return [3.0 * (i + 1) * torch.outer(q_left[:, i], q_right[:, i]) for i in range(n)]


def test_tsv_keeps_non_interfering_updates_exactly():
    taus = _orthogonal_rank_one_updates(3, (9, 6))
    base = rand(9, 6)
    out = get_merge_method("tsv")([base + t for t in taus], base)
    torch.testing.assert_close(out, base + sum(taus))


def test_sequential_projects_out_what_is_already_merged():
    taus = _orthogonal_rank_one_updates(2, (8, 8))
    base = rand(8, 8)
    seq = get_merge_method("sequential")
    same = seq([base + taus[0], base + taus[0]], base)  # the repeat adds nothing new
    torch.testing.assert_close(same, base + taus[0])
    both = seq([base + taus[0], base + taus[1]], base)  # orthogonal: summed, rescaled to the mean norm
    expected = sum(taus) * ((taus[0].norm() + taus[1].norm()) / 2 / sum(taus).norm())
    torch.testing.assert_close(both, base + expected)


def test_pcb_keeps_an_agreed_update_and_drops_low_scores():
    base, tau = rand(20, 10), rand(20, 10)
    pcb = get_merge_method("pcb")
    torch.testing.assert_close(pcb([base + tau, base + tau], base, density=1.0), base + tau)
    sparse = pcb([base + tau, base + 2 * tau], base, density=0.1) - base
    assert 0 < int((sparse != 0).sum()) <= 40  # at most 10 % of the entries per model


def test_fisher_weights_each_entry_by_its_fisher():
    fisher = get_merge_method("fisher")
    a, b = rand(5), rand(5)
    fa, fb = torch.tensor([1.0, 0.0, 1.0, 3.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0],
                                                                                        dtype=torch.float64)
    out = fisher([a, b], None, statistics=[fa, fb])
    expected = torch.stack([(a[0] + b[0]) / 2, b[1], a[2], (3 * a[3] + b[3]) / 4, (a[4] + b[4]) / 2])
    torch.testing.assert_close(out, expected)


def test_regmean_is_the_least_squares_merge():
    xs = [rand(30, 6), rand(40, 6)]
    ws = [rand(4, 6), rand(4, 6)]
    out = get_merge_method("regmean")(ws, None, statistics=[x.t() @ x for x in xs], alpha=1.0)
    stacked_x = torch.cat(xs)
    targets = torch.cat([x @ w.t() for x, w in zip(xs, ws)])
    torch.testing.assert_close(out, torch.linalg.lstsq(stacked_x, targets).solution.t())


def test_fisher_merge_from_data_through_the_yaml(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = [save_tiny_llama(tmp_path / f"m{i}", seed=i) for i in range(2)]
    batch = {"input_ids": torch.randint(0, 64, (2, 8), generator=G)}
    batch["labels"] = batch["input_ids"]
    entries = []
    for i, path in enumerate(paths):
        model = AutoModelForCausalLM.from_pretrained(path)
        fisher = diagonal_fisher(model, [batch])
        assert set(fisher) == {n for n, _ in model.named_parameters()} and all((f >= 0).all() for f in fisher.values())
        save_statistics(fisher, tmp_path / f"f{i}.safetensors")
        entries.append({"model": str(path), "statistics": str(tmp_path / f"f{i}.safetensors")})
        grams = gram_matrices(model, [batch])
        assert grams["model.layers.0.mlp.down_proj.weight"].shape == (32, 32)
    (tmp_path / "fisher.yaml").write_text(yaml.safe_dump({"merge_method": "fisher", "models": entries}))
    out = run_merge(load_merge_config(tmp_path / "fisher.yaml"), tmp_path / "merged")
    merged = load_file(out / "model.safetensors")
    a, b = (load_file(p / "model.safetensors") for p in paths)
    name = "model.layers.1.mlp.up_proj.weight"
    fa, fb = (load_file(tmp_path / f"f{i}.safetensors")[name] for i in range(2))
    torch.testing.assert_close(merged[name], (fa * a[name] + fb * b[name]) / (fa + fb), atol=1e-5, rtol=1e-4)


def _lora(rank, seed, out=10, fan_in=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, fan_in, generator=g), torch.randn(out, rank, generator=g)


def test_federated_aggregations_with_heterogeneous_ranks():
    clients = [_lora(2, 0), _lora(4, 1), _lora(3, 2)]
    exact = sum(b @ a for a, b in clients) / 3
    a, b = get_merge_method("fedavg").fn(clients, weight=[1.0, 1.0, 1.0])
    assert a.shape == (4, 7) and b.shape == (10, 4)
    torch.testing.assert_close(a[:2], (clients[0][0] + clients[1][0][:2] + clients[2][0][:2]) / 3)
    _, b_sa = get_merge_method("fedsa").fn(clients, weight=[1.0] * 3, client=1)
    torch.testing.assert_close(b_sa, clients[1][1])
    shared_a = clients[1][0]  # FedSVD's setting: every client shares A; the average is then exact at rank 4
    a_svd, b_svd = get_merge_method("fedsvd").fn([(shared_a, b) for _, b in [_lora(4, s) for s in range(3)]],
                                                  weight=[1.0] * 3)
    torch.testing.assert_close(a_svd @ a_svd.t(), torch.eye(4), atol=1e-5, rtol=0)
    want = sum(b @ shared_a for _, b in [_lora(4, s) for s in range(3)]) / 3
    torch.testing.assert_close(b_svd @ a_svd, want, atol=1e-4, rtol=1e-4)
    a_fair, b_fair = get_merge_method("lora_fair").fn(clients, weight=[1.0] * 3, reg=1e-6)
    torch.testing.assert_close(a_fair, a)
    gap = b_fair @ a_fair - exact
    assert gap.norm() < (b @ a - exact).norm()  # closer to the true average than plain FedAvg
    torch.testing.assert_close(gap @ a_fair.t(), torch.zeros(10, 4), atol=1e-3, rtol=0)  # and optimal for this A


def test_lora_lego_and_eigenlorax_recover_shared_structure():
    a, b = _lora(3, 5)
    a_lego, b_lego = get_merge_method("lora_lego").fn([(a, b), (a, b)], weight=[1.0, 0.5], rank=3)
    torch.testing.assert_close(b_lego @ a_lego, 1.5 * b @ a, atol=1e-4, rtol=1e-4)
    scaled = [(a, b), (2 * a, b), (a, -b)]
    a_eig, b_eig = get_merge_method("eigenlorax").fn(scaled, weight=[1.0, 1.0, 1.0], rank=3)
    torch.testing.assert_close(b_eig @ a_eig, (1 + 2 - 1) * b @ a, atol=1e-4, rtol=1e-4)


def test_factor_methods_are_refused_for_full_models(tiny_models, tmp_path):
    from deltatune import DeltatuneError
    from deltatune.merging import parse_merge_config

    with pytest.raises(DeltatuneError, match="merges LoRA adapters"):
        run_merge(parse_merge_config({"merge_method": "fedavg", "models": tiny_models}), tmp_path / "o")
