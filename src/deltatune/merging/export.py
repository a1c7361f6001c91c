"""`deltatune export`: an adapter merged into its base, written as a plain transformers model directory.

The base is loaded in its stored dtype, the adapter is merged through `deltatune.merge` (NaN/Inf refused), the
hooks are removed, and the model is saved as sharded safetensors with its tokenizer files, into a staging directory
renamed into place at the end.

Tied embeddings: `deltatune.merge` refuses to write into a tied weight (the other user would change too). When the
adapter touches the input embedding or the LM head of a tied model, the head gets its own copy of the weight and
the config says `tie_word_embeddings: false` before merging — exactly what the unmerged adapter computed, since
its hook only acts on the module it sits on. A model whose tied weights the adapter does not touch stays tied.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

import deltatune

from ..core.api import merge as merge_into_weights
from ..core.slot import slots_of
from .full import copy_tokenizer, fresh_output_dir, model_dir, publish_directory


def load_base(base: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, Path]:
    """A transformers model for `base` (a directory or an embedded name), in its stored dtype unless `dtype`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    directory = model_dir(base)
    config = AutoConfig.from_pretrained(directory)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    loader = AutoModelForCausalLM if causal else AutoModel
    hf_logging.disable_progress_bar()
    model = loader.from_pretrained(directory, dtype=dtype or "auto")
    return model.eval(), directory


def _untie_if_touched(model: nn.Module, adapter_paths: set[str]) -> bool:
    """Give the output head its own weight when the adapter adapts a tied embedding or head. Returns whether."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return False
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is not outputs.weight:
        return False
    names = {id(m): p for p, m in model.named_modules()}
    if not {names.get(id(inputs)), names.get(id(outputs))} & adapter_paths:
        return False
    outputs.weight = nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if getattr(model.config, "get_text_config", None) is not None:
        model.config.get_text_config().tie_word_embeddings = False
    return True


def export(adapter: str | os.PathLike, base: str, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
           max_shard_size: str = "2GB") -> dict:
    """Merge the adapter at `adapter` into `base` and write a transformers directory at `out`."""
    target = fresh_output_dir(out)
    model, directory = load_base(base, dtype)
    deltatune.load(model, adapter, name="export")
    paths = {p for p, _, slot in slots_of(model) if "export" in slot}
    untied = _untie_if_touched(model, paths)
    merge_into_weights(model, "export", safe=True)
    deltatune.detach(model)

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        copy_tokenizer(directory, staging)

    publish_directory(target, fill)
    return {"output": str(target), "modules_merged": len(paths), "untied_embeddings": untied,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
