"""ComPEFT: compress an adapter's update by sparsification and ternary quantisation, without retraining.

"ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and Quantization"
(Yadav et al., 2023), https://arxiv.org/abs/2311.13171. Each saved tensor τ of the adapter (its update from a
zero start: LoRA's B, a full delta, a scaling vector's offset ...) becomes τ̂ = α·σ(τ)·sign(τ)⊙m, with m the top
`density` fraction of |τ| and σ(τ) its standard deviation (α = None: the least-squares scale instead): one bit
of position and one of sign per entry, packed, and one float per tensor. Tensors of fewer than 64 entries are kept as they are.

`compress` writes `compeft.safetensors` (packed masks and signs, scales) with the adapter's config and reports
the sizes before/after, each tensor's relative error, and — given the base model — the quality check: how far the
adapted model's logits move on random tokens, relative to the adapter's own effect. `decompress` writes a normal
adapter directory back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..core.errors import DeltatuneError
from ..core.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_files, read_adapter_dir
from .checkpoint import read_header
from .sparsify import magnitude_mask

PACKED_NAME = "compeft.safetensors"
META_NAME = "compeft.json"
_MIN_ENTRIES = 64


def ternary(tau: torch.Tensor, density: float, alpha: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(kept mask, positive-sign mask, scale) of ComPEFT's τ̂ = scale·sign(τ)⊙mask, scale = α·σ(τ).

    alpha None: the least-squares scale, the mean |τ| of the kept entries (ComPEFT tunes α on validation data;
    this is the data-free choice that minimises ‖τ − τ̂‖)."""
    mask = magnitude_mask(tau, density)
    if alpha is None:
        scale = float(tau.float().abs()[mask].mean()) if mask.any() else 0.0
    else:
        scale = alpha * float(tau.float().std()) if tau.numel() > 1 else float(tau.abs().max())
    return mask, tau > 0, scale


def expand(mask: torch.Tensor, positive: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    sign = positive.to(torch.float32) * 2 - 1
    return (sign * mask * scale).to(dtype)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy().astype(np.uint8)))


def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    count = int(np.prod(shape)) if shape else 1
    return torch.from_numpy(np.unpackbits(packed.numpy())[:count].astype(bool)).reshape(shape)


def compress(adapter: str | os.PathLike, out: str | os.PathLike, *, density: float = 0.1,
             alpha: float | None = None, base: str | None = None) -> dict:
    """ComPEFT-compress the adapter at `adapter` into `out`; returns sizes, errors and (with `base`) the quality."""
    if not 0 < density <= 1:
        raise DeltatuneError(f"density must be in (0, 1], got {density}")
    raw_config, tensors = read_adapter_dir(adapter)
    metadata = read_header(Path(adapter) / WEIGHTS_NAME)[0].get("__metadata__") or {}
    packed, meta, errors = {}, {"density": density, "alpha": alpha, "metadata": metadata, "tensors": {}}, {}
    for key, tau in tensors.items():
        entry = {"shape": list(tau.shape), "dtype": str(tau.dtype).removeprefix("torch.")}
        if not tau.is_floating_point() or tau.numel() < _MIN_ENTRIES:
            packed[key] = tau.contiguous()
            entry["raw"] = True
        else:
            mask, positive, scale = ternary(tau, density, alpha)
            packed[f"{key}::mask"] = _pack(mask)
            packed[f"{key}::sign"] = _pack(positive[mask])
            entry["scale"] = scale
            approx = expand(mask, positive, scale, torch.float32)
            errors[key] = float((approx - tau.float()).norm() / tau.float().norm().clamp(min=1e-12))
        meta["tensors"][key] = entry
    blob = save_bytes(packed)
    atomic_write_files(out, {PACKED_NAME: blob, META_NAME: json.dumps(meta, indent=1).encode(),
                             CONFIG_NAME: json.dumps(raw_config, indent=2).encode()})
    before = (Path(adapter) / WEIGHTS_NAME).stat().st_size
    report = {"output": str(out), "bytes_before": before, "bytes_after": len(blob), "ratio": round(before / len(blob), 2),
              "tensors_compressed": len(errors),
              "mean_relative_error": round(sum(errors.values()) / max(1, len(errors)), 4)}
    if base is not None:
        report["quality"] = quality_check(adapter, out, base)
    return report


def _expanded_tensors(compressed: str | os.PathLike) -> tuple[dict, dict, dict]:
    directory = Path(compressed)
    if not (directory / META_NAME).is_file() or not (directory / PACKED_NAME).is_file():
        raise DeltatuneError(f"{str(directory)!r} is not a ComPEFT directory (needs {META_NAME} and {PACKED_NAME})")
    meta = json.loads((directory / META_NAME).read_text())
    packed = load_bytes((directory / PACKED_NAME).read_bytes())
    tensors = {}
    for key, entry in meta["tensors"].items():
        dtype = getattr(torch, entry["dtype"])
        if entry.get("raw"):
            tensors[key] = packed[key]
            continue
        mask = _unpack(packed[f"{key}::mask"], entry["shape"])
        positive = torch.zeros(entry["shape"], dtype=torch.bool)
        positive[mask] = _unpack(packed[f"{key}::sign"], [int(mask.sum())])
        tensors[key] = expand(mask, positive, entry["scale"], dtype)
    config = json.loads((directory / CONFIG_NAME).read_text())
    return config, tensors, meta.get("metadata") or {}


def decompress(compressed: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the compressed adapter back as a normal adapter directory (PEFT layout)."""
    config, tensors, metadata = _expanded_tensors(compressed)
    blob = save_bytes(tensors, metadata={"format": "pt", **metadata})
    atomic_write_files(out, {WEIGHTS_NAME: blob, CONFIG_NAME: json.dumps(config, indent=2).encode()})
    return {"output": str(out), "tensors": len(tensors)}


def quality_check(original: str | os.PathLike, compressed: str | os.PathLike, base: str, tokens: int = 64) -> dict:
    """How much of the adapter's effect on the logits survives compression, on random token ids."""
    import tempfile

    import deltatune

    from .export import load_base

    model, _ = load_base(base, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        decompress(compressed, Path(tmp) / "adapter")
        deltatune.load(model, original, name="original")
        deltatune.load(model, Path(tmp) / "adapter", name="compressed")
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, tokens // 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = {}
        for name in (None, "original", "compressed"):
            with deltatune.use(model, name):
                outputs[name] = model(ids).logits.float()
    effect = (outputs["original"] - outputs[None]).norm()
    moved = (outputs["compressed"] - outputs["original"]).norm()
    agree = (outputs["compressed"].argmax(-1) == outputs["original"].argmax(-1)).float().mean()
    return {"logit_error_vs_adapter_effect": round(float(moved / effect.clamp(min=1e-12)), 4),
            "top1_agreement": round(float(agree), 4)}
