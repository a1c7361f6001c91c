"""VB-LoRA: "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks", Li et al., 2024,
https://arxiv.org/abs/2405.15179

Update rule (matrix view, W of shape out × in):  W' = W + B·A, where every length-b sub-vector of A (rows of A cut
into in/b pieces) and of B (columns of B cut into out/b pieces) is a top-k admixture of one vector bank shared by all
layers:  v = Σ_{j ∈ topk(z)} softmax(z_topk)_j · bank_j,  z ∈ R^h the sub-vector's logits.
Init: bank ~ U(-bound, bound), logits ~ N(0, std²) (as PEFT; the model changes at step 0, so identity_at_init is
False). Shapes: bank (h, b), adapter-wide and trainable; per layer logits_A (r, ⌈in/b⌉, h), logits_B (⌈out/b⌉, r, h).
When b does not divide a dimension the last sub-vector is cut short (PEFT refuses such layers; shapes agree with PEFT
wherever b divides). Saved with PEFT's names: `<module>.vblora_logits_A`, `<module>.vblora_logits_B` and the
adapter-wide `vblora_vector_bank`; with `save_only_topk_weights` the logits are stored as PEFT's top-k indices and
k-1 weights instead (for inference: the other logits load as -inf).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import register_method
from ..core.slot import Host
from .factored import RankConfig, check_positive
from .vera import SharedBasesDelta, peft_format


@dataclasses.dataclass(frozen=True, kw_only=True)
class VbloraConfig(RankConfig):
    """Attributes (besides r, the rank of the update B·A, and dropout on the VB-LoRA branch's input):
    num_vectors: h, the number of vectors in the shared bank.
    vector_length: b, the length of each bank vector (and of each sub-vector of A and B).
    topk: k, how many bank vectors each sub-vector mixes.
    init_vector_bank_bound: the bank starts uniform in [-bound, bound] (not zero, which would stall training).
    init_logits_std: standard deviation of the initial logits.
    save_only_topk_weights: store top-k indices and weights instead of the logits (smaller; not for resuming training).
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    save_only_topk_weights: bool = False

    def validate(self) -> None:
        super().validate()
        check_positive(self.method, num_vectors=self.num_vectors, vector_length=self.vector_length, topk=self.topk,
                       init_vector_bank_bound=self.init_vector_bank_bound)
        if self.topk > self.num_vectors:
            raise DeltatuneError(f"{self.method}: topk={self.topk} exceeds num_vectors={self.num_vectors}; "
                                 "lower topk or enlarge the bank")
        if self.init_logits_std < 0:
            raise DeltatuneError(f"{self.method}: init_logits_std must be >= 0, got {self.init_logits_std}")


def admix(logits: Tensor, bank: Tensor, k: int) -> Tensor:
    """Each logit vector (..., h) -> the softmax-weighted sum of its top-k bank vectors (..., b)."""
    top, idx = logits.topk(k, dim=-1)
    return torch.einsum("...k,...kb->...b", F.softmax(top, dim=-1), bank[idx])


def index_dtype(num_vectors: int) -> torch.dtype:
    """The narrowest integer type PEFT uses for top-k indices into a bank of this size."""
    for limit, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if num_vectors < limit:
            return dtype
    return torch.int64


_LOGITS = ("vblora_logits_A", "vblora_logits_B")


class VectorBank(nn.Module):
    """The adapter-wide, trained bank (h, b), uniform in [-bound, bound] at init."""

    def __init__(self, config: VbloraConfig, hosts: dict[str, HostInfo]) -> None:
        super().__init__()
        bound = config.init_vector_bank_bound
        bank = torch.empty(config.num_vectors, config.vector_length).uniform_(-bound, bound)
        self.vblora_vector_bank = nn.Parameter(bank)


class VbloraDelta(SharedBasesDelta):
    """y = base(x) + B(A(x)), A and B assembled from the shared bank by this layer's logits."""

    identity_at_init = False
    shared_module = VectorBank
    shared_keys = ("vblora_vector_bank",)

    def __init__(self, config: VbloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        self.dropout = config.dropout
        b, h = config.vector_length, config.num_vectors
        self.vblora_logits_A = nn.Parameter(torch.empty(config.r, math.ceil(info.fan_in / b), h))
        self.vblora_logits_B = nn.Parameter(torch.empty(math.ceil(info.out_features / b), config.r, h))
        with torch.no_grad():
            nn.init.normal_(self.vblora_logits_A, 0.0, config.init_logits_std)
            nn.init.normal_(self.vblora_logits_B, 0.0, config.init_logits_std)

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        bank, k, r = self.shared.vblora_vector_bank, self.config.topk, self.config.r
        a = admix(self.vblora_logits_A, bank, k).reshape(r, -1)[:, : self.info.fan_in]  # (r, fan_in)
        b = admix(self.vblora_logits_B, bank, k).transpose(1, 2).reshape(-1, r)[: self.info.out_features]
        return a, b

    @classmethod
    def num_parameters(cls, config: VbloraConfig, info: HostInfo, path: str) -> int:
        tiles = math.ceil(info.fan_in / config.vector_length) + math.ceil(info.out_features / config.vector_length)
        return config.num_vectors * config.r * tiles

    @classmethod
    def num_shared_parameters(cls, config: VbloraConfig, hosts: dict[str, HostInfo]) -> int:
        """The bank, trained once per adapter: h·b."""
        return config.num_vectors * config.vector_length

    # ---- on disk: the logits, or PEFT's top-k form --------------------------------------------------------------
    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        if not self.config.save_only_topk_weights:
            return super().state_tensors(host)
        out = {}
        for name in _LOGITS:
            top, idx = getattr(self, name).detach().topk(self.config.topk, dim=-1)
            out[f"{name}_topk_indices"] = idx.to(index_dtype(self.config.num_vectors))
            out[f"{name}_topk_weights"] = F.softmax(top, dim=-1)[..., :-1].contiguous()  # the last one is 1 - sum
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        if not self.config.save_only_topk_weights:
            return super().load_state_tensors(tensors, host)
        with torch.no_grad():
            for name in _LOGITS:
                weights = tensors[f"{name}_topk_weights"]
                weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
                logits = getattr(self, name)
                logits.fill_(float("-inf"))
                logits.scatter_(-1, tensors[f"{name}_topk_indices"].long(), weights.log().to(logits.dtype))
        return None


PAPER = ("VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li et al., 2024) "
         "https://arxiv.org/abs/2405.15179")
VBLORA_PEFT = peft_format(
    "VBLORA",
    {"r": "r", "num_vectors": "num_vectors", "vector_length": "vector_length", "topk": "topk",
     "vblora_dropout": "dropout", "init_vector_bank_bound": "init_vector_bank_bound",
     "init_logits_std": "init_logits_std", "save_only_topk_weights": "save_only_topk_weights"},
    required={"bias": "none"},
    ignored=("fan_in_fan_out",),
    written={"fan_in_fan_out": False},
)
register_method("vblora", config=VbloraConfig, family="low-rank", paper=PAPER, peft=VBLORA_PEFT)(VbloraDelta)
