"""Tiny random models for the test matrix: every host kind, plus a tiny Llama and a tiny GPT-2 (Conv1D); and the
few helpers every test uses on them (run, perturb, per-sample checks, save / reload)."""

from __future__ import annotations

import copy
import functools

import torch
from safetensors.torch import load_file
from torch import nn

import deltatune

BATCH = 3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.norm = nn.LayerNorm(20)
        self.lin1 = nn.Linear(20, 20, bias=False)
        self.lin2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(self.norm(torch.relu(self.lin0(x))))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1d = nn.Conv1d(6, 5, 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.conv2d(x)).flatten(2)  # (B, 6, 36)
        return self.head(torch.relu(self.conv1d(h)).mean(-1))


class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.proj = nn.Linear(12, 4)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


# name -> (builder, input maker, modules to target: every host kind the model has)
TOYS = {
    "mlp": (MLP, lambda g: torch.randn(BATCH, 10, generator=g), ["lin0", "lin1", "lin2", "norm"]),
    "conv": (ConvNet, lambda g: torch.randn(BATCH, 3, 6, 6, generator=g), ["conv2d", "conv1d", "head"]),
    "emb": (EmbNet, lambda g: torch.randint(0, 30, (BATCH, 7), generator=g), ["emb", "proj"]),
    "llama": (tiny_llama, lambda g: torch.randint(0, 64, (BATCH, 6), generator=g),
              ["embed_tokens", "q_proj", "v_proj", "down_proj", "input_layernorm"]),
    "gpt2": (tiny_gpt2, lambda g: torch.randint(0, 64, (BATCH, 6), generator=g), ["c_attn", "c_proj", "c_fc", "ln_1"]),
}


@functools.lru_cache(maxsize=None)
def _pristine(name: str) -> nn.Module:
    torch.manual_seed(0)
    return TOYS[name][0]().eval()


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy of toy model `name` (same weights every time) and its input batch."""
    model = copy.deepcopy(_pristine(name))
    g = torch.Generator().manual_seed(1)
    return model, TOYS[name][1](g)


def run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def perturb(model: nn.Module, name: str, seed: int, scale: float = 0.2) -> None:
    """Force a non-identity adapter: add noise to every parameter of adapter `name`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".deltatune.{name}." in pname or pname.startswith(f"deltatune_shared.{name}."):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def assert_per_sample_matches_alone(model: nn.Module, x: torch.Tensor, names: list, atol: float = 2e-5,
                                    rtol: float = 1e-4) -> None:
    """A mixed batch routed row by row (`names`, None = base model) gives each row what its adapter alone gives."""
    with deltatune.per_sample(model, names):
        mixed = run(model, x)
    for i, name in enumerate(names):
        with deltatune.use(model, name):
            torch.testing.assert_close(mixed[i : i + 1], run(model, x[i : i + 1]), atol=atol, rtol=rtol)


def save_and_reload(model: nn.Module, toy: str, tmp_path, atol: float = 1e-6,
                    rtol: float = 0.0) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Save adapter "default", load it into a fresh copy of the toy and check that it gives the same output on the
    toy's input: (the saved tensors by key, the fresh model)."""
    deltatune.save(model, tmp_path / "a")
    fresh, x = make(toy)
    deltatune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(run(fresh, x), run(model, x), atol=atol, rtol=rtol)
    return load_file(tmp_path / "a" / "adapter_model.safetensors"), fresh
