"""DePT: "DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning", Shi & Lipani, 2023,
https://arxiv.org/abs/2309.05173

Rule: a long soft prompt is decomposed into a shorter one, E_v ∈ R^{P×d}, plus a low-rank update of the input
token embeddings by position: the token at position p gets E(x_p) + s·(A·B)[p], with A ∈ R^{M×r}, B ∈ R^{r×d},
M = max_length, s = alpha / √r (the authors' code); the model runs on [E_v; E(x) + s·A·B].
Positions are the real tokens' own (left padding and cached generation keep them); positions ≥ M get no update,
as the paper trains on inputs padded to M. Init (the authors' code): A Kaiming-uniform, B = 0, so only the short
prompt acts at step 0; the prompt's inits are prompt tuning's ("vocab", "random", "text").
Parameters: P·d + M·r + r·d (the defaults P=60, r=30, M=256 match 100-token prompt tuning at d=768). The paper
trains the prompt and the pair with two learning rates: the prompt is the "fast" group of
`deltatune.optim.param_groups` (its `lora_plus_ratio` is the prompt / low-rank learning-rate ratio).
Not in PEFT; tensors are saved as `prompt_embeddings`, `lora_embedding_A`, `lora_embedding_B` (the authors' names).
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor, nn

from ..core.errors import DeltatuneError
from .prompt import (
    PROMPT_FILE_KEY,
    InitKind,
    PromptStyleConfig,
    VirtualTokenTable,
    check_init,
    register_prompt_method,
)
from .prompt_body import BodyDims


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeptConfig(PromptStyleConfig):
    """Attributes:
    num_virtual_tokens: P, the short prompt's length.
    r: rank of the embedding update A·B.
    alpha: scaling numerator, s = alpha / √r.
    max_length: M, the positions the update covers.
    init: the prompt's init: "vocab", "random" or "text" (as prompt tuning).
    init_text: the text whose token embeddings start the prompt (with init="text").
    tokenizer: tokenizer directory for init="text" (default: the model's own directory).
    """

    num_virtual_tokens: int = 60
    r: int = 30
    alpha: float = 8.0
    max_length: int = 256
    init: InitKind = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.max_length <= 0:
            raise DeltatuneError(f"dept: r and max_length must be > 0, got r={self.r}, max_length={self.max_length}")
        check_init(self, self.init, self.init_text)

    def make_encoder(self, dims: BodyDims, word_embeddings: nn.Embedding, body: nn.Module) -> nn.Module:
        return DeptEncoder(self, dims, word_embeddings, body)

    def count(self, dims: BodyDims) -> int:
        return self.num_virtual_tokens * dims.hidden + self.max_length * self.r + self.r * dims.hidden


class DeptEncoder(VirtualTokenTable):
    """The short prompt (`embedding`) and the low-rank pair (lora_embedding_A, lora_embedding_B)."""

    fast = ("embedding.weight",)

    def __init__(self, config: DeptConfig, dims: BodyDims, word_embeddings: nn.Embedding, body: nn.Module) -> None:
        super().__init__(config, dims, word_embeddings, body)
        self.lora_embedding_A = nn.Parameter(nn.init.kaiming_uniform_(
            self.embedding.weight.new_empty(config.max_length, config.r), a=math.sqrt(5)))
        self.lora_embedding_B = nn.Parameter(self.embedding.weight.new_zeros(config.r, dims.hidden))
        self.scaling = config.alpha / math.sqrt(config.r)

    def virtual_tokens(self) -> Tensor:
        return self.embedding.weight

    def prefix(self) -> None:
        return None

    def token_update(self) -> Tensor:
        return self.scaling * (self.lora_embedding_A @ self.lora_embedding_B)  # (M, d)

    def file_tensors(self) -> dict[str, Tensor]:
        return {PROMPT_FILE_KEY: self.embedding.weight, "lora_embedding_A": self.lora_embedding_A,
                "lora_embedding_B": self.lora_embedding_B}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.embedding.weight.copy_(tensors[PROMPT_FILE_KEY])
        self.lora_embedding_A.copy_(tensors["lora_embedding_A"])
        self.lora_embedding_B.copy_(tensors["lora_embedding_B"])


PAPER = ("DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning (Shi & Lipani, 2023) "
         "https://arxiv.org/abs/2309.05173")
register_prompt_method("dept", DeptConfig, PAPER)
