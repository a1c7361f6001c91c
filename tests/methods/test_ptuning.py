"""P-tuning: virtual tokens produced by a prompt encoder (MLP or the paper's biLSTM + MLP)."""

from __future__ import annotations

import pytest
import torch
from matrix_rows.prompt import in_peft_form
from safetensors.torch import load_file
from toys import make, perturb, run

import deltatune
import deltatune.methods.ptuning
from deltatune import DeltatuneError
from deltatune.methods.prompt_body import BodyDims


def _encoder(model):
    return model.base_model.deltatune["default"].prompt_encoder


def _dependence(encoder) -> torch.Tensor:
    """dep[i, j]: whether virtual token i depends on prompt embedding j."""
    table = encoder.embedding.weight
    rows = []
    for i in range(table.shape[0]):
        (grad,) = torch.autograd.grad(encoder.virtual_tokens()[i].sum(), table)
        rows.append(grad.abs().sum(-1) > 0)
    return torch.stack(rows)


def test_lstm_tokens_see_the_whole_prompt_mlp_tokens_only_their_own():
    torch.manual_seed(0)  # a token whose 6 hidden ReLUs are all dead has no gradient at all: fix the weights
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("p_tuning", num_virtual_tokens=4, encoder_hidden_size=6), name="mlp")
    deltatune.attach(model, deltatune.config("p_tuning", num_virtual_tokens=4, encoder_hidden_size=6,
                                             encoder_reparameterization_type="LSTM"), name="lstm")
    body = model.base_model
    assert torch.equal(_dependence(body.deltatune["mlp"].prompt_encoder), torch.eye(4, dtype=torch.bool))
    assert _dependence(body.deltatune["lstm"].prompt_encoder).all()  # bidirectional: every token sees every input
    encoder = body.deltatune["mlp"].prompt_encoder
    prompts = encoder.mlp_head(encoder.embedding.weight).detach()
    embeds = torch.cat([prompts.expand(3, -1, -1), model.get_input_embeddings()(x)], dim=1)
    with deltatune.use(model, None), torch.no_grad():
        expected = model(inputs_embeds=embeds).logits[:, 4:]
    with deltatune.use(model, "mlp"):
        torch.testing.assert_close(run(model, x), expected, atol=1e-6, rtol=0)


def test_files_hold_the_outputs_for_peft_and_the_encoder_for_training(tmp_path):
    model, x = make("gpt2")
    deltatune.attach(model, deltatune.config("p_tuning", num_virtual_tokens=3, encoder_hidden_size=8))
    perturb(model, "default", seed=0)
    deltatune.save(model, tmp_path / "a")
    saved = {in_peft_form(k): v for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    torch.testing.assert_close(saved["prompt_embeddings"],
                               _encoder(model).virtual_tokens().detach())
    assert "base_model.model.transformer.prompt_encoder.mlp_head.4.weight" in saved
    fresh, _ = make("gpt2")
    deltatune.load(fresh, tmp_path / "a", trainable=True)
    assert len(deltatune.trainable_parameters(fresh)) == 7  # the encoder, ready to train on
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=1e-6, rtol=0)


def test_without_reparameterisation_the_table_is_the_prompt():
    model, _ = make("llama")
    deltatune.attach(model, deltatune.config("p_tuning", num_virtual_tokens=5, reparameterize=False))
    encoder = _encoder(model)
    assert [n for n, _ in encoder.named_parameters()] == ["embedding.weight"]
    assert encoder.virtual_tokens() is encoder.embedding.weight


@pytest.mark.parametrize("kind,layers", [("MLP", 2), ("LSTM", 1), ("LSTM", 3)])
def test_parameter_count_formula_on_a_576_wide_body(kind, layers):
    config = deltatune.config("p_tuning", encoder_reparameterization_type=kind, encoder_num_layers=layers,
                              encoder_hidden_size=128)
    encoder = config.make_encoder(BodyDims(576), None, None)
    assert config.count(BodyDims(576)) == sum(p.numel() for p in encoder.parameters())


@pytest.mark.parametrize("fields,message", [
    ({"encoder_hidden_size": 0}, "encoder_hidden_size must be > 0"),
    ({"encoder_num_layers": 0}, "encoder_num_layers must be > 0"),
    ({"encoder_dropout": 1.0}, r"encoder_dropout must be in \[0, 1\)"),
    ({"encoder_reparameterization_type": "GRU"}, "p_tuning.encoder_reparameterization_type must be"),
])
def test_bad_config_values(fields, message):
    with pytest.raises(DeltatuneError, match=message):
        deltatune.config("p_tuning", **fields)
