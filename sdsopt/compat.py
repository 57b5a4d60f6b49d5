"""Interoperability with third-party optimizer wrappers."""

from __future__ import annotations

from collections import OrderedDict

from torch.optim import Optimizer

__all__ = ["lookahead"]

_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def lookahead(optimizer: Optimizer, k: int = 5, alpha: float = 0.5) -> Optimizer:
    """``torch_optimizer.Lookahead(optimizer, k, alpha)`` that also checkpoints on torch ≥ 2.1.

    torch-optimizer 0.3's ``Lookahead`` never calls ``Optimizer.__init__`` (jettify/pytorch-optimizer
    issue 349), so the hook registries that ``Optimizer.state_dict``/``load_state_dict`` read are
    missing and saving raises ``AttributeError``.  This installs empty registries; stepping,
    ``state_dict`` and ``load_state_dict`` are then torch-optimizer's own code, unchanged.
    """
    from torch_optimizer import Lookahead

    wrapped = Lookahead(optimizer, k=k, alpha=alpha)
    for name in _HOOK_REGISTRIES:
        if not hasattr(wrapped, name):
            setattr(wrapped, name, OrderedDict())
    return wrapped
