"""Merging and arithmetic: merge methods as pure tensor functions, full-model merges out of core, and adapter
arithmetic, conversion, extraction, export and compression.

    run_merge(load_merge_config("ties.yaml"), "out/")                # full models, out of core
    combine(model, ["a", "b"], weights=[1, -0.5], out="ab")          # adapters of any mergeable method
    convert(model, "dora_dir", rank=16, out="lora16")                # any adapter -> plain LoRA
    extract_lora("finetuned/", "base/", out="lora", rank=32)         # full fine-tune -> LoRA
    export("adapter/", "base/", "merged/")                           # adapter merged into a model directory

The package is `merging`, not `merge`: a subpackage named `merge` would replace the function `deltatune.merge` as an
attribute of the `deltatune` package as soon as it is imported.
"""

from __future__ import annotations

from .arithmetic import CombineResult, combine, convert
from .config import MergeConfig, load_merge_config, parse_merge_config
from .export import export
from .extract import extract_lora
from .full import run_merge
from .registry import PerModel, TensorInfo, get_merge_method, merge_method, merge_methods

__all__ = ["CombineResult", "MergeConfig", "PerModel", "TensorInfo", "combine", "convert", "export", "extract_lora",
           "get_merge_method", "load_merge_config", "merge_method", "merge_methods", "parse_merge_config",
           "run_merge"]
