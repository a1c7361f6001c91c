"""Choosing the next token (greedy, temperature, top-p, per-request seeds) and turning tokens into text deltas.

Greedy is `argmax` of the float32 logits, as transformers' `generate`. Sampling draws from each request's own
`torch.Generator`, seeded from the request's `seed`, so a seeded request gives the same text whatever else runs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: new tokens at most. temperature 0 means greedy. stop: strings that end the output (excluded)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator()
        generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return generator


def choose_tokens(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """The next token of every row of `logits` (rows, vocab): greedy rows with one argmax, the others sampled."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for i, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            chosen[i] = sample(logits[i], p.temperature, p.top_p, generator)
    return chosen


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from softmax(logits / temperature), restricted to the smallest set of tokens whose probability
    reaches top_p (the most likely token is always kept)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each token
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenisation with stop strings.

    `add(token)` returns the text that is now safe to show: text that ends in an incomplete UTF-8 character, or in
    the beginning of a stop string, is held back until the next token decides it. Once a stop string appears, the
    text before it is final."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._take(cut)
        return self._take(self._safe_end())

    def finish(self) -> str:
        """Everything not yet returned (at the end of generation nothing is held back)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    def _stop_at(self) -> int | None:
        if not self.stop:
            return None
        # a stop string may straddle text already returned only by its held-back part, so search from there
        start = max(0, self.sent - max(len(s) for s in self.stop))
        found = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        end = len(self.text)
        if self.text.endswith("\ufffd"):  # an incomplete multi-byte character
            end = len(self.text.rstrip("\ufffd"))
        visible = self.text[:end]
        held = 0
        for s in self.stop:
            held = max([held] + [k for k in range(1, min(len(s) - 1, end) + 1) if visible.endswith(s[:k])])
        return end - held
