"""``SDSAdamW.step`` under ``torch.compile``: one custom operator in the graph instead of a graph break.

The step's host logic (pairing, buckets, ``sds``'s warm-up counts, the kernels' pointer tables) does not trace, so
Dynamo does not trace it: under compilation :meth:`sdsopt.SDSAdamW.step` traces only its closure and one call of
``torch.ops.sdsopt.step_(handle, params, grads)`` (:func:`step_`), whose implementation is the eager step of the
optimizer registered under ``handle``.  The graph around it stays whole (``fullgraph=True`` works; the step's own
work is the eager step's: on CUDA with ``fused=True`` the Triton kernels, which Inductor calls as it calls any
custom op).

The operator declares the parameters it updates (``mutates_args``) and reads the gradients it is given, so the
compiler orders it after whatever the graph does to the gradients before it (clipping, unscaling) and before any
later use of the parameters.  Where the compiled graph hands it copies instead of the parameters' and gradients'
own storage (AOTAutograd's functionalization does so for values the graph mutates), the implementation copies
them in, steps the optimizer's own tensors, and copies the parameters back out: the result is the eager step's,
bit for bit, either way (tests/test_compile.py).
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["register", "step", "step_"]

_OPTIMIZERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAGS = ({"tags": (_UNSAFE,)} if _UNSAFE is not None and "tags" in inspect.signature(torch.library.custom_op).parameters
         else {})
"""``cudagraph_unsafe`` where this torch has it: Inductor's CUDA graphs (``mode="reduce-overhead"``) then leave the
step out (graph partitions around it, or no CUDA graph), so its host decisions (``sds``'s warm-up, rebuilt tables)
are taken at every step instead of frozen in a recording."""
_HANDLES = itertools.count()


def register(opt: Any) -> int:
    """A handle for ``opt`` (held weakly), the constant the traced step passes to :func:`step_`."""
    handle = next(_HANDLES)
    _OPTIMIZERS[handle] = opt
    return handle


def _stepped(opt: Any) -> list[Tensor]:
    """The parameters a step updates, in the order the traced step passes them: those with a gradient."""
    return [p for group in opt.param_groups for p in group["params"] if p.grad is not None]


@torch.library.custom_op("sdsopt::step_", mutates_args=("params",), **_TAGS)
def step_(handle: int, params: list[Tensor], grads: list[Tensor]) -> None:
    """One eager step of the optimizer registered under ``handle`` (:func:`register`), on ``params`` with
    ``grads`` (the parameters with a gradient, in :func:`_stepped`'s order)."""
    opt = _OPTIMIZERS.get(handle)
    if opt is None:
        raise RuntimeError(f"sdsopt::step_: no live SDSAdamW has handle {handle} (the optimizer a compiled step "
                           "was traced with was deleted); compile the step again with the new optimizer.")
    own = _stepped(opt)
    if len(own) != len(params) or len(grads) != len(params):
        raise RuntimeError(f"sdsopt::step_: the compiled step passed {len(params)} parameters and {len(grads)} "
                           f"gradients, the optimizer has {len(own)} parameters with a gradient; recompile the step "
                           "(torch._dynamo.reset()) after changing which parameters get gradients.")
    copies = []
    for x, g, p in zip(params, grads, own):
        if x.data_ptr() != p.data_ptr():  # a functionalized copy: step the parameter itself, then copy out
            p.copy_(x)
            copies.append((x, p))
        if g.data_ptr() != p.grad.data_ptr():  # the graph changed the gradient (clipping): use its value
            p.grad.copy_(g)
    opt.eager_step()
    for x, p in copies:
        x.copy_(p)


@step_.register_fake
def _(handle: int, params: list[Tensor], grads: list[Tensor]) -> None:
    return None


def step(opt: Any, closure: Callable[[], Tensor] | None) -> Tensor | None:
    """What Dynamo traces of ``opt.step(closure)``: the closure, then :func:`step_`."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    params = _stepped(opt)
    torch.ops.sdsopt.step_(opt.compile_handle, params, [p.grad for p in params])
    return loss
