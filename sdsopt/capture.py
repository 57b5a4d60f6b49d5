"""Module hooks that record what a LoRA layer saw, so the full gradient can be applied without forming it.

For a LoRA branch ``y = … + s·B(A(x))`` the gradient with respect to the product ``W = B·A`` is

    G = Σ_batches  δᵀ X          (m × n)

where ``X`` (``N × n``) is the input of ``lora_A`` and ``δ`` (``N × m``) the gradient at the output of
``lora_B`` (it already carries the scale ``s``).  Consistently, ``gB = G Aᵀ`` and ``gA = Bᵀ G``.
The products ``G V = δᵀ (X V)`` and ``Gᵀ U = Xᵀ (δ U)`` cost ``O(N (m + n) k)`` and never form ``G``
(:class:`sdsopt.psi.RowGradient`, from :meth:`LoraCapture.rows`); :meth:`LoraCapture.full` forms it
(``svd_oracle`` and metrics on small models only).

Only ``nn.Linear`` factors (PEFT's Linear LoRA) are supported; several forward/backward passes before
one optimizer step (gradient accumulation) are summed.  A pair is recorded when the backward reaches its
``lora_B`` output: a forward without a backward (an evaluation with gradients on) records nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LoraCapture"]


class LoraCapture:
    """Records inputs of the ``lora_A`` Linear modules and output gradients of the ``lora_B`` ones.

    Args:
        model: the module tree holding the LoRA layers (or a list of them).
        pairs: ``(A, B)`` parameter pairs to watch (e.g. from :attr:`sdsopt.SDSAdamW.lora_pairs`).
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], pairs: list[tuple[Tensor, Tensor]]) -> None:
        self._pending: dict[int, Tensor] = {}  # id(A) -> X of the forward whose lora_B output is still to come
        self._records: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)  # id(A) -> (X, δ) per backward
        self._handles: list[RemovableHandle] = []
        partner = {id(B): id(A) for A, B in pairs}
        wanted_a = set(partner.values())
        found: set[int] = set()
        roots = [model] if isinstance(model, nn.Module) else list(model)
        modules = {id(m): m for root in roots for m in root.modules()}  # (a module in two roots: hooked once)
        for module in modules.values():
            weight = getattr(module, "weight", None)
            if weight is None or not isinstance(module, nn.Linear):
                continue
            key = id(weight)
            if key in wanted_a:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(key)))
                found.add(key)
            elif key in partner:
                self._handles.append(module.register_forward_hook(self._output_hook(partner[key])))
                found.add(key)
        wanted_b = set(partner)
        missing = (wanted_a | wanted_b) - found
        if missing:
            raise ValueError(
                f"LoraCapture: {len(missing)} LoRA factor(s) are not the weight of an nn.Linear in this model; "
                "what needs the layers' inputs (PSILoRA, SDSAdamW's svd_oracle and gradient_start, gradient "
                "metrics) supports Linear LoRA only."
            )

    def _input_hook(self, key: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if torch.is_grad_enabled():
                x = args[0].detach()
                self._pending[key] = x.reshape(-1, x.shape[-1])

        return hook

    def _output_hook(self, a_key: int):
        """On ``lora_B``'s output: a tensor hook that records ``(X, δ)`` when the backward reaches it.  ``X`` lives
        in the hook's closure until then, so a forward whose graph is dropped without a backward (an evaluation
        with gradients on) leaves nothing behind."""

        def hook(module: nn.Module, args, output: Tensor) -> None:
            x = self._pending.pop(a_key, None)  # lora_B(lora_A(x)): the A input just recorded
            if x is None or not (torch.is_grad_enabled() and output.requires_grad):
                return

            def store(g: Tensor) -> None:
                self._records[a_key].append((x, g.detach().reshape(-1, g.shape[-1])))

            output.register_hook(store)

        return hook

    def has(self, A: Tensor) -> bool:
        """Whether a forward and backward pass of the pair of ``A`` was recorded since :meth:`clear`."""
        return bool(self._records.get(id(A)))

    def _pairs_of(self, A: Tensor, B: Tensor) -> list[tuple[Tensor, Tensor]]:
        if not self.has(A):
            raise RuntimeError(
                "LoraCapture: no recorded forward/backward for this LoRA pair since the last step; "
                "run the model's forward and backward between attach() and step()."
            )
        return list(self._records[id(A)])

    def rows(self, A: Tensor, B: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The recorded ``(X, δ)`` of every forward since :meth:`clear` (``G = Σ δᵀ X``)."""
        return self._pairs_of(A, B)

    def full(self, A: Tensor, B: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full ``G`` (``m × n``): small models only."""
        return sum(g.to(dtype).T @ x.to(dtype) for x, g in self._pairs_of(A, B))

    def clear(self) -> None:
        """Forget what was recorded (the optimizer calls this after each step)."""
        self._pending.clear()
        self._records.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
