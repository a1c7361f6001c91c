"""Poly / MHR: PEFT parity both ways (task ids per row, several heads), the skill mixture per task, merging for one
task, task ids under mixed batches, and bad input."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import DeltatuneError
from deltatune.methods import poly
from deltatune.methods.mixture import routing
from peft_roundtrip import peft, randomise
from toys import make, perturb, run

TASKS = torch.tensor([0, 2, 1])
PEFT_FIELDS = {"r": 2, "n_tasks": 3, "n_skills": 4, "n_splits": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _ours(fields=None, name="default", seed=0):
    fields = fields or {**{k: v for k, v in PEFT_FIELDS.items() if k != "target_modules"},
                        "targets": PEFT_FIELDS["target_modules"]}
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("poly", **fields), name=name)
    perturb(model, name, seed=seed)
    return model, x


def test_peft_saved_poly_loads_with_peft_logits(tmp_path):
    model, x = make("llama")
    peft_model = peft.get_peft_model(model, peft.PolyConfig(**PEFT_FIELDS)).eval()
    randomise(peft_model)
    with torch.no_grad():
        expected = peft_model.base_model(x, task_ids=TASKS).logits
    peft_model.save_pretrained(tmp_path / "p")
    ours, _ = make("llama")
    deltatune.load(ours, tmp_path / "p")
    with poly.tasks(ours, TASKS):
        torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)


def test_deltatune_saved_poly_loads_in_peft(tmp_path):
    model, x = _ours()
    with poly.tasks(model, TASKS):
        expected = run(model, x)
    deltatune.save(model, tmp_path / "d")
    fresh, _ = make("llama")
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "d").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model.base_model(x, task_ids=TASKS).logits, expected, atol=1e-5, rtol=1e-5)


def test_each_task_uses_its_normalised_sigmoid_mixture_of_skills():
    model, x = _ours({"r": 3, "n_tasks": 2, "n_skills": 3, "targets": ["q_proj"]})
    module = model.model.layers[0].self_attn.q_proj
    delta = module.deltatune["default"]
    h = torch.randn(2, 4, 16)
    with torch.no_grad(), poly.tasks(model, [1, 0]):
        out = module(h)
        for row, task in enumerate([1, 0]):
            gates = torch.sigmoid(delta.module_logits[task])
            w = gates / gates.sum()
            a = torch.einsum("k,kdr->dr", w, delta.poly_lora_A[0])
            b = torch.einsum("k,krd->rd", w, delta.poly_lora_B[0])
            expected = torch.nn.functional.linear(h[row], module.weight) + h[row] @ a @ b / 3
            torch.testing.assert_close(out[row], expected)
    weights = routing(model, "default")["model.layers.0.self_attn.q_proj"].weights  # (rows, heads, skills)
    assert weights.shape == (2, 1, 3) and torch.allclose(weights.sum(-1), torch.ones(2, 1))


def test_merges_for_one_task_and_refuses_to_change_tasks_while_merged():
    model, x = _ours()
    with poly.tasks(model, [2]):
        adapted = run(model, x)
        deltatune.merge(model)
        torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=1e-5)
        with pytest.raises(DeltatuneError, match="unmerge"):
            poly.tasks(model, [1])
        deltatune.unmerge(model)
    with poly.tasks(model, TASKS), pytest.raises(DeltatuneError, match="one task"):
        deltatune.merge(model)


def test_per_sample_rows_keep_their_adapter_and_task():
    model, x = _ours(name="a", seed=0)
    deltatune.attach(model, deltatune.config("poly", r=3, n_tasks=3, n_skills=2, targets=["q_proj"]), name="b")
    perturb(model, "b", seed=1)
    with poly.tasks(model, TASKS):
        with deltatune.per_sample(model, ["b", None, "a"]):
            mixed = run(model, x)
        for row, name in enumerate(["b", None, "a"]):
            with deltatune.use(model, name), poly.tasks(model, TASKS[row : row + 1]):
                torch.testing.assert_close(mixed[row : row + 1], run(model, x[row : row + 1]), atol=1e-5, rtol=1e-5)


def test_training_samples_the_routing_and_trains_the_logits():
    model, x = _ours({"r": 2, "n_tasks": 2, "targets": ["q_proj"]})
    model.train()
    with poly.tasks(model, [0, 1, 1]):
        first, second = run(model, x), run(model, x)
        assert not torch.allclose(first, second)  # relaxed-Bernoulli samples differ between calls
        model(x).logits.sum().backward()
    delta = model.model.layers[0].self_attn.q_proj.deltatune["default"]
    assert delta.module_logits.grad[:2].abs().sum() > 0


def test_task_ids_are_required_and_checked():
    model, x = _ours()
    with pytest.raises(DeltatuneError, match="n_tasks=3"):
        run(model, x)
    with pytest.raises(DeltatuneError, match="tasks 0..2"):
        poly.tasks(model, [3])
    with pytest.raises(DeltatuneError, match="4 task ids for a batch of 3"):
        with poly.tasks(model, [0, 1, 2, 0]):
            run(model, x)


def test_parameter_count_and_bad_input():
    cls = deltatune.get_method("poly").delta
    info = deltatune.core.hosts.host_info(torch.nn.Linear(576, 576))
    count = cls.num_parameters(deltatune.config("poly", r=8, n_tasks=5, n_skills=4, n_splits=2), info, "x")
    assert count == 4 * 8 * (576 + 576) + 5 * 2 * 4
    with pytest.raises(DeltatuneError, match="n_skills"):
        deltatune.config("poly", n_skills=0)
    model, _ = make("mlp")
    with pytest.raises(DeltatuneError, match="n_splits=3 must divide"):
        deltatune.attach(model, deltatune.config("poly", n_splits=3, targets=["lin0"]))
