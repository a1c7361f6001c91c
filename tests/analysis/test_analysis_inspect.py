"""inspect and compare: per-layer numbers checked against the adapter's own tensors, fine-tuned model directories,
reports, the CLI, and bad input."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
from analysis_helpers import save_toy_adapter
from safetensors.torch import load_file, save_file
from toys import make, perturb

import deltatune
from deltatune.analysis.inspect import compare, inspect
from deltatune.analysis.report import inspect_figures, write_report
from deltatune.cli import main
from deltatune.core.errors import DeltatuneError


def test_inspect_lora_numbers_match_the_adapter_tensors(tmp_path):
    directory = save_toy_adapter(tmp_path / "a", r=2, alpha=4)
    model, _ = make("llama")
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    result = inspect(directory, model)
    assert result["method"] == "lora" and result["mergeable"]
    assert result["targets"] == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    per_module = result["parameters"]["per_module"]
    assert per_module["model.layers.0.self_attn.q_proj"] == 2 * (16 + 16)
    assert per_module["model.layers.0.self_attn.v_proj"] == 2 * (16 + 8)
    assert result["parameters"]["total"] == sum(per_module.values())
    tensors = load_file(directory / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    expected = (tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]) * (4 / 2)
    layer = result["layers"][0]
    assert layer["fro_norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
    assert layer["singular_values"][:2] == pytest.approx(torch.linalg.svdvals(expected)[:2].tolist(), rel=1e-4)
    assert all(row["numerical_rank"] == 2 for row in result["layers"])
    assert result["summary"]["layers"] == 4 and result["summary"]["max_numerical_rank"] == 2
    assert "intruders" in layer and layer["intruders"]["k"] == 10
    json.dumps(result)  # plain data
    assert deltatune.adapters(model) == {}  # the analysis left the model as it found it
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before


def test_inspect_an_activation_space_method_reports_structure_only(tmp_path):
    directory = save_toy_adapter(tmp_path / "d", method="denselora", r=2)
    result = inspect(directory, make("llama")[0])
    assert result["mergeable"] is False and result["layers"] == [] and "no ΔW" in result["note"]
    assert result["parameters"]["total"] > 0


def _finetuned_dir(tmp_path, adapter_dir, noise: float = 0.0):
    """The toy Llama with the adapter merged in (plus optional dense noise), saved as a model directory."""
    model, _ = make("llama")
    deltatune.load(model, adapter_dir)
    deltatune.merge(model)
    deltatune.detach(model)
    if noise:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ft")
    return tmp_path / "ft"


def test_compare_adapter_with_the_model_it_was_merged_into(tmp_path):
    adapter = save_toy_adapter(tmp_path / "a", r=2)
    finetuned = _finetuned_dir(tmp_path, adapter)
    result = compare(adapter, finetuned, make("llama")[0])
    assert len(result["layers"]) == 4 and result["only_a"] == []
    assert "model.layers.0.mlp.down_proj" in result["only_b"]  # a full fine-tune covers every weight
    for row in result["layers"]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-5) and row["relative_difference"] < 1e-4
        assert row["overlap_output"] == pytest.approx(1.0, abs=1e-4)
    full = inspect(finetuned, make("llama")[0])
    assert full["method"] == "full" and len(full["layers"]) > 4
    untouched = next(r for r in full["layers"] if r["path"] == "model.layers.0.mlp.down_proj")
    assert untouched["fro_norm"] == 0.0


def test_intruders_appear_with_a_strong_low_rank_update_not_with_small_dense_noise(tmp_path):
    # 128 wide, so a random direction is far (|cos| ≈ 0.3) from every one of W₀'s singular vectors
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
    deltatune.attach(model, deltatune.config("lora", r=1, alpha=1, targets=["0", "1"]))
    perturb(model, "default", 0, 1.0)
    deltatune.save(model, tmp_path / "lora")
    deltatune.detach(model)
    lora = inspect(tmp_path / "lora", model)
    assert lora["summary"]["total_intruders"] == 2 and lora["summary"]["layers_with_intruders"] == 2
    assert all(row["intruders"]["indices"] == [0] for row in lora["layers"])  # the top direction is new
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_text("{}")
    noisy = {k: v + 1e-3 * torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(noisy, tmp_path / "ft" / "model.safetensors")
    full = inspect(tmp_path / "ft", model)
    assert len(full["layers"]) == 2 and full["summary"]["total_intruders"] == 0


def test_compare_identical_opposite_and_most_different(tmp_path):
    a = save_toy_adapter(tmp_path / "a", seed=0)
    model, _ = make("llama")
    same = compare(a, a, model)
    assert same["mean_cosine"] == pytest.approx(1.0)
    deltatune.load(model, a)
    with torch.no_grad():  # B negated on one layer only: ΔW there is -ΔW
        model.model.layers[1].self_attn.v_proj.deltatune.default.lora_B.neg_()
    deltatune.save(model, tmp_path / "b")
    deltatune.detach(model)
    result = compare(a, tmp_path / "b", model)
    by_path = {r["path"]: r for r in result["layers"]}
    assert by_path["model.layers.1.self_attn.v_proj"]["cosine"] == pytest.approx(-1.0)
    assert by_path["model.layers.1.self_attn.v_proj"]["overlap_input"] == pytest.approx(1.0, abs=1e-4)
    assert result["most_different"][0] == "model.layers.1.self_attn.v_proj"


def test_bad_input_is_one_clear_error(tmp_path):
    model, _ = make("llama")
    with pytest.raises(DeltatuneError, match="neither an adapter directory"):
        inspect(tmp_path, model)
    with pytest.raises(DeltatuneError, match="does not record its base model"):
        inspect(save_toy_adapter(tmp_path / "a"))
    with pytest.raises(DeltatuneError, match="epsilon"):
        inspect(tmp_path / "a", model, epsilon=2.0)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(DeltatuneError, match="never unpickles"):
        compare(tmp_path / "a", tmp_path / "pickled", model)
    emb = save_toy_adapter(tmp_path / "e", targets=["embed_tokens"])
    with pytest.raises(DeltatuneError, match="no module in common"):
        compare(tmp_path / "a", emb, model)
    assert deltatune.adapters(model) == {}


def test_html_report_is_self_contained_and_written_atomically(tmp_path):
    result = inspect(save_toy_adapter(tmp_path / "a"), make("llama")[0])
    figures = inspect_figures(result)
    assert set(figures) == {"norms.png", "spectra.png", "ranks.png", "intruders.png"}
    path = write_report(tmp_path / "out" / "report.html", "t", result, figures)
    text = path.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http" not in text.replace("https://arxiv", "")  # nothing to fetch: opens offline
    assert "model.layers.0.self_attn.q_proj" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html"]  # no temp leftovers
    with pytest.raises(DeltatuneError, match="is a directory"):
        write_report(tmp_path / "out", "t", result, figures)


def test_cli_inspect_and_compare(tiny_dir, tiny_adapters, tmp_path, capsys):
    json_adapter, poems = str(tiny_adapters["json"]), str(tiny_adapters["poems"])
    assert main(["inspect", json_adapter, "--base", str(tiny_dir), "--report", str(tmp_path / "r.html"),
                 "--plots", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "method: lora" in out and "intruder dimensions:" in out and "largest updates" in out
    assert (tmp_path / "r.html").stat().st_size > 10_000 and len(list((tmp_path / "png").glob("*.png"))) == 4
    assert main(["compare", json_adapter, poems, "--base", str(tiny_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["layers"]) == 4 and -1.0 <= result["mean_cosine"] <= 1.0
    assert main(["inspect", str(tmp_path / "missing"), "--base", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune: error:") and len(err.strip().splitlines()) == 1
