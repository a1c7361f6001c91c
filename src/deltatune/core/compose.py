"""Composition blocks: how several deltas on the same host combine, for every method family.

A composition is a tree whose leaves are adapter names. `deltatune.use(model, block)` makes it the model's routing;
every adapted module then applies the tree to its own output (`apply`), so the rules below hold layer by layer:

- `Stack(a, b, ...)`: apply in order, each child seeing the previous child's output (the default for a list of names;
  for additive deltas this is their sum).
- `Average(a, b, ..., weights=...)`: y + Σ wᵢ·(childᵢ(y) − y), the weighted average of the children's updates
  (weights default to 1/n; they need not sum to one, e.g. task arithmetic with negative weights).
- `BatchSplit(a, b, ..., sizes=[n_a, n_b, ...])`: rows [0, n_a) go through a, the next n_b rows through b, ...
  (children that are plain names use the same gathered per-row kernels as `per_sample`).
- `Split(a, b, at=k)`: sequence positions [0, k) of each call go through a, the rest through b.
- `Fuse(a, b, ..., fusion=name)`: AdapterFusion — a trained attention over the children's outputs (the fusion
  parameters are an adapter of the AdapterFusion method, named `fusion`, attached on the same layers).
- `Parallel(a, b, ...)`: the same inputs through each child, outputs stacked along the batch; only at the top of a
  tree (the whole model runs once on a replicated batch routed per row: see `deltatune.parallel`).

Nesting: any block may contain names or other blocks, except `Parallel`, which may only be the root. A block
serialises to JSON as {"Stack": [...]}, {"Average": {"children": [...], "weights": [...]}}, etc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from .errors import DeltatuneError

if TYPE_CHECKING:
    from .slot import DeltaSlot, Host

Node = Union[str, "Block"]


class Block:
    """A node of a composition tree. Immutable; equal when kind, children and options are equal."""

    children: tuple[Node, ...]

    def __init__(self, *children: Node | list[Node], **options: Any) -> None:
        flat = children[0] if len(children) == 1 and isinstance(children[0], (list, tuple)) else children
        self.__dict__["children"] = tuple(flat)
        self.__dict__.update(options)
        if not self.children:
            raise DeltatuneError(f"{type(self).__name__} needs at least one child")
        for child in self.children:
            if not isinstance(child, (str, Block)):
                raise DeltatuneError(f"composition children are adapter names or blocks, got {child!r}")

    def __setattr__(self, key, value):
        raise AttributeError("composition blocks are immutable")

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children))

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.__dict__.items() if k != "children")
        return f"{type(self).__name__}({', '.join(map(repr, self.children))}{options})"

    def names(self) -> list[str]:
        """Every adapter name in the tree (including fusion adapters)."""
        out = []
        for child in self.children:
            out += [child] if isinstance(child, str) else child.names()
        return out

    def to_dict(self) -> dict:
        children = [c if isinstance(c, str) else c.to_dict() for c in self.children]
        extra = {k: v for k, v in self.__dict__.items() if k != "children"}
        return {type(self).__name__: {"children": children, **extra} if extra else children}

    def apply(self, slot: "DeltaSlot", x: Tensor, y: Tensor, host: "Host") -> Tensor:
        raise NotImplementedError


def apply_node(node: Node, slot: "DeltaSlot", x: Tensor, y: Tensor, host: "Host") -> Tensor:
    """One node of a composition on one host: a name is that adapter's delta (or nothing if it has none here)."""
    if isinstance(node, Block):
        return node.apply(slot, x, y, host)
    delta = slot._modules.get(node)
    if delta is None or node in slot.merged_names:
        return y
    return delta(x, y, host)


class Stack(Block):
    def apply(self, slot, x, y, host):
        outer_last = host.last
        for i, child in enumerate(self.children):
            host.last = outer_last and i == len(self.children) - 1
            y = apply_node(child, slot, x, y, host)
        return y


class Average(Block):
    weights: tuple[float, ...] | None = None

    def __init__(self, *children, weights: list[float] | None = None) -> None:
        super().__init__(*children, weights=None if weights is None else tuple(float(w) for w in weights))
        if self.weights is not None and len(self.weights) != len(self.children):
            raise DeltatuneError(f"Average has {len(self.children)} children but {len(self.weights)} weights")

    def apply(self, slot, x, y, host):
        weights = self.weights or tuple(1.0 / len(self.children) for _ in self.children)
        host.writable = False  # every child starts from the same y: none may write into it
        total = y
        for child, weight in zip(self.children, weights):
            if weight != 0.0:
                total = total + weight * (apply_node(child, slot, x, y, host) - y)
        return total


class BatchSplit(Block):
    sizes: tuple[int, ...] = ()

    def __init__(self, *children, sizes: list[int]) -> None:
        super().__init__(*children, sizes=tuple(int(s) for s in sizes))
        if len(self.sizes) != len(self.children) or any(s < 0 for s in self.sizes):
            raise DeltatuneError(f"BatchSplit needs one non-negative size per child, got {list(self.sizes)}")

    def apply(self, slot, x, y, host):
        if sum(self.sizes) != x.shape[0]:
            raise DeltatuneError(f"BatchSplit sizes {list(self.sizes)} sum to {sum(self.sizes)} but the batch has "
                                 f"{x.shape[0]} rows")
        out, start = y, 0
        for child, size in zip(self.children, self.sizes):
            if size:
                rows = torch.arange(start, start + size, device=x.device)
                part = apply_node(child, slot, x.index_select(0, rows), y.index_select(0, rows),
                                  host.select_rows(rows))
                out = out.index_copy(0, rows, part)
            start += size
        return out


class Split(Block):
    at: int = 0

    def __init__(self, *children, at: int) -> None:
        super().__init__(*children, at=int(at))
        if len(self.children) != 2 or self.at < 0:
            raise DeltatuneError("Split takes exactly two children and a position at >= 0")

    def apply(self, slot, x, y, host):
        if x.ndim < 3 and host.info.kind != "embedding":
            raise DeltatuneError("Split needs a sequence dimension (batch, tokens, ...) at every adapted layer")
        at = min(self.at, x.shape[1])
        host.writable = False
        first = apply_node(self.children[0], slot, x[:, :at], y[:, :at], host.positions(slice(0, at)))
        second = apply_node(self.children[1], slot, x[:, at:], y[:, at:], host.positions(slice(at, None)))
        return torch.cat([first, second], dim=1)


class Fuse(Block):
    fusion: str = ""

    def __init__(self, *children, fusion: str) -> None:
        super().__init__(*children, fusion=fusion)

    def names(self) -> list[str]:
        return super().names() + [self.fusion]

    def apply(self, slot, x, y, host):
        fusion = slot._modules.get(self.fusion)
        if fusion is None:
            return y
        host.writable = False
        outputs = [apply_node(child, slot, x, y, host) for child in self.children]
        return fusion.fuse(y, outputs)


class Parallel(Block):
    """Only valid as the root of a composition; see `deltatune.parallel`."""

    def apply(self, slot, x, y, host):
        raise DeltatuneError("Parallel can only be the root of a composition; use deltatune.parallel(...)")


BLOCKS = {cls.__name__: cls for cls in (Stack, Average, BatchSplit, Split, Fuse, Parallel)}


def block_from_dict(data: Any) -> Node:
    """Inverse of `Block.to_dict` (names stay names)."""
    if isinstance(data, str):
        return data
    if not isinstance(data, dict) or len(data) != 1:
        raise DeltatuneError(f"a composition is a name or a one-key mapping like {{'Stack': [...]}}, got {data!r}")
    (kind, body), = data.items()
    if kind not in BLOCKS:
        raise DeltatuneError(f"unknown composition block {kind!r}; valid: {', '.join(BLOCKS)}")
    if isinstance(body, list):
        return BLOCKS[kind](*[block_from_dict(c) for c in body])
    options = {k: v for k, v in body.items() if k != "children"}
    return BLOCKS[kind](*[block_from_dict(c) for c in body["children"]], **options)


def check_tree(node: Node, root: bool = True) -> None:
    """Nesting rules: Parallel only at the root."""
    if isinstance(node, Parallel) and not root:
        raise DeltatuneError("Parallel may only be the root of a composition")
    if isinstance(node, Block):
        for child in node.children:
            check_tree(child, root=False)


__all__ = ["Block", "Stack", "Average", "BatchSplit", "Split", "Fuse", "Parallel", "block_from_dict", "apply_node"]
