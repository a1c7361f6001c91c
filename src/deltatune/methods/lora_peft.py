"""LoRA / rsLoRA / DoRA <-> PEFT `LoraConfig` fields (adapter_config.json with peft_type "LORA").

Loading is an allowlist: a PEFT field we do not understand, set to anything but its empty default, is refused with
its name rather than silently ignored (a LoRA with layer replication or aLoRA invocation tokens would otherwise load
and give wrong outputs).
"""

from __future__ import annotations

from ..core.errors import DeltatuneError
from ..core.registry import PeftFormat
from .factored import refuse_unknown_peft_fields

# Fields that only matter when PEFT creates or trains an adapter, not when it is loaded.
_IGNORED = {
    "fan_in_fan_out", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "ensure_weight_tying", "qalora_group_size", "megatron_core", "velora_config", "use_dora", "use_rslora",
    "r", "lora_alpha", "lora_dropout", "bias", "lora_bias", "rank_pattern", "alpha_pattern",
}


def lora_peft_format(*, dora: bool, claims: bool = True) -> PeftFormat:
    """The PEFT mapping for LoRA (dora=False) or DoRA (dora=True)."""

    def to_peft(config) -> dict:
        return {
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "use_dora": dora,
            "bias": config.bias,
            "lora_bias": config.lora_bias,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}[config.init],
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
            "fan_in_fan_out": False,  # PEFT sets it per layer for transformers Conv1D
        }

    def from_peft(raw: dict) -> dict:
        refuse_unknown_peft_fields("LoRA", raw, _IGNORED)
        bias = raw.get("bias", "none")
        if bias not in ("none", "lora_only"):
            raise DeltatuneError(f"PEFT LoRA bias={bias!r} is not supported; deltatune supports 'none' and 'lora_only'")
        init = raw.get("init_lora_weights", True)
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
