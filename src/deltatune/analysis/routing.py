"""Routing over the adapter store: pick adapters for an input, then compose them (weighted) for that input.

- Arrow ("Towards Modular LLMs by Building and Reusing a Library of LoRAs", Ostapenko et al., 2024,
  https://arxiv.org/abs/2405.11157): zero-shot, per token and per layer. An adapter's prototype at a module is the
  top right-singular vector v of its ΔW (the input direction the update amplifies most; its sign is arbitrary). A
  token whose input to that module is x scores |⟨vᵢ, x⟩| for each candidate; the top-k are mixed with softmax
  weights of their scores (temperature τ). Embedding hosts score a token id t by |vᵢ[t]|; hosts without a vector
  input (convolutions, norms) mix the candidates present there uniformly. Prototypes are cached in the store.
- Description: the input's MiniLM embedding against each adapter's description embedding; the top-k are mixed
  with softmax(similarity / τ) for the whole input (retrieval as in Stylus).

Candidates are only ever drawn from the entries visible to the caller's groups, made for the same base model; with
more than `max_candidates` of them, the ones whose descriptions best match the input. Nothing else is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, to_matrix
from ..core.registry import get_method
from ..core.slot import Host, slots_of
from ..methods.arrow import top_right_singular_vector
from .compose import weighted
from .library import compose_into_store, loaded
from .spectra import svd
from .store import AdapterStore
from .store_schema import canonical_base

ARROW_KINDS = ("linear", "conv1d_hf", "embedding")
MODES = ("arrow", "description")
ROUTED_TAG = "routed"


def arrow_prototypes(model: nn.Module, name: str) -> dict[str, Tensor]:
    """module path -> top right-singular vector of adapter `name`'s ΔW there (Arrow-routable hosts only).

    Linear hosts use the Arrow method's own prototype (methods/arrow.py), so store routing and an attached `arrow`
    adapter route identically; embedding hosts (which that method does not route) take the same vector of ΔW."""
    out = {}
    for path, module, slot in slots_of(model):
        if name not in slot or slot.info.kind not in ARROW_KINDS:
            continue
        host = Host(module, slot)
        with torch.no_grad():
            if slot.info.kind in LINEAR_KINDS:
                vector = top_right_singular_vector(slot[name], host)
            else:
                vector = svd(to_matrix(slot.info, slot[name].delta_weight(host).detach()).cpu())[2][:, 0]
        out[path] = vector.detach().float().cpu().contiguous()
    return out


class ArrowRouter:
    """Per-token weights over n candidate adapters at each module (see the module docstring)."""

    def __init__(self, prototypes: list[dict[str, Tensor]], kinds: dict[str, str], presence: dict[str, list[bool]],
                 top_k: int = 2, temperature: float = 1.0) -> None:
        if top_k <= 0 or temperature <= 0:
            raise DeltatuneError(f"Arrow needs top_k > 0 and temperature > 0, got {top_k} and {temperature}")
        self.n, self.top_k, self.temperature = len(prototypes), top_k, temperature
        self.kinds = kinds
        self.present = {path: torch.tensor(flags) for path, flags in presence.items()}
        self.stacks: dict[str, Tensor] = {}
        for path in sorted({p for protos in prototypes for p in protos}):
            dim = next(protos[path].numel() for protos in prototypes if path in protos)
            self.stacks[path] = torch.stack([protos.get(path, torch.zeros(dim)) for protos in prototypes])
        self.totals = torch.zeros(self.n)

    def __call__(self, path: str, x: Tensor) -> Tensor:
        stack = self.stacks.get(path)
        present = self.present[path]
        if stack is None:  # no vector input here: the candidates present share equally
            return present.float() / present.sum()
        if self.kinds[path] == "embedding":
            scores = stack.to(x.device)[:, x].abs().movedim(0, -1)  # (..., n)
        else:
            scores = (x.float() @ stack.to(x.device).T).abs()
        scores = scores.masked_fill(~present.to(x.device), float("-inf"))
        k = min(self.top_k, int(present.sum()))
        values, index = scores.topk(k, dim=-1)
        weights = torch.zeros_like(scores).scatter(-1, index, torch.softmax(values / self.temperature, dim=-1))
        self.totals += weights.reshape(-1, self.n).sum(0).cpu()
        return weights

    def usage(self) -> list[float]:
        """Share of all routing weight each candidate received so far (over layers and tokens)."""
        total = float(self.totals.sum())
        return [float(t) / total if total else 0.0 for t in self.totals]


@dataclass
class Routing:
    """What a routed composition chose: the candidates, and their weights (description) or usage (Arrow)."""

    mode: str
    candidates: list[str]
    weights: list[float] | None = None
    router: ArrowRouter | None = field(default=None, repr=False)

    def summary(self) -> dict:
        shares = self.router.usage() if self.router is not None else self.weights
        return {"mode": self.mode, "adapters": [{"name": n, "weight": w} for n, w in zip(self.candidates, shares)]}


def candidates(store: AdapterStore, text: str | None, *, groups: Sequence[str] | None, base_model: str,
               mode: str = "arrow", max_candidates: int = 8) -> list[dict]:
    """The entries routing may use: visible to `groups`, for `base_model`, mergeable for Arrow, best matches first."""
    if mode not in MODES:
        raise DeltatuneError(f"unknown routing mode {mode!r}; valid: {', '.join(MODES)}")
    entries = [e for e in store.search(text, groups=groups, base_model=base_model, limit=10**9)
               if ROUTED_TAG not in e["tags"]]  # cached compositions of earlier routings are not candidates
    if mode == "arrow":
        entries = [e for e in entries if get_method(e["method"]).mergeable]
    if not entries:
        seen = "any group" if groups is None else f"groups {list(groups)}"
        raise DeltatuneError(f"the store has no {'mergeable ' if mode == 'arrow' else ''}adapter for base model "
                             f"{canonical_base(base_model)!r} visible to {seen}")
    return entries[:max_candidates]


def _description_weights(entries: list[dict], text: str | None, top_k: int,
                         temperature: float | None) -> tuple[list[dict], list[float]]:
    """The top-k entries by description similarity and softmax(similarity / τ) over them."""
    if not text:
        raise DeltatuneError("description routing needs the input text")
    if top_k <= 0:
        raise DeltatuneError(f"top_k must be > 0, got {top_k}")
    chosen = entries[:top_k]
    scores = torch.tensor([e.get("score", 0.0) for e in chosen])
    return chosen, torch.softmax(scores / (temperature or 0.1), dim=0).tolist()


def composed_for_input(store: AdapterStore, model: nn.Module, text: str, *, groups: Sequence[str] | None,
                       base_model: str, top_k: int = 2, temperature: float | None = None, step: float = 0.05,
                       max_candidates: int = 8) -> dict:
    """Description routing materialised as one stored LoRA, for engines that serve one adapter per request.

    Picks the top-k adapters visible to `groups` for `text`, rounds their weights to multiples of `step` (so
    similar inputs share one artefact), and returns the store entry of Σᵢ wᵢ·ΔWᵢ as an exact LoRA, composing and
    storing it on first use (tag `routed`, removed with any of its sources). `store.export(entry["name"], dir,
    groups)` gives a PEFT directory to load. The model is only touched on a cache miss (adapters are attached
    for the composition and removed again), so call it where the model is not running (an engine's own thread).
    Returns the entry plus "adapters": [{"name", "weight"}] and "cached": whether it already existed."""
    entries = candidates(store, text, groups=groups, base_model=base_model, mode="arrow",
                         max_candidates=max_candidates)  # compose_lora needs ΔW: mergeable adapters only
    chosen, weights = _description_weights(entries, text, top_k, temperature)
    if step <= 0:
        raise DeltatuneError(f"step must be > 0, got {step}")
    picked = [(e, round(round(w / step) * step, 6)) for e, w in zip(chosen, weights)]
    picked = [(e, w) for e, w in picked if w > 0] or [(chosen[0], 1.0)]
    key = hashlib.sha256(json.dumps([[e["id"], w] for e, w in picked]).encode()).hexdigest()[:16]
    name = f"routed-{key}"
    shares = [{"name": e["name"], "weight": w} for e, w in picked]
    if any(e["name"] == name for e in store.list(groups=groups, tags=[ROUTED_TAG])):
        return {**store.show(name, groups), "adapters": shares, "cached": True}
    entry = compose_into_store(store, model, [e["id"] for e, _ in picked], [w for _, w in picked], name=name,
                               description="routed composition of " + ", ".join(e["name"] for e, _ in picked),
                               groups=groups, tags=[ROUTED_TAG])
    return {**entry, "adapters": shares, "cached": False}


def _prototypes(store: AdapterStore, model: nn.Module, entry: dict, name: str) -> dict[str, Tensor]:
    cached = store.cached_prototypes(entry["id"])
    if cached:
        return cached
    vectors = arrow_prototypes(model, name)
    store.cache_prototypes(entry["id"], vectors)
    return vectors


@contextlib.contextmanager
def routed(store: AdapterStore, model: nn.Module, text: str | None, *, groups: Sequence[str] | None,
           base_model: str, mode: str = "arrow", top_k: int = 2, temperature: float | None = None,
           max_candidates: int = 8) -> Iterator[Routing]:
    """Within the block, `model` runs the store's adapters for this input, composed by `mode` (see module doc)."""
    entries = candidates(store, text, groups=groups, base_model=base_model, mode=mode,
                         max_candidates=max_candidates)
    if mode == "description":
        chosen, weights = _description_weights(entries, text, top_k, temperature)
        with loaded(store, model, chosen, groups) as names, weighted(model, names, weights):
            yield Routing(mode, [e["name"] for e in chosen], weights)
        return
    with loaded(store, model, entries, groups) as names:
        protos = [_prototypes(store, model, entry, name) for entry, name in zip(entries, names)]
        slots = [(path, slot) for path, _, slot in slots_of(model)]
        kinds = {path: slot.info.kind for path, slot in slots}
        presence = {path: [name in slot for name in names] for path, slot in slots}
        router = ArrowRouter(protos, kinds, presence, top_k=top_k, temperature=temperature or 1.0)
        with weighted(model, names, router):
            yield Routing(mode, [e["name"] for e in entries], router=router)


def routed_generate(store: AdapterStore, base: str, prompt: str, *, groups: Sequence[str] | None,
                    mode: str = "arrow", top_k: int = 2, max_new_tokens: int = 128, greedy: bool = True,
                    temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, precision: str = "auto",
                    raw: bool = False) -> dict:
    """Generate an answer to `prompt` with the store's adapters routed and composed for it."""
    from ..train.interactive import generate_text, load_for_inference, prompt_ids

    model, tokenizer, autocast = load_for_inference(base, None, precision)
    ids = prompt_ids(tokenizer, prompt, raw=raw)
    with routed(store, model, prompt, groups=groups, base_model=base, mode=mode, top_k=top_k) as routing:
        text = generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, greedy=greedy,
                             temperature=temperature, top_p=top_p, seed=seed, autocast=autocast)
    return {**routing.summary(), "text": text}
