"""Training data: JSONL in four formats, rendered and tokenised with loss masks, then batched deterministically.

Formats (one per file set, detected from the keys unless the recipe names it):
- prompt_completion `{"prompt", "completion"}`: prompt tokens + completion tokens + EOS; loss on the completion.
- chat `{"messages": [{"role", "content"}, ...]}`: rendered with the tokenizer's chat template; loss on the
  assistant turns (the spans the template adds for each assistant message, end-of-turn token included).
- text `{"text"}`: loss on every token.
- classification `{"text", "label"}`: one label per example, for a sequence classifier.
Every problem is reported with its file and line. Dropped examples are counted by reason.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import DeltatuneError

IGNORE = -100
FORMAT_KEYS = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "classification": ("text", "label"),
    "text": ("text",),
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    source: str  # file:line
    label: int | None = None  # classification target
    prompt_ids: list[int] | None = None  # what generation-based eval feeds the model
    reference: str | None = None  # what it should answer


@dataclass
class DataStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    loss_tokens: int = 0

    def summary(self) -> dict:
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated,
                "dropped": dict(self.dropped), "loss_tokens": self.loss_tokens,
                "max_length": max(self.lengths, default=0)}


def read_jsonl(paths: str | list[str]) -> list[tuple[dict, str]]:
    """(record, "file:line") for every non-blank line; malformed lines are an error naming file and line."""
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        file = Path(path)
        if not file.is_file():
            raise DeltatuneError(f"data file {str(file)!r} does not exist")
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DeltatuneError(f"{file}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise DeltatuneError(f"{file}:{number}: expected a JSON object, got {type(record).__name__}")
                out.append((record, f"{file}:{number}"))
    if not out:
        raise DeltatuneError(f"data {paths!r} holds no examples")
    return out


def detect_format(records: list[tuple[dict, str]], declared: str = "auto") -> str:
    """The format of the records; every record must have the format's keys."""
    if declared == "auto":
        first, where = records[0]
        declared = next((f for f, keys in FORMAT_KEYS.items() if all(k in first for k in keys)), "")
        if not declared:
            raise DeltatuneError(
                f"{where}: cannot tell the data format from keys {sorted(first)}; expected one of "
                + "; ".join(f"{f}: {', '.join(k)}" for f, k in FORMAT_KEYS.items())
            )
    for record, where in records:
        missing = [k for k in FORMAT_KEYS[declared] if k not in record]
        if missing:
            raise DeltatuneError(f"{where}: missing field {missing[0]!r} ({declared} format needs "
                                 f"{', '.join(FORMAT_KEYS[declared])})")
    return declared


def _check_text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DeltatuneError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _prompt_completion(record, where, tokenizer) -> Example:
    prompt = _check_text(record["prompt"], where, "prompt")
    completion = _check_text(record["completion"], where, "completion")
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids, where,
                   prompt_ids=prompt_ids, reference=completion)


def _chat(record, where, tokenizer) -> Example:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DeltatuneError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DeltatuneError(f"{where}: chat data needs a tokenizer with a chat template; use prompt_completion")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DeltatuneError(f"{where}: the chat template does not render turns as prefixes of each other; "
                                 "cannot find the assistant span (use prompt_completion)")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [t if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE
              for t, (a, b) in zip(ids, offsets)]
    prompt, reference = None, None
    if messages[-1]["role"] == "assistant":
        prompt = tokenizer(render(messages[:-1], gen=True), add_special_tokens=False)["input_ids"]
        reference = messages[-1]["content"]
    return Example(ids, labels, where, prompt_ids=prompt, reference=reference)


def _text(record, where, tokenizer) -> Example:
    ids = tokenizer(_check_text(record["text"], where, "text"))["input_ids"] + [tokenizer.eos_token_id]
    return Example(ids, list(ids), where)


def label_names(records: list[tuple[dict, str]], given: list[str] | None) -> list[str]:
    found = sorted({str(r["label"]) for r, _ in records})
    return list(given) if given else found


def _classification(record, where, tokenizer, labels: list[str]) -> Example:
    ids = tokenizer(_check_text(record["text"], where, "text"))["input_ids"]
    label = str(record["label"])
    if label not in labels:
        raise DeltatuneError(f"{where}: label {label!r} is not in the label set {labels}")
    return Example(ids, [IGNORE] * len(ids), where, label=labels.index(label))


def render(records, tokenizer, fmt: str, *, max_length: int, completion_only: bool | None = None,
           labels: list[str] | None = None) -> tuple[list[Example], DataStats]:
    """Tokenise records; truncate to max_length; drop examples left without any loss token (counted by reason)."""
    stats = DataStats(records=len(records))
    out = []
    for record, where in records:
        if fmt == "classification":
            example = _classification(record, where, tokenizer, labels)
        else:
            example = {"prompt_completion": _prompt_completion, "chat": _chat, "text": _text}[fmt](
                record, where, tokenizer)
            if completion_only is False:
                example.labels = list(example.input_ids)
        if len(example.input_ids) > max_length:
            stats.truncated += 1
            example.input_ids = example.input_ids[:max_length]
            example.labels = example.labels[:max_length]
        n_loss = sum(1 for t in example.labels[1:] if t != IGNORE)
        if fmt != "classification" and n_loss == 0:
            stats.dropped["no loss tokens left after truncation" if stats.truncated else "no loss tokens"] += 1
            continue
        if not example.input_ids:
            stats.dropped["empty"] += 1
            continue
        stats.kept += 1
        stats.loss_tokens += n_loss
        stats.lengths.append(len(example.input_ids))
        out.append(example)
    if not out:
        raise DeltatuneError(f"no usable examples: {stats.records} read, dropped {dict(stats.dropped)}")
    return out, stats


# ---- batching -------------------------------------------------------------------------------------------------------
def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Greedy first-fit packing of examples (in order) into rows of at most max_length tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        slot = next((i for i, r in enumerate(room) if r >= n), None)
        if slot is None:
            rows.append([example])
            room.append(max_length - n)
        else:
            rows[slot].append(example)
            room[slot] -= n
    return rows


def collate(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors. A row of several examples gets position ids restarting per example and a 4-D
    block-diagonal causal mask, so packed examples never attend to each other."""
    longest = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    segments = torch.full((len(rows), longest), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for j, example in enumerate(row):
            n = len(example.input_ids)
            ids[i, start:start + n] = torch.tensor(example.input_ids)
            labels[i, start:start + n] = torch.tensor(example.labels)
            labels[i, start] = IGNORE  # the first token of a packed example is never predicted from the previous
            positions[i, start:start + n] = torch.arange(n)
            segments[i, start:start + n] = j
            start += n
    batch = {"input_ids": ids, "labels": labels, "tokens": torch.tensor(int((segments >= 0).sum()))}
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
        batch["attention_mask"] = (same & causal)[:, None]
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = (segments >= 0).long()
    if rows[0][0].label is not None:
        batch["class_labels"] = torch.tensor([row[0].label for row in rows])
    return batch


class BatchStream:
    """Deterministic micro-batches: epoch e visits rows in a permutation drawn from (seed, e). Its position
    (epoch, index) is all a checkpoint needs to resume the exact same sequence."""

    def __init__(self, rows: list[list[Example]], batch_size: int, seed: int, pad_id: int) -> None:
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.rows) // self.batch_size)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict[str, int]) -> None:
        self.epoch, self.index = position["epoch"], position["index"]
        self._order = self._permutation(self.epoch)

    def next(self) -> dict[str, torch.Tensor]:
        if self.index + self.batch_size > len(self._order):  # drop the ragged tail of an epoch
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        picked = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return collate([self.rows[i] for i in picked], self.pad_id)
