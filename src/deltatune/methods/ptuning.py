"""P-tuning: "GPT Understands, Too", Liu et al., 2021, https://arxiv.org/abs/2103.10385

Rule: P virtual token embeddings come out of a trainable prompt encoder instead of being free parameters,
h = f(e), e ∈ R^{P×d}; the frozen model runs on [h; E(x)]. The paper's encoder is a bidirectional LSTM followed by
a two-layer ReLU MLP, h_i = MLP([LSTM→(e_{0:i}); LSTM←(e_{i:P})]); PEFT also offers a three-layer ReLU MLP
(`encoder_reparameterization_type`: "LSTM" or "MLP", PEFT's names and module layout).
Shapes (H = encoder_hidden_size, default d): embedding P×d; MLP d→H→H→d; LSTM d→H per direction and layer, then
2H→2H→d. Init: PyTorch's defaults (as PEFT). After training only the encoder's outputs matter: files store them as
`prompt_embeddings` (what PEFT saves and loads) beside the encoder weights (what deltatune resumes from);
`reparameterize=False` holds just those outputs, which is how a PEFT-saved P-tuning adapter loads.
Runs through the shared prompt-style delta (see prompt.py): virtual tokens on the model body, not mergeable.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import Tensor, nn

from ..core.errors import DeltatuneError
from .prompt import PROMPT_FILE_KEY, PromptStyleConfig, from_peft_common, peft_common, register_prompt_method
from .prompt_body import BodyDims


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTuningConfig(PromptStyleConfig):
    """Attributes:
    num_virtual_tokens: P, the number of virtual tokens.
    encoder_reparameterization_type: "MLP" (three ReLU layers) or "LSTM" (the paper's biLSTM + two-layer MLP).
    encoder_hidden_size: H, the encoder's hidden width (default: the model width d).
    encoder_num_layers: LSTM layers (the MLP always has three).
    encoder_dropout: dropout between LSTM layers.
    reparameterize: False keeps only the encoder's outputs (P×d), as PEFT saves a trained P-tuning adapter.
    """

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    reparameterize: bool = True

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise DeltatuneError(f"p_tuning: encoder_hidden_size must be > 0, got {self.encoder_hidden_size}")
        if self.encoder_num_layers <= 0:
            raise DeltatuneError(f"p_tuning: encoder_num_layers must be > 0, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise DeltatuneError(f"p_tuning: encoder_dropout must be in [0, 1), got {self.encoder_dropout}")

    def make_encoder(self, dims: BodyDims, word_embeddings: nn.Embedding, body: nn.Module) -> nn.Module:
        return PromptEncoder(self, dims.hidden)

    def count(self, dims: BodyDims) -> int:
        d, hidden = dims.hidden, self.encoder_hidden_size or dims.hidden
        table = self.num_virtual_tokens * d
        if not self.reparameterize:
            return table
        if self.encoder_reparameterization_type == "MLP":
            return table + (d * hidden + hidden) + (hidden * hidden + hidden) + (hidden * d + d)
        lstm = 0
        for layer in range(self.encoder_num_layers):  # two directions, four gates, input + recurrent weights + 2 biases
            width_in = d if layer == 0 else 2 * hidden
            lstm += 2 * (4 * hidden * (width_in + hidden) + 8 * hidden)
        return table + lstm + (4 * hidden * hidden + 2 * hidden) + (2 * hidden * d + d)


class PromptEncoder(nn.Module):
    """The P-tuning prompt encoder (PEFT's module names: embedding, lstm_head, mlp_head)."""

    def __init__(self, config: PTuningConfig, d: int) -> None:
        super().__init__()
        hidden = config.encoder_hidden_size or d
        self.kind = config.encoder_reparameterization_type if config.reparameterize else None
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(d, hidden, num_layers=config.encoder_num_layers, bidirectional=True,
                                     dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        elif self.kind == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d))

    def virtual_tokens(self) -> Tensor:
        e = self.embedding.weight  # (P, d)
        if self.kind == "LSTM":
            return self.mlp_head(self.lstm_head(e.unsqueeze(0))[0]).squeeze(0)  # (P, d)
        return self.mlp_head(e) if self.kind == "MLP" else e

    def prefix(self) -> None:
        return None

    def token_update(self) -> None:
        return None

    def file_tensors(self) -> dict[str, Tensor]:
        outputs = {PROMPT_FILE_KEY: self.virtual_tokens()}
        if self.kind is None:
            return outputs
        return {**outputs, **{f"prompt_encoder.{k}": v for k, v in self.state_dict().items()}}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        if self.kind is None:
            self.embedding.weight.copy_(tensors[PROMPT_FILE_KEY])
            return
        # the encoder weights are the adapter; the stored outputs only serve PEFT, which cannot run the encoder
        self.load_state_dict({k.removeprefix("prompt_encoder."): v for k, v in tensors.items()
                              if k != PROMPT_FILE_KEY})


_ENCODER_FIELDS = ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout")


def _to_peft(config: PTuningConfig) -> dict:
    return {**peft_common(config), **{f: getattr(config, f) for f in _ENCODER_FIELDS}}


def _from_peft(raw: dict) -> dict:
    fields = from_peft_common("P-tuning", raw, _ENCODER_FIELDS)
    kind = raw.get("encoder_reparameterization_type") or "MLP"
    if kind not in ("MLP", "LSTM"):
        raise DeltatuneError(f"PEFT P-tuning encoder_reparameterization_type={kind!r} is not supported")
    # PEFT saves only the encoder's outputs, so the adapter loads without its encoder
    return {**fields, "encoder_reparameterization_type": kind, "encoder_hidden_size": raw.get("encoder_hidden_size"),
            "encoder_num_layers": raw.get("encoder_num_layers") or 2,
            "encoder_dropout": float(raw.get("encoder_dropout") or 0.0), "reparameterize": False}


PAPER = "GPT Understands, Too (Liu et al., 2021) https://arxiv.org/abs/2103.10385"
register_prompt_method("p_tuning", PTuningConfig, PAPER, ("P_TUNING", _to_peft, _from_peft))
