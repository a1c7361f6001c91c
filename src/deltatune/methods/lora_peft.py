"""LoRA / rsLoRA / DoRA <-> PEFT `LoraConfig` fields (adapter_config.json with peft_type "LORA").

Loading is an allowlist: a PEFT field we do not understand, set to anything but its empty default, is refused with
its name rather than silently ignored (a LoRA with layer replication or aLoRA invocation tokens would otherwise load
and give wrong outputs).
"""

from __future__ import annotations

import math

from ..core.errors import DeltatuneError
from ..core.registry import PeftFormat
from .factored import refuse_unknown_peft_fields
from .lora_init import WITH_OFFSET

# PEFT inits that rewrite the base weights: an adapter saved after them (without PEFT's conversion) is relative to
# weights we do not have.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# Fields that only matter when PEFT creates or trains an adapter, not when it is loaded.
_IGNORED = {
    "fan_in_fan_out", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "ensure_weight_tying", "qalora_group_size", "megatron_core", "velora_config", "use_dora", "use_rslora",
    "r", "lora_alpha", "lora_dropout", "bias", "lora_bias", "rank_pattern", "alpha_pattern",
}


def lora_peft_format(*, dora: bool, claims: bool = True) -> PeftFormat:
    """The PEFT mapping for LoRA (dora=False) or DoRA (dora=True)."""

    def to_peft(config) -> dict:
        # An init with a frozen start is saved as PEFT's converted form: rank 2r, alpha scaled to keep s.
        rank_factor = 2 if config.init in WITH_OFFSET else 1
        alpha_factor = 1.0 if rank_factor == 1 else math.sqrt(2.0) if config.use_rslora else 2.0
        return {
            "r": config.r * rank_factor,
            "lora_alpha": config.alpha * alpha_factor,
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "use_dora": dora,
            "bias": config.bias,
            "lora_bias": config.lora_bias,
            "init_lora_weights": {"gaussian": "gaussian", "random": False}.get(config.init, True),
            "rank_pattern": {k: v * rank_factor for k, v in config.rank_pattern.items()},
            "alpha_pattern": {k: v * alpha_factor for k, v in config.alpha_pattern.items()},
            "fan_in_fan_out": False,  # PEFT sets it per layer for transformers Conv1D
        }

    def from_peft(raw: dict) -> dict:
        refuse_unknown_peft_fields("LoRA", raw, _IGNORED)
        bias = raw.get("bias", "none")
        if bias not in ("none", "lora_only"):
            raise DeltatuneError(f"PEFT LoRA bias={bias!r} is not supported; deltatune supports 'none' and 'lora_only'")
        init = raw.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
            raise DeltatuneError(
                f"PEFT LoRA with init_lora_weights={init!r} was saved relative to the base weights PEFT rewrote at "
                "init; re-save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a "
                "plain LoRA relative to the original base"
            )
        return {
            "r": raw.get("r", 8),
            "alpha": raw.get("lora_alpha", 8),
            "dropout": raw.get("lora_dropout", 0.0),
            "use_rslora": bool(raw.get("use_rslora", False)),
            "bias": bias,
            "lora_bias": bool(raw.get("lora_bias", False)),
            "init": "random" if init is False else "gaussian" if init == "gaussian" else "default",
            "rank_pattern": raw.get("rank_pattern") or {},
            "alpha_pattern": raw.get("alpha_pattern") or {},
        }

    def claim(raw: dict) -> bool:
        return claims and bool(raw.get("use_dora", False)) == dora and not raw.get("kasa_config")

    return PeftFormat("LORA", to_peft, from_peft, claim)
