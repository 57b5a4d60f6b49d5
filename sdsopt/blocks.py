"""Per-block LoRA pairs of stacked factors: LitGPT's ``LoRAQKVLinear`` and loralib's ``MergedLinear``.

Such a layer adapts k output blocks of one linear layer (LitGPT: the enabled ones of q, k and v) with one
``lora_A`` of ``k·r`` rows and one ``lora_B`` of the blocks' outputs stacked, applied as a grouped convolution:
block ``i``'s update is ``B_i·A_i``, with ``A_i`` rows ``i·r … (i+1)·r`` of ``lora_A`` and ``B_i`` block ``i``'s rows
of ``lora_B`` (LitGPT: the sizes ``qkv_shapes``, unequal under grouped-query attention; loralib: equal).  So
``lora_B·lora_A`` is not the layer's update: the two tensors hold k LoRA pairs, not one.

:class:`sdsopt.SDSAdamW` steps each block as a pair of its own.  :func:`block_rows` reads the blocks' sizes from the
layer, and a param group records the stacked factors as ``group["lora_blocks"]``: ``(index_A, index_B, rows of B
per block)``.  :class:`BlockViews` hands the step, for each such group, a group whose params hold row views of the
two parameters in their place, with the gradients sliced alike before the step, so that every mode, the Adam
lists and DDP (whose averaged gradients are sliced) treat a block as any pair, and the step's in-place writes land
in the parameters.  A block's state lives in its whole factor's state under ``"blocks"`` (:class:`BlockState`):
the optimizer's ``state`` keeps the model's parameters as its keys, so ``state_dict``/``load_state_dict``, deep
copies and ``torch.distributed.checkpoint`` see the model's parameters and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

from torch import Tensor, nn

from . import naming
from .pairing import stacked_count

__all__ = ["BLOCKS", "BlockState", "BlockViews", "block_pairs", "block_spans", "block_rows", "direct_owners"]

BLOCKS = "blocks"
"""The key of a stacked factor's state under which its blocks' states live (block index → state)."""

Block = tuple[int, int, tuple[int, ...]]
"""One entry of ``group["lora_blocks"]``: ``(index_A, index_B, rows of B per block)``."""


def block_rows(layer: nn.Module | None, A: Tensor, B: Tensor) -> tuple[int, ...] | None:
    """The rows of ``B`` per block when ``layer`` holds ``A``/``B`` as its ``lora_A``/``lora_B`` and stacks k > 1
    blocks in them: LitGPT's ``LoRAQKVLinear`` (``enable_lora`` and ``qkv_shapes``, the enabled blocks' sizes) or
    loralib's ``MergedLinear`` (``enable_lora``; equal blocks); ``None`` for any other layer or layout."""
    k = stacked_count(A, B)
    if (k is None or layer is None or getattr(layer, "lora_A", None) is not A
            or getattr(layer, "lora_B", None) is not B or not hasattr(layer, "enable_lora")):
        return None
    shapes = getattr(layer, "qkv_shapes", None)
    if shapes is not None:
        rows = tuple(int(s) for s in shapes)
    elif B.shape[0] % k == 0:
        rows = (B.shape[0] // k,) * k
    else:
        return None
    return rows if len(rows) == k and sum(rows) == B.shape[0] and all(rows) else None


def direct_owners(params: Sequence[Tensor]) -> dict[int, nn.Module]:
    """``id(tensor) → the module that holds it as its own parameter``, over the live modules that hold ``params``
    (:func:`sdsopt.naming.holders`: one pass over the collector's objects)."""
    out: dict[int, nn.Module] = {}
    for root in naming.holders(params):
        for module in root.modules():
            for p in module.parameters(recurse=False):
                out.setdefault(id(p), module)
    return out


def _spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` row ranges of ``sizes``."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def block_spans(A: Tensor, rows: Sequence[int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per block, the row ranges ``(of A, of B)``: ``A``'s blocks have ``r = A.shape[0] / k`` rows each."""
    r = A.shape[0] // len(rows)
    return list(zip(_spans([r] * len(rows)), _spans(rows)))


def block_pairs(group: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """Row views ``(A_i, B_i)`` of every block of ``group``'s stacked factors, in ``group["lora_blocks"]``'s order."""
    params = group["params"]
    return [(params[ia][a0:a1], params[ib][b0:b1]) for ia, ib, rows in group.get("lora_blocks", ())
            for (a0, a1), (b0, b1) in block_spans(params[ia], rows)]


class BlockState(MutableMapping):
    """The optimizer's ``state`` as the step sees it: a block view's entry is its block's dict in the whole
    factor's state (``state[whole]["blocks"][i]``), any other tensor's is ``state[tensor]``.  Reads (``get``,
    ``in``) create nothing; ``state[t]`` creates an empty entry, as the optimizer's ``defaultdict`` does."""

    def __init__(self, state: MutableMapping[Tensor, dict[str, Any]], owners: dict[int, tuple[Tensor, int]]) -> None:
        self._state = state
        self._owners = owners  # id(view) → (whole parameter, block index)

    def _blocks(self, whole: Tensor) -> dict[int, dict[str, Any]]:
        return self._state[whole].setdefault(BLOCKS, {})

    def __getitem__(self, key: Tensor) -> dict[str, Any]:
        where = self._owners.get(id(key))
        if where is None:
            return self._state[key]
        return self._blocks(where[0]).setdefault(where[1], {})

    def __setitem__(self, key: Tensor, value: dict[str, Any]) -> None:
        where = self._owners.get(id(key))
        if where is None:
            self._state[key] = value
        else:
            self._blocks(where[0])[where[1]] = value

    def __delitem__(self, key: Tensor) -> None:
        where = self._owners.get(id(key))
        if where is None:
            del self._state[key]
        else:
            del self._blocks(where[0])[where[1]]

    def __contains__(self, key: object) -> bool:
        where = self._owners.get(id(key))
        if where is None:
            return key in self._state
        return where[1] in self._state.get(where[0], {}).get(BLOCKS, {})

    def get(self, key: Tensor, default: Any = None) -> Any:
        return self[key] if key in self else default

    def pop(self, key: Tensor, *default: Any) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


_OWN = ("params", "lora_pairs", "lora_blocks", "param_names")
"""The keys of a param group that its stepped group (:class:`BlockViews`) holds its own values of."""


class BlockViews:
    """Per param group with stacked factors, the group the step runs on: the same options (copied from the group at
    every step, so schedulers reach it), ``params`` with each stacked factor replaced by a detached stand-in that
    never has a gradient (so it is not stepped; every other index stays where it was) and its blocks' row views
    appended, ``lora_pairs`` the group's pairs and then the blocks', ``param_names`` (where the group's names are
    known) naming a view ``name[start:stop]``.  One object per group, kept while its params and blocks stay the
    same (modes cache by group).  Groups without blocks are handed through as they are."""

    def __init__(self) -> None:
        self._stepped: dict[int, tuple[tuple[Any, ...], dict[str, Any], list[tuple[Tensor, Tensor, slice]]]] = {}
        self._owners: dict[int, tuple[Tensor, int]] = {}

    def view(self, param_groups: list[dict[str, Any]], names: Callable[[int], list[str] | None],
             state: MutableMapping[Tensor, dict[str, Any]]) -> tuple[list[dict[str, Any]], MutableMapping[Tensor, Any]]:
        """The groups the step runs on (see the class; ``names(gi)``: group ``gi``'s parameter names, if any) and
        the optimizer's ``state`` as it sees it: a :class:`BlockState` while some group has blocks, else itself."""
        groups = [self._group(gi, group, names) if group.get("lora_blocks") else group
                  for gi, group in enumerate(param_groups)]
        return groups, (BlockState(state, self._owners) if self._owners else state)

    def prepare(self, param_groups: list[dict[str, Any]], names: Callable[[int], list[str] | None],
                state: MutableMapping[Tensor, dict[str, Any]]) -> tuple[list[dict[str, Any]], MutableMapping[Tensor, Any]]:
        """:meth:`view`, every block view given its rows of the whole factor's gradient (a view; ``None`` without
        one) and the whole factor's ``requires_grad``: before a step (:meth:`release_grads` after it)."""
        out = self.view(param_groups, names, state)
        for _, _, views in self._stepped.values():
            for whole, view, rows in views:
                if view.requires_grad != whole.requires_grad:
                    view.requires_grad_(whole.requires_grad)
                view.grad = None if whole.grad is None else whole.grad[rows]
        return out

    def release_grads(self) -> None:
        """Drop the views' gradients after the step (they would keep a gradient ``zero_grad`` frees alive)."""
        for _, _, views in self._stepped.values():
            for _, view, _ in views:
                view.grad = None

    def _group(self, gi: int, group: dict[str, Any], names: Callable[[int], list[str] | None]) -> dict[str, Any]:
        params, blocks = group["params"], group["lora_blocks"]
        key = (tuple(id(p) for p in params), tuple(map(tuple, blocks)), tuple(map(tuple, group["lora_pairs"])))
        cached = self._stepped.get(gi)
        if cached is None or cached[0] != key:
            cached = self._stepped[gi] = (key, *self._build(group, names(gi)))
            self._owners = {id(view): owner for _, _, views in self._stepped.values()
                            for (whole, view, _), owner in zip(views, self._owner_list(views))}
        stepped = cached[1]
        stepped.update((k, v) for k, v in group.items() if k not in _OWN)
        return stepped

    @staticmethod
    def _owner_list(views: list[tuple[Tensor, Tensor, slice]]) -> list[tuple[Tensor, int]]:
        """Per view, ``(whole parameter, block index)``: the views of one whole parameter come in block order."""
        count: dict[int, int] = {}
        out = []
        for whole, _, _ in views:
            out.append((whole, count.get(id(whole), 0)))
            count[id(whole)] = out[-1][1] + 1
        return out

    @staticmethod
    def _build(group: dict[str, Any], names: list[str] | None
               ) -> tuple[dict[str, Any], list[tuple[Tensor, Tensor, slice]]]:
        """The stepped group of ``group`` (see the class) and its views ``(whole, view, rows)``."""
        params = list(group["params"])
        labels = list(names) if names else None
        pairs = [tuple(p) for p in group["lora_pairs"]]
        views: list[tuple[Tensor, Tensor, slice]] = []
        for ia, ib, rows in group["lora_blocks"]:
            A, B = group["params"][ia], group["params"][ib]
            params[ia], params[ib] = A.detach(), B.detach()  # stand-ins: no gradient, never stepped
            for spans in block_spans(A, rows):
                pairs.append((len(params), len(params) + 1))
                for whole, index, (start, stop) in ((A, ia, spans[0]), (B, ib, spans[1])):
                    view = whole.detach()[start:stop].requires_grad_(whole.requires_grad)
                    views.append((whole, view, slice(start, stop)))
                    params.append(view)
                    if labels is not None:
                        labels.append(f"{names[index]}[{start}:{stop}]")
        stepped = {**{k: v for k, v in group.items() if k not in _OWN}, "params": params, "lora_pairs": pairs}
        if labels is not None:
            stepped["param_names"] = labels
        return stepped, views
