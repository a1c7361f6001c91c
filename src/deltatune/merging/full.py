"""Full-model merges out of core: plan every output tensor, then read, merge and stream them one at a time.

Peak memory is one tensor from each input model plus the method's working set for that tensor (a few times its
size), never a whole model: inputs are read with positioned reads (`Checkpoint`), outputs are streamed into shards
whose headers are computed up front (`ShardWriter`). Everything is checked before the first tensor is read (models
exist, architectures and tensor shapes agree, every parameter resolves), the output is built in a staging
directory beside the target and renamed into place at the end, and a NaN/Inf result stops the merge with nothing
written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.errors import DeltatuneError
from ..core.io import check_output_dir, staging_dir
from .checkpoint import Checkpoint, ShardWriter
from .config import MergeConfig, Source, lookup
from .registry import MergeMethodSpec, TensorInfo, get_merge_method

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")
_POST_STACK = re.compile(r"(^|\.)(lm_head|score|classifier|norm|ln_f|final_layer_?norm|final_norm)(\.|$)")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_COPIED_FILES = ("generation_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")


@dataclass
class Job:
    """One output tensor: where its inputs come from and the method's resolved keyword arguments."""

    out_name: str
    inputs: list[tuple[str, str]]  # (model, tensor name) per merged model
    base: tuple[str, str] | None
    info: TensorInfo
    kwargs: dict[str, Any] = field(default_factory=dict)
    passthrough: bool = False  # copied from `inputs[0]` (non-float tensors, non-layer tensors of a slice merge)
    slice: Any = None  # the slice this tensor comes from (slice merges)
    t: float | None = None  # position for gradients, when not the layer's depth in the whole stack


def model_dir(ref: str) -> Path:
    from ..train.models import model_directory

    return model_directory(ref)


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, rest) for tensors inside a numbered module list (model.layers.3.mlp...)."""
    match = _LAYER.match(name)
    return (match["prefix"], int(match["index"]), match["rest"]) if match else None


class ModelSet:
    """The checkpoints and configs of every model a merge reads, opened lazily (headers only)."""

    def __init__(self, refs: list[str], statistics: dict[str, str] | None = None) -> None:
        self.dirs = {ref: model_dir(ref) for ref in refs}
        self.checkpoints = {ref: Checkpoint(d) for ref, d in self.dirs.items()}
        self.configs = {ref: _read_json(d / "config.json") for ref, d in self.dirs.items()}
        self.statistics = {ref: Checkpoint(path) for ref, path in (statistics or {}).items()}

    def statistics_for(self, ref: str, name: str) -> torch.Tensor | None:
        stats = self.statistics.get(ref)
        return stats.read(name) if stats is not None and name in stats else None

    def check_architectures(self, allow_crimes: bool, where: str) -> None:
        kinds = {ref: (cfg.get("model_type"), tuple(cfg.get("architectures") or ())) for ref, cfg in self.configs.items()}
        if len(set(kinds.values())) > 1 and not allow_crimes:
            listing = "; ".join(f"{ref}: {k[0]} {list(k[1])}" for ref, k in kinds.items())
            raise DeltatuneError(f"{where}: the models have different architectures ({listing}); merge models of one "
                                 "architecture, or set allow_crimes: true if the tensor layouts really match")

    def entry(self, ref: str, name: str):
        ckpt = self.checkpoints[ref]
        if name not in ckpt:
            raise DeltatuneError(f"tensor {name!r} is missing from model {ref!r}; the models must have the same "
                                 "tensors (same architecture and size)")
        return ckpt.entries[name]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DeltatuneError(f"{path.parent}: no config.json; is it a transformers model directory?")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DeltatuneError(f"{path}: not valid JSON ({err})") from None


# ---- planning ----------------------------------------------------------------------------------------------------
def plan_jobs(cfg: MergeConfig, spec: MergeMethodSpec, models: ModelSet) -> list[Job]:
    _check_parameter_names(cfg, spec)
    uses_base = spec.base != "unused"
    jobs = _plan_models(cfg, models, uses_base) if cfg.models is not None else _plan_slices(cfg, models, uses_base)
    for job in jobs:
        _check_shapes(job, models)
        if not job.passthrough:
            job.kwargs = _resolve_kwargs(cfg, spec, job)
    return jobs


def _check_parameter_names(cfg: MergeConfig, spec: MergeMethodSpec) -> None:
    scopes = [("parameters", cfg.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(cfg.models or [])]
    for i, sl in enumerate(cfg.slices or []):
        scopes += [(f"slices[{i}].parameters", sl.parameters)]
        scopes += [(f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(sl.sources)]
    for where, scope in scopes:
        unknown = sorted(set(scope) - set(spec.settings))
        if unknown:
            raise DeltatuneError(f"{cfg.where}: {where}: unknown parameter(s) {', '.join(unknown)} for merge method "
                                 f"{spec.name!r}; valid: {', '.join(spec.settings) or '(none)'}")


def _plan_models(cfg: MergeConfig, models: ModelSet, uses_base: bool) -> list[Job]:
    """Every tensor of the base (else the first model), merged across the models; a method that takes no base
    merges every listed model, the base model included when it is listed."""
    refs = [m.model for m in cfg.models if m.model != cfg.base_model or not uses_base]
    reference = cfg.base_model or refs[0]
    names = models.checkpoints[reference].names()
    count = max((lay[1] + 1 for n in names if (lay := layer_of(n))), default=1)
    jobs = []
    for name in names:
        lay = layer_of(name)
        info = TensorInfo(name, lay[1] if lay else None, count)
        base = (cfg.base_model, name) if cfg.base_model and uses_base else None
        floating = models.entry(reference, name).dtype.is_floating_point
        inputs = [(ref, name) for ref in refs] if floating else [(reference, name)]
        jobs.append(Job(name, inputs, base, info, passthrough=not floating))
    return jobs


def _plan_slices(cfg: MergeConfig, models: ModelSet, uses_base: bool) -> list[Job]:
    """Layers restacked from the slices' sources; tensors outside the stack are copied, those before it
    (embeddings) from the first slice's model and those after it (final norm, LM head) from the last one's."""
    first_model, last_model = cfg.slices[0].sources[0].model, cfg.slices[-1].sources[0].model
    jobs = []
    for name in models.checkpoints[first_model].names():
        if layer_of(name) is None:
            ref = last_model if _POST_STACK.search(name) else first_model
            jobs.append(Job(name, [(ref, name)], None, TensorInfo(name), passthrough=True))
    total = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in cfg.slices)
    offset = 0
    for sl in cfg.slices:
        first = sl.sources[0]
        length = first.layer_range[1] - first.layer_range[0]
        for j in range(length):
            layer_names = [(lay[0], lay[2]) for n in models.checkpoints[first.model].names()
                           if (lay := layer_of(n)) and lay[1] == first.layer_range[0] + j]
            if not layer_names:
                raise DeltatuneError(f"{cfg.where}: model {first.model!r} has no layer {first.layer_range[0] + j}")
            for prefix, rest in layer_names:
                jobs.append(_slice_job(cfg, sl, prefix, rest, (j, offset + j, length, total), uses_base))
        offset += length
    return jobs


def _slice_job(cfg: MergeConfig, sl, prefix: str, rest: str, position: tuple[int, int, int, int],
               uses_base: bool) -> Job:
    """Layer j of a slice, written as output layer `out_layer`; the slice's source from the base model is the
    method's base. Gradients run over the slice (as in mergekit); the layer index is the output's."""
    j, out_layer, length, total = position

    def source_name(src: Source) -> str:
        return f"{prefix}.{src.layer_range[0] + j}.{rest}"

    base = next((s for s in sl.sources if s.model == cfg.base_model), None) if uses_base else None
    inputs = [(s.model, source_name(s)) for s in sl.sources if s is not base]
    out_name = f"{prefix}.{out_layer}.{rest}"
    if not inputs:  # a slice of the base model alone is copied
        return Job(out_name, [(base.model, source_name(base))], None, TensorInfo(out_name, out_layer, total),
                   passthrough=True)
    return Job(out_name, inputs, None if base is None else (base.model, source_name(base)),
               TensorInfo(out_name, out_layer, total), slice=sl, t=j / (length - 1) if length > 1 else 0.0)


def _check_shapes(job: Job, models: ModelSet) -> None:
    refs = job.inputs + ([job.base] if job.base else [])
    entries = [models.entry(ref, name) for ref, name in refs]
    shapes = {e.shape for e in entries}
    if len(shapes) > 1:
        listing = ", ".join(f"{ref}: {tuple(e.shape)}" for (ref, _), e in zip(refs, entries))
        raise DeltatuneError(f"tensor {job.out_name!r} has different shapes across models ({listing}); the models "
                             "must share one architecture and size")


def _resolve_kwargs(cfg: MergeConfig, spec: MergeMethodSpec, job: Job) -> dict[str, Any]:
    sl = job.slice
    t = job.info.depth if job.t is None else job.t
    shared_scopes = ([sl.parameters] if sl else []) + [cfg.parameters]
    per_model_scopes = []
    for ref, _ in job.inputs:
        if sl is not None:
            src = next(s for s in sl.sources if s.model == ref)
            per_model_scopes.append([src.parameters, sl.parameters, cfg.parameters])
        else:
            model = next(m for m in cfg.models if m.model == ref)
            per_model_scopes.append([model.parameters, cfg.parameters])
    given: dict[str, Any] = {}
    for name, setting in spec.settings.items():
        if setting.per_model:
            values = [lookup(name, scopes, job.out_name, t) for scopes in per_model_scopes]
            if any(v is not None for v in values):
                given[name] = [setting.default if v is None else v for v in values]
        else:
            value = lookup(name, shared_scopes, job.out_name, t)
            if value is not None:
                given[name] = value
    where = f"{cfg.where}: tensor {job.out_name!r}"
    spec.check_inputs(len(job.inputs), job.base is not None, cfg.where)
    return spec.resolve(given, len(job.inputs), where)


# ---- running -----------------------------------------------------------------------------------------------------
def run_merge(cfg: MergeConfig, out: str | os.PathLike | None = None, *, progress: bool = False) -> Path:
    """Merge the models `cfg` describes into a new transformers directory `out` (or cfg.output)."""
    target = fresh_output_dir(out or cfg.output or _missing_output(cfg))
    spec = get_merge_method(cfg.merge_method)
    if spec.on_factors:
        raise DeltatuneError(f"{cfg.where}: merge method {spec.name!r} merges LoRA adapters (their factors), not "
                             "full models; use `deltatune combine` / deltatune.merging.combine")
    models = ModelSet(cfg.all_models(), {m.model: m.statistics for m in cfg.models or [] if m.statistics})
    if spec.uses_statistics and not models.statistics:
        raise DeltatuneError(f"{cfg.where}: merge method {spec.name!r} needs per-model statistics; add "
                             "'statistics: FILE.safetensors' to each model (see deltatune.merging.statistics)")
    models.check_architectures(cfg.allow_crimes, cfg.where)
    jobs = plan_jobs(cfg, spec, models)
    compute = getattr(torch, cfg.dtype) if cfg.dtype else None
    written = getattr(torch, cfg.out_dtype or cfg.dtype) if (cfg.out_dtype or cfg.dtype) else None
    plan = []
    for job in jobs:
        entry = models.entry(*job.inputs[0])
        dtype = written if written is not None and entry.dtype.is_floating_point else entry.dtype
        plan.append((job.out_name, dtype, entry.shape))

    def fill(staging: Path) -> None:
        writer = ShardWriter(staging, plan, cfg.shard_size, {"deltatune_merge_method": spec.name})
        for job, (_, dtype, _) in _bar(list(zip(jobs, plan)), progress):
            writer.write(job.out_name, _merge_one(job, spec, models, compute).to(dtype))
        writer.close()
        _write_side_files(cfg, models, staging, written, len({j.info.layer for j in jobs if j.info.layer is not None}))

    return publish_directory(target, fill)


def fresh_output_dir(out: str | os.PathLike) -> Path:
    """The output path, checked before any work: writable, and not an existing non-empty directory."""
    target = check_output_dir(out)
    if target.exists() and any(target.iterdir()):
        raise DeltatuneError(f"output directory {str(target)!r} exists and is not empty; choose a new path")
    return target


def publish_directory(target: Path, fill) -> Path:
    """Build a directory in a staging place beside `target` with `fill(staging)`, then rename it into place; on
    any error nothing is left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        fill(staging)
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _missing_output(cfg: MergeConfig):
    raise DeltatuneError(f"{cfg.where}: no output directory; pass --out DIR or set 'output' in the config")


def _bar(jobs: list[Job], progress: bool):
    if not progress:
        return jobs
    from tqdm import tqdm

    return tqdm(jobs, desc="merge", unit="tensor", dynamic_ncols=True)


def _merge_one(job: Job, spec: MergeMethodSpec, models: ModelSet, compute: torch.dtype | None) -> torch.Tensor:
    def read(ref: str, name: str) -> torch.Tensor:
        tensor = models.checkpoints[ref].read(name)
        return tensor.to(compute) if compute is not None and tensor.is_floating_point() else tensor

    if job.passthrough:
        return models.checkpoints[job.inputs[0][0]].read(job.inputs[0][1])
    tensors = [read(ref, name) for ref, name in job.inputs]
    base = read(*job.base) if job.base else None
    statistics = [models.statistics_for(ref, name) for ref, name in job.inputs] if spec.uses_statistics else None
    with torch.no_grad():
        result = spec.call_resolved(tensors, base, job.info, dict(job.kwargs), statistics)
    # one cheap reduction first: a finite sum means every entry is finite (a non-finite one may be overflow)
    if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():
        raise DeltatuneError(f"merge method {spec.name!r} gave NaN/Inf for tensor {job.out_name!r}; nothing was "
                             "written (check the parameters, e.g. weights summing to zero with normalize)")
    return result


def _write_side_files(cfg: MergeConfig, models: ModelSet, staging: Path, dtype: torch.dtype | None,
                      layers: int) -> None:
    """config.json (dtype and layer count updated), generation config, tokenizer files, and the merge recipe."""
    reference = cfg.base_model or cfg.all_models()[0]
    config = dict(models.configs[reference])
    if dtype is not None:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(dtype).removeprefix("torch.")
    if cfg.slices is not None:
        _restack_config(config, cfg, models, layers)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source_dir = models.dirs[reference]
    tokenizer_dir = model_dir(cfg.tokenizer_source) if cfg.tokenizer_source else source_dir
    for name in _COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, staging / name)
    copy_tokenizer(tokenizer_dir, staging)
    (staging / "deltatune_merge.yaml").write_text(yaml.safe_dump(_recipe(cfg), sort_keys=False))


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def _restack_config(config: dict, cfg: MergeConfig, models: ModelSet, layers: int) -> None:
    """Layer count and per-layer lists (layer_types, ...) of a slice merge, taken from each slice's first source."""
    for key in _LAYER_COUNT_KEYS:
        if key in config:
            old = config[key]
            config[key] = layers
            for list_key, value in list(config.items()):
                if isinstance(value, list) and len(value) == old and list_key != "architectures":
                    config[list_key] = [models.configs[sl.sources[0].model][list_key][i] for sl in cfg.slices
                                        for i in range(*sl.sources[0].layer_range)]


def _recipe(cfg: MergeConfig) -> dict:
    out: dict[str, Any] = {"merge_method": cfg.merge_method}
    if cfg.base_model:
        out["base_model"] = cfg.base_model
    if cfg.models is not None:
        out["models"] = [{"model": m.model, "parameters": m.parameters} for m in cfg.models]
    else:
        out["slices"] = [{"sources": [{"model": s.model, "layer_range": list(s.layer_range),
                                       "parameters": s.parameters} for s in sl.sources],
                          "parameters": sl.parameters} for sl in cfg.slices]
    out.update({k: v for k, v in (("parameters", cfg.parameters), ("dtype", cfg.dtype),
                                  ("out_dtype", cfg.out_dtype)) if v})
    return out
