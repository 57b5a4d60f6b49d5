"""Names for parameters that reach the optimizer without them (``model.parameters()``, unnamed param groups).

Most training stacks hand an optimizer bare tensors: torchtune's recipes (``model.parameters()``), kohya-style
trainers (unnamed param groups), loralib's README, ``transformers.Trainer``'s grouped parameters.  LoRA pairs are
found by name (:mod:`sdsopt.pairing`), so :func:`find_names` recovers the names the tensors have in the live
``nn.Module`` that holds them: it looks through the modules the garbage collector tracks, keeps the outermost
ones (roots: modules that are no other live module's submodule) and names each tensor as its root's
``named_parameters()`` does.  That is the name
``model.named_parameters()`` would have given, so the pairs, their order and the trajectory are those of the
named call.

Choices: (1) only module ownership names a tensor (a bare tensor, or one held by no module, stays unnamed and
unpaired); (2) a tensor held by two unrelated roots (a weight shared across models) takes the name from the
root with more parameters; (3) the search runs once per construction (and again for a later
``add_param_group`` of tensors it has not named) and costs one pass over the collector's objects.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["all_names", "find_names", "holder", "holders", "live_names"]


def _roots() -> list[nn.Module]:
    """The outermost live modules: those no other live module contains."""
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]  # (type(): no proxy __class__)
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner]


def live_names() -> dict[int, str]:
    """``id(tensor) → name`` for every parameter of every outermost live module (one no other live module
    contains), as that module's ``named_parameters()`` names it.  A parameter held by two unrelated roots (a
    weight shared across models) takes its name from the root with more parameters."""
    named = [dict((id(p), name) for name, p in root.named_parameters()) for root in _roots()]
    names: dict[int, str] = {}
    for table in sorted(named, key=len):  # larger roots last: their names win
        names.update(table)
    return names


def find_names(params: Sequence[Tensor], names: dict[int, str] | None = None) -> list[str | None]:
    """The name of each tensor in the outermost live module that holds it (:func:`live_names`, or ``names``
    from an earlier call), or ``None`` for a tensor no module holds.

    ``find_names(list(model.parameters()))`` equals ``[n for n, _ in model.named_parameters()]`` whenever
    ``model`` is the outermost module holding them.
    """
    names = live_names() if names is None else names
    return [names.get(id(p)) for p in params]


def all_names(params: Sequence[Tensor], names: dict[int, str] | None) -> tuple[list[str] | None, dict[int, str]]:
    """:func:`find_names` for a param group: the names of ``params`` (``None`` unless there are some and every one
    is named), and the table they came from: ``names`` from an earlier group, refreshed by :func:`live_names` where
    it is ``None`` or lacks one of ``params``."""
    if names is None or any(id(p) not in names for p in params):
        names = live_names()
    found = find_names(params, names)
    return (found if params and all(n is not None for n in found) else None), names


def holder(param: Tensor) -> nn.Module | None:
    """The outermost live module that holds ``param`` (of several unrelated ones, the one with more parameters, as
    :func:`live_names` chooses), or ``None``."""
    return next(iter(holders([param])), None)


def holders(params: Sequence[Tensor]) -> list[nn.Module]:
    """The outermost live modules that hold ``params`` (for each tensor, of several unrelated ones, the one with more
    parameters, as :func:`live_names` chooses), each once, in order of first appearance; one pass over the
    collector's objects."""
    roots = sorted(_roots(), key=lambda r: sum(1 for _ in r.parameters()))  # larger roots last: they win
    owner = {id(p): root for root in roots for p in root.parameters()}
    found: dict[int, nn.Module] = {}
    for p in params:
        root = owner.get(id(p))
        if root is not None:
            found.setdefault(id(root), root)
    return list(found.values())
