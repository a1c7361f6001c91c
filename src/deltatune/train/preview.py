"""`deltatune data`: what the model will actually see — rendered examples with the loss-carrying tokens marked,
counts of dropped and truncated examples by reason, and a length histogram."""

from __future__ import annotations

from .data import IGNORE, Example, DataStats


def mark_loss_tokens(example: Example, tokenizer, open_mark: str = "⟦", close_mark: str = "⟧") -> str:
    """The example's text with every run of tokens that carries loss wrapped in marks.

    A token carries loss when it is a target: token t is predicted at position t-1, so labels[t] != IGNORE."""
    pieces, inside = [], False
    for index, token in enumerate(example.input_ids):
        carries = index > 0 and example.labels[index] != IGNORE
        if carries and not inside:
            pieces.append(open_mark)
        if not carries and inside:
            pieces.append(close_mark)
        inside = carries
        pieces.append(tokenizer.decode([token]))
    if inside:
        pieces.append(close_mark)
    return "".join(pieces)


def histogram(lengths: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram of token lengths."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - low) // step, bins - 1)] += 1
    peak = max(counts)
    lines = []
    for i, count in enumerate(counts):
        start = low + i * step
        if start > high:
            break
        bar = "#" * max(1 if count else 0, round(width * count / peak))
        lines.append(f"{start:6d}-{start + step - 1:<6d} {count:6d} {bar}")
    return lines


def report(examples: list[Example], stats: DataStats, tokenizer, fmt: str, first: int = 3) -> str:
    lines = [f"format: {fmt}; {stats.records} records, {stats.kept} kept, {stats.truncated} truncated, "
             f"{stats.loss_tokens} loss tokens"]
    if stats.dropped:
        lines.append("dropped: " + ", ".join(f"{n} × {reason}" for reason, n in sorted(stats.dropped.items())))
    else:
        lines.append("dropped: none")
    for example in examples[:first]:
        lines.append(f"--- {example.source} ({len(example.input_ids)} tokens; ⟦loss tokens⟧)")
        lines.append(mark_loss_tokens(example, tokenizer))
        if example.label is not None:
            lines.append(f"label: {example.label}")
    lines.append("token lengths:")
    lines += histogram(stats.lengths)
    return "\n".join(lines)
