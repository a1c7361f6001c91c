"""PEFT parity of the inits PEFT implements and the other test files do not already compare: EVA (ranks and
subspaces), LoRA-GA (PEFT's variant, `style="peft"`) and LoftQ (PEFT's alternation code; with bitsandbytes' real
NF4 when it is installed — an optional test extra — and our NF4 in its place otherwise)."""

from __future__ import annotations

import inspect
import sys
import textwrap
import types

import pytest
import torch
from peft_roundtrip import peft
from toys import make

import deltatune
from deltatune.algorithms import inits
from deltatune.core.slot import slots_of
from deltatune.methods import lora_init


def _lm_batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _ours(targets: list[str], r: int, alpha: float):
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("lora", r=r, alpha=alpha, targets=targets))
    return model, {p: s["default"] for p, _, s in slots_of(model)}


def _peft_layer(peft_model, path: str):
    return peft_model.get_submodule(f"base_model.model.{path}")


def test_eva_matches_peft_ranks_subspaces_and_scaling():
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    batch = _lm_batches(1)[0]
    model, _ = make("llama")
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="eva", target_modules=targets,
                             eva_config=peft.EvaConfig(rho=2.0))
    peft_model = peft.get_peft_model(model, config)
    # PEFT's incremental PCA runs until the components stop moving: a repeated batch converges on its own PCA.
    initialize_lora_eva_weights(peft_model, [batch, batch], show_progress_bar=False)
    ours, _ = _ours(targets, 2, 4.0)
    inits.initialize(ours, "default", "eva", [batch], progress=False, rho=2.0)
    deltas = {p: s["default"] for p, _, s in slots_of(ours)}
    assert len({d.r for d in deltas.values()}) > 1, "the budget should move between layers"
    for path, delta in deltas.items():
        layer = _peft_layer(peft_model, path)
        theirs = layer.lora_A["default"].weight
        assert theirs.shape == delta.lora_A.shape, path
        cosines = torch.linalg.svdvals(delta.lora_A.detach() @ theirs.detach().t())  # principal angles
        torch.testing.assert_close(cosines, torch.ones_like(cosines), atol=1e-4, rtol=0)
        assert delta.scaling == pytest.approx(layer.scaling["default"])
        assert not delta.lora_B.any() and not layer.lora_B["default"].weight.any()


def _aligned(ours: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
    """`theirs` with each singular vector's sign flipped to match ours (SVD signs are arbitrary)."""
    sign = torch.sign((ours * theirs).sum(dim, keepdim=True))
    return theirs * sign


@pytest.mark.filterwarnings("ignore:Full backward hook")  # PEFT's own gradient pass
def test_lora_ga_peft_style_matches_peft():
    from peft.tuners.lora.loraga import preprocess_loraga

    targets = ["q_proj", "v_proj", "up_proj"]
    batches = _lm_batches(2)
    model, _ = make("llama")
    # r = 4: PEFT's svd_lowrank(q = 4r) is then a full (exact) SVD of the 16-wide gradients
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="lora_ga", target_modules=targets,
                             lora_ga_config=peft.LoraGAConfig())

    def train_step() -> None:
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    peft_model = peft.get_peft_model(model, config)
    ours, _ = _ours(targets, 4, 8.0)
    inits.initialize(ours, "default", "lora_ga", batches, progress=False, style="peft", direction="ArB2r")
    for path, delta in ((p, s["default"]) for p, _, s in slots_of(ours)):
        layer = _peft_layer(peft_model, path)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(delta.lora_A.detach(), _aligned(delta.lora_A.detach(), a, 1), atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(delta.lora_B.detach(), _aligned(delta.lora_B.detach(), b, 0), atol=1e-7,
                                   rtol=1e-4)


class _Packed:
    """What bitsandbytes' Params4bit gives PEFT after `.to(device)`: the data and its quantisation state."""

    def __init__(self, data: torch.Tensor, *_, **__) -> None:
        self.data, self.quant_state = data, None

    def to(self, _device) -> _Packed:
        return self


def _shim_bitsandbytes() -> types.ModuleType:
    """A stand-in for bitsandbytes whose NF4 is ours (proved equal to the real one below when it is installed)."""
    module = types.ModuleType("bitsandbytes")
    module.nn = types.SimpleNamespace(Params4bit=_Packed)
    module.functional = types.SimpleNamespace(dequantize_4bit=lambda data, _: lora_init.quantize_nf4(data, 64))
    return module


@pytest.mark.parametrize("quantiser", ["bitsandbytes", "shim"])
def test_loftq_alternation_matches_peft(quantiser, monkeypatch):
    from peft.utils import loftq_utils

    if quantiser == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    else:
        monkeypatch.setitem(sys.modules, "bitsandbytes", _shim_bitsandbytes())
    # PEFT's loftq_init hard-codes a CUDA device; run its own code on the CPU (bitsandbytes quantises there too).
    source = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init)).replace('"cuda"', '"cpu"')
    namespace = dict(vars(loftq_utils)) | {"is_bnb_available": lambda: True, "is_bnb_4bit_available": lambda: True}
    exec(source, namespace)  # noqa: S102 - PEFT's installed source, only the device string changed
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    q, lora_a, lora_b = namespace["loftq_init"](weight, num_bits=4, reduced_rank=3, num_iter=3)
    ours_q, left, right, errors = lora_init.loftq_alternation(weight, 3, 3, "nf4", 64)
    torch.testing.assert_close(ours_q, q, atol=1e-6, rtol=0)
    torch.testing.assert_close(right, lora_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, lora_b, atol=1e-5, rtol=1e-5)
    assert errors == sorted(errors, reverse=True)


def test_nf4_quantiser_equals_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(33, 70, generator=torch.Generator().manual_seed(1))  # 2310 entries: a partial last block
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    torch.testing.assert_close(lora_init.quantize_nf4(weight, 64), functional.dequantize_4bit(packed, state),
                               atol=0, rtol=0)
