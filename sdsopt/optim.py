"""``SDSAdamW``: AdamW for LoRA pairs in the coordinates of their orthonormal bases (docs/math.md §2), and the
comparison modes of §3.

The class validates, pairs and holds state; the geometry lives in :mod:`sdsopt.coordinates` (mode ``sds``),
:mod:`sdsopt.rewrite` (gradient rewrites) and :mod:`sdsopt.linalg`, and the Adam update itself is torch's functional
``torch.optim.adam.adam(..., decoupled_weight_decay=True)`` — the very kernel behind
``torch.optim.AdamW`` — so foreach/fused kernels and AdamW's exact semantics are inherited, and
parameters outside LoRA pairs follow ``torch.optim.AdamW`` bit for bit (MATH P7).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import Optimizer

from . import pairing as _pairing
from .coordinates import balance_scales, factor_map, lower_inverse, resplit_maps, to_coordinates, to_factors
from .linalg import algebra_precision, cholesky_lower, finite_or_zero, gram, spectrum
from .pairing import LoraPair, PairingFn, a_rows, b_matrix, check_pair_shapes
from .capture import LoraCapture
from .guard import SkipLog, nonfinite_flags
from .distributed import all_reduce_coalesced, check_not_deepspeed, check_pair_layout, local, local_grad, process_group
from .rewrite import (
    MODE_ROUTES,
    MODES,
    ROUTES,
    SPECTRAL_MODES,
    lorsum_sweeps,
    preconditioner,
    resolve_route,
    sigma_correction,
    sigma_split,
    svd_refactor,
)

__all__ = ["SDSAdamW"]

_LINALG_DTYPES = (None, torch.float32, torch.float64)


@dataclass
class _Bucket:
    """LoRA pairs of one param group that share shapes, dtypes, device and which factors have grads."""

    a_shape: torch.Size
    b_shape: torch.Size
    has_a: bool
    has_b: bool
    coordinates: bool = False  # mode sds: past the warm-up, Adam runs in the bases' coordinates
    a: list[int] = field(default_factory=list)  # indices of the A factors in the group's params
    b: list[int] = field(default_factory=list)


@dataclass
class _CoordinateBlock:
    """Mode ``sds``: one bucket's factors of one kind handed to Adam in coordinates (MATH 2.2).

    ``before`` holds the coordinates Adam starts from and ``after`` the buffer Adam updates (both
    in the parameter's dtype); :meth:`leave` adds the mapped change ``M (after − before)`` to
    the factors ``X`` (float32 or better) and writes them into ``targets``.
    """

    side: str
    M: Tensor
    X: Tensor
    before: Tensor
    after: Tensor
    targets: list[Tensor]
    scale: Tensor | None = None  # [k, 1, 1]: the re-balance of ``rebalance=True``
    ramp: float | Tensor | None = None  # the factor(s) k/coordinate_ramp of the pairs' first coordinate steps

    def leave(self) -> None:
        delta = to_factors(self.M, self.after.to(self.X.dtype) - self.before.to(self.X.dtype), self.side)
        if self.ramp is not None:
            delta = delta * self.ramp
        new = self.X + delta
        if self.scale is not None:
            new = new * self.scale
        torch._foreach_copy_(self.targets, _unstack(new.to(self.targets[0].dtype), self.targets[0].shape))


def _unstack(stacked: Tensor, shape: torch.Size) -> list[Tensor] | tuple[Tensor, ...]:
    """The slices of ``stacked`` along dim 0 as tensors of ``shape``: one ``unbind`` (views, no copy), and a
    view per slice only where the shapes differ (conv factors).  Per-slice indexing would cost one dispatched
    op per parameter and step, the bulk of a step's host time at hundreds of pairs."""
    parts = stacked.unbind(0)
    return parts if parts[0].shape == shape else [t.view(shape) for t in parts]


def _reduced(parts: dict[Any, Tensor], collective: Callable[[Any], tuple[Any, ...]]) -> dict[Any, Tensor]:
    """``parts`` summed over their process groups: one all-reduce per ``collective(key)`` =
    ``(process group, dtype, device)``; parts without a group come back unchanged."""
    by_collective: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for key in parts:
        by_collective[collective(key)].append(key)
    out = dict(parts)
    for (pg, *_), keys in by_collective.items():
        out.update(zip(keys, all_reduce_coalesced([parts[k] for k in keys], pg)))
    return out


def _param_label(group: dict[str, Any], index: int, group_index: int) -> str:
    names = group.get("param_names")
    return repr(names[index]) if names else f"params[{index}] of param group {group_index}"


def _check_hyperparameters(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the offending option (``where``: 'defaults' or 'param group i')."""
    lr = group["lr"]
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)):
        raise ValueError(f"{where}: lr must be a Python float, got {type(lr).__name__} (Tensor lr is not supported).")
    checks = [
        (lr >= 0.0, f"lr={lr} must be >= 0"),
        (group["eps"] >= 0.0, f"eps={group['eps']} must be >= 0"),
        (group["weight_decay"] >= 0.0, f"weight_decay={group['weight_decay']} must be >= 0"),
        (len(group["betas"]) == 2 and all(0.0 <= b < 1.0 for b in group["betas"]),
         f"betas={group['betas']} must be two numbers in [0, 1)"),
        (group["mode"] in MODES, f"mode={group['mode']!r} is unknown; choose one of {MODES}"),
        (group["route"] in ROUTES, f"route={group['route']!r} is unknown; choose one of {ROUTES}"),
        (group["linalg_dtype"] in _LINALG_DTYPES,
         f"linalg_dtype={group['linalg_dtype']!r} is unknown; use None, torch.float32 or torch.float64"),
        (group["rank_tol"] is None or 0.0 < group["rank_tol"] < 1.0,
         f"rank_tol={group['rank_tol']} must be None or in (0, 1)"),

        (group["damping"] > 0.0, f"damping={group['damping']} must be > 0 (mode 'scaled' inverts K + damping·I)"),
        (group["sigma_lr_ratio"] >= 0.0, f"sigma_lr_ratio={group['sigma_lr_ratio']} must be >= 0"),
        (group["mode"] not in MODE_ROUTES or group["route"] in ("auto", *MODE_ROUTES[group["mode"]]),
         f"route={group['route']!r} does not apply to mode={group['mode']!r}; it takes 'auto' or one of "
         f"{MODE_ROUTES.get(group['mode'])}"),
        (not (group["decouple_sigma"] and group["mode"] == "sds"),
         "decouple_sigma=True is not defined for mode='sds' (its singular values live in the r×r core "
         "R_B·R_Aᵀ and move through both coordinates); use mode='sds_polar' for the singular-value channel"),
        (not (group["decouple_sigma"] and group["mode"] not in SPECTRAL_MODES),
         f"decouple_sigma=True works with modes {SPECTRAL_MODES}, not mode={group['mode']!r}"),
        (isinstance(group["warmup_steps"], int) and not isinstance(group["warmup_steps"], bool)
         and group["warmup_steps"] >= 0, f"warmup_steps={group['warmup_steps']!r} must be an int >= 0"),
        (isinstance(group["coordinate_ramp"], int) and not isinstance(group["coordinate_ramp"], bool)
         and group["coordinate_ramp"] >= 0, f"coordinate_ramp={group['coordinate_ramp']!r} must be an int >= 0"),
        (isinstance(group["resplit"], bool), f"resplit={group['resplit']!r} must be True or False"),
        (isinstance(group["rebalance"], bool), f"rebalance={group['rebalance']!r} must be True or False"),
        (group["step_damping"] >= 0.0, f"step_damping={group['step_damping']} must be >= 0"),
        (isinstance(group["lorsum_sweeps"], int) and group["lorsum_sweeps"] >= 1,
         f"lorsum_sweeps={group['lorsum_sweeps']!r} must be an int >= 1"),
        (isinstance(group["oracle_max_numel"], int) and group["oracle_max_numel"] > 0,
         f"oracle_max_numel={group['oracle_max_numel']!r} must be a positive int"),
        (not (group["foreach"] and group["fused"]), "foreach=True and fused=True cannot be used together"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"SDSAdamW {where}: {message}.")


class SDSAdamW(Optimizer):
    r"""AdamW for LoRA that runs Adam in the coordinates of the factors' orthonormal bases (SDS-LoRA).

    For a LoRA pair ``ΔW = s·B·A`` with thin QRs ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` (the r×r ``R``
    from Cholesky factors of the Grams ``BᵀB``, ``AAᵀ``; ``Q`` never formed), mode ``"sds"`` runs
    torch's AdamW on the coordinates ``Ã = R_B·A``, ``B̃ = B·R_Aᵀ`` with their gradients::

        g̃A = R_B^{-T}·gA = s·Q_Bᵀ·G        g̃B = gB·R_A^{-1} = s·G·Q_A

    and maps the step back with r×r products (``A ← R_B^{-1}·Ã'``, ``B ← B̃'·R_A^{-T}``).
    The full gradient ``G`` reaches the factors only through orthonormal bases, and the factors'
    singular values never multiply the weight-space step: to first order it is
    ``δW = −η·s·(Q_B·u_A + u_B·Q_Aᵀ)`` (``u`` the Adam directions), the step of the SDS-LoRA layer.
    The first ``warmup_steps`` steps of each pair are plain AdamW (LoRA's ``B = 0`` has no basis);
    then the pair is re-split without changing ``BA`` (``B = Q_B U Σ^{1/2}``, ``A = Σ^{1/2} Vᵀ Q_Aᵀ``
    from the SVD of the r×r core ``R_B R_Aᵀ``) and its Adam state is reset.  Parameters outside
    pairs get exactly ``torch.optim.AdamW``.

    Args:
        params: ``model.named_parameters()`` (pairs found by name, see ``pairing``), a model
            (its trainable named parameters, one group: what transformers' ``Trainer`` passes for
            ``optimizer_cls_and_kwargs=(SDSAdamW, {"model": model, ...})``), or param groups; a
            group may list explicit pairs: ``{"params": [...], "lora_pairs": [(A, B), ...]}``.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused: as ``torch.optim.AdamW``
            (same defaults).
        mode: ``"sds"`` (default, above), ``"sds_polar"`` (sdsopt 0.1's ``sds``: a one-sided rewrite
            ``g̃B = gB (AAᵀ)^{-1/2}``, ``g̃A = (BᵀB)^{-1/2} gA`` with Adam on the plain factors),
            ``"lora"`` (identity: plain AdamW on the factors), ``"scaled"``
            (``gB (K_A + δI)^{-1}``, ``(K_B + δI)^{-1} gA``; Zhang & Pilanci 2024), ``"lorsum"``
            (LoRSum/PSI-LoRA: ``lorsum_sweeps`` proximal ALS sweeps towards the full step,
            rewritten gradient = displacement / lr; one sweep is ``"scaled"``) or ``"svd_oracle"``
            (Adam on the full ``W = BA`` with the true ``G``, then the best rank-r re-factorisation;
            needs ``m·n ≤ oracle_max_numel``).  ``lorsum`` with more than one sweep and
            ``svd_oracle`` need the layers' inputs: call :meth:`attach` with the model once.
        warmup_steps: mode ``"sds"``: plain AdamW steps of each pair before its coordinate steps
            (default 10, as the paper; 0 starts in coordinates at once, e.g. for non-zero ``B``).
        coordinate_ramp: mode ``"sds"``: the pair's first coordinate steps are scaled by ``k/coordinate_ramp``
            (``k = 1, 2, …``; default 0 = off; 10 recommended at the top of the stable lr range or with a
            constant lr), a learning-rate warm-up restarted with the Adam state.  After the reset Adam's
            first steps are sign-like, ``lr`` in *every* coordinate at once, which moves ``BA`` far more than
            the warm-up's LoRA steps on small factors.  Measured (H100, 3 seeds, training loss paired with
            LoRA on the same batches): without the ramp the first coordinate steps cost +0.09 nats on textlm
            at its best lr and +0.7–0.8 at three times it (textlm, MiniLM); with ``coordinate_ramp=10`` at most
            +0.01 on textlm at every lr and +0.19 on MiniLM at 10× its best.  Off by default because it cost
            MiniLM's held-out loss at the best lr (0.611 ± 0.036 against 0.548 ± 0.022; LoRA 0.675) while
            textlm's was unchanged (2.370 against 2.372).  It scales the applied change (weight decay
            included, exactly as a smaller lr would), not Adam's moments.
        resplit: mode ``"sds"``: re-split the pair at the end of its warm-up (default True).  The
            pair's Adam state is reset there either way (moments of the plain factors do not
            carry over to coordinates).
        rebalance: mode ``"sds"``: after each coordinate step, scale the pair to equal norms,
            ``(cA, B/c)`` with ``c = (‖B‖_F/‖A‖_F)^{1/2}`` from the step's Grams (default True).
            The coordinates, their gradients and Adam's state are invariant under this scaling
            (MATH P1), so it changes nothing in ``BA``'s trajectory; it stops the drift of the
            factors' balance that coordinate steps cause (a factor moves by ``η/σ(partner)``: the
            larger one grows faster), which would otherwise cost float32 precision.
        step_damping: mode ``"sds"``: γ of the trust-region shift ``μ_s = γ·lr·√min(m, n)`` added
            to both Grams before their Cholesky factorisation (default 1.0; 0 gives the exact
            coordinates of (2.2)).  A product ``B·A`` cannot take a coordinate step of size ``lr`` in a
            direction where its singular value ``σ`` is below ``~lr·√min(m, n)``: the ``δB·δA`` term,
            ``lr²·√(mn)/σ``, then dominates the step (measured: the loss jumps 1.1 → 5–7 at the end of
            the warm-up on κ = 1e8 factors).  With ``μ_s`` such directions are stepped LoRA-like
            (gain ``μ_s^{-1/2}``), directions with ``σ ≫ μ_s`` (balanced factors: ``K``'s eigenvalues are
            ``σ``) keep the isotropic SDS step; as ``lr → 0`` the damping vanishes, so the first-order
            properties (P9, P11) are unchanged.
        decouple_sigma: the singular-value channel of ``"sds_polar"`` (MATH 2.8): each factor's
            gradient is split into a singular-value part ``gσ`` (its own r-vector Adam state, step
            size ``lr·sigma_lr_ratio``) and a basis part (the usual elementwise Adam).  Off by
            default; refused with ``"sds"``, whose singular values live in the r×r core.
        sigma_lr_ratio: step-size ratio of the singular-value channel.
        route: how the r×r algebra is done.  ``"sds"``: ``"cholesky"`` only.  ``"scaled"``:
            ``"cholesky"`` (default) or ``"eigh"``.  ``"sds_polar"``: ``"eigh"`` (exact hard cut of
            (2.5)) or ``"newton_schulz"`` (matmul-only damped inverse root).  ``"auto"`` (default)
            picks Cholesky for ``sds``/``scaled`` and, for ``sds_polar``, Newton–Schulz on CUDA
            (where batched eigh is slow and synchronises) and eigh elsewhere.
        rank_tol: τ of MATH (2.5).  Cholesky route: the relative shift ``K + τ·trace(K)·I``
            (``None``: 1e-5 in float32 algebra, 1e-13 in float64).  eigh route: Gram eigenvalues
            ``≤ τ·λ_max`` pass no gradient (1e-6, 1e-14).  Newton–Schulz: the relative damping δ
            (1e-5, 1e-11).
        damping: δ of mode ``"scaled"`` and the proximal λ of ``"lorsum"`` (absolute, > 0).
        lorsum_sweeps: ALS sweeps of mode ``"lorsum"`` (1 = ``"scaled"``).
        oracle_max_numel: largest ``m·n`` for which ``"svd_oracle"`` forms the full matrices.
        linalg_dtype: dtype of the r×r algebra and of the coordinate maps; ``None`` means float32,
            or float64 for float64 parameters.  Never lower than float32, whatever the parameter
            dtype.
        skip_nonfinite: skip the whole step when any gradient it would use holds a NaN/Inf, as
            ``torch.amp.GradScaler`` does: parameters, moments, step counts and ``sds``'s warm-up count
            stay bit-identical; :attr:`skipped_steps` counts the skips (saved in ``state_dict()``'s
            ``param_groups[0]['skipped_steps']``) and the first skip warns with the offending parameter's
            name.  Default False (AdamW's behaviour).  With ``fused=True`` on CUDA the check
            (one ``_foreach_norm(·, ∞)`` pass) feeds torch's fused Adam kernel its ``found_inf`` flag and
            the host never waits (CUDA-graph friendly; the warning arrives a step later), except while a
            step needs a host decision: pairs in ``sds``'s warm-up, ``decouple_sigma``, ``lorsum`` with
            sweeps > 1, ``svd_oracle``.  Otherwise (CPU, foreach, those cases) the flag is read on the
            host.  Under FSDP2 the flag is summed over each shard group (one all-reduce of one number
            per group and step while the guard is on), so all ranks skip together.
        pairing: how names become pairs: ``None`` (PEFT names), a regex with a named group
            ``factor`` reading ``A``/``B`` (see :func:`sdsopt.pairing.regex_pairing` for other
            tags), or a function ``names -> [(name_A, name_B), ...]``.

    Design choices where MATH.md leaves one open:

    * ``sds``, the map back: Adam runs on a copy of the coordinates (in the parameter's dtype, so
      torch's foreach/fused kernels and AdamW's exact semantics apply, weight decay included:
      ``Ã(1−ηλ)`` is ``A(1−ηλ)``), and the factor is updated by the mapped *change*,
      ``A ← A + R_B^{-1}(Ã' − Ã)`` (float32 or better), not rebuilt from ``R_B^{-1}Ã'``: a step
      that Adam leaves at zero leaves the factor bit-identical, and bf16/fp16 factors are rounded
      once per step as under AdamW.  Coordinates, gradients and moments are never stored between
      steps (state stays AdamW-sized: ``exp_avg``/``exp_avg_sq`` live in coordinates, plus the
      pair's step count ``sds_warmup`` on both factors' state: warm-up steps, then coordinate steps until the
      ``coordinate_ramp`` ends; while it counts, ``skip_nonfinite`` decides on the host).
    * ``sds``, rank deficiency (2.5): the Cholesky factors are of ``K + τ·trace(K)·I`` always (no
      data-dependent branch, no host synchronisation), ``K = 0`` gives ``R = I`` (a plain AdamW
      step) and a failed factorisation an isotropic ``R``; any invertible ``R`` is an exact change
      of coordinates, so this changes only how orthonormal ``Q`` is, never the gradient's
      correctness.  The re-split keeps weak directions (σ below 1e-3·σ_max) trainable by leaving
      ``A``'s part at ``√(1e-3·σ_max)`` (:func:`sdsopt.coordinates.resplit_maps`).
    * ``sds``, what the paper's layer does differently (:mod:`sdsopt.reference`): its bases are
      refreshed on a schedule and its update between refreshes is linear in ``(A, B)`` (rank 2r,
      no ``δB·δA`` term); here the bases follow the factors every step and the step is the
      product of the updated factors, whose cross term ``δB̃·(R_B R_Aᵀ)^{-1}·δÃ`` is of size
      ``η²/σ_min(BA)``.
    * ``sds``, LoRA-FA style pairs (one factor frozen): only the trainable factor moves, in its
      coordinates; the warm-up count advances when either factor has a gradient.  Such pairs, and
      pairs with ``r > min(m, n)`` (whose core is rank-deficient, so the re-split's null-space basis
      would be set by rounding), are not re-split; their Adam state is still reset.

    * Each factor is divided by ``max|X|`` before its Gram is formed, so factors near the float32
      range limits give finite Grams; the threshold of (2.5) is relative to that scale.
    * Singular-value channel (``sds_polar``): ``gσ``, the ``U, V`` of (2.8) and the correction all use the factor
      *before* the step; weight decay (decoupled, as AdamW) acts on the parameter, the
      correction ``U diag(Δσ) Vᵀ`` is added after the AdamW update, undecayed.  The channel's
      Adam moments are kept in the parameter's dtype (so checkpoints round-trip exactly under
      ``Optimizer.load_state_dict``'s dtype policy) and share the parameter's step count.
    * Route ``newton_schulz`` computes a *damped* root ``(K + δ·trace K·I)^{-1/2}`` instead of the
      hard cut of (2.5) (a filtered pseudo-inverse amplifies rounding noise by ``δ^{-3/2}``); it agrees
      with eigh to ``O(δ/λ)`` on the range (tested, P6).  ``route="auto"`` uses it on CUDA only.
    * With repeated singular values the split (2.8) depends on the eigenbasis the solver returns
      (``diag(Uᵀ G V)`` is not invariant inside an eigenspace); the channel's tests use distinct ones.
    * ``lorsum``: the full step of MATH 3.1 is taken with ``η = lr``, its first sweep updates both
      factors from the current ones (so one sweep is exactly ``scaled``), later sweeps are
      Gauss–Seidel, and the rewritten gradient handed to Adam is the displacement divided by ``lr``.
      Low-rank momentum and the K-FAC/Shampoo-scaled variant are not implemented.
    * ``svd_oracle``: Adam runs on the full product ``W = BA`` with the true ``G`` (m×n moments), then
      the factors are replaced by the balanced rank-r factors of ``W`` closest to the current ones.
    * Distributed: under DDP nothing changes.  Under FSDP2 (or HSDP: sums over the shard mesh
      dimension) the factors are DTensor shards (``A`` along n, ``B`` along m:
      :func:`sdsopt.distributed.lora_shard_placement_fn`); the step
      all-reduces the stacked r×r Grams once (plus the r×r ``G̃Xᵀ`` once with the σ channel) and
      runs the rewrite and Adam on the local shards.  Adam is elementwise, so that is
      ``torch.optim.AdamW``'s result bit for bit, without DTensor dispatch per op.  DeepSpeed ZeRO
      is refused (it flattens the parameters, so pairs do not survive).
    * Non-finite gradients, ``skip_nonfinite=False`` (default): as in AdamW, nothing is skipped and
      nothing raises; the non-finite values reach the parameters.  Because the rewrite mixes the r
      entries of a row of ``B`` (a column of ``A``), one non-finite entry spreads along that row
      (column).  ``skip_nonfinite=True`` skips such steps instead (below).  A
      non-finite *factor* is treated as rank 0 by ``sds_polar``/``scaled`` (its partner's gradient
      is zeroed) and as ``R = I`` by ``sds`` (its partner takes a plain AdamW step) instead of
      making a factorisation raise.
    """

    def __init__(
        self,
        params: Iterable[Any] | torch.nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        mode: str = "sds",
        warmup_steps: int = 10,
        coordinate_ramp: int = 0,
        resplit: bool = True,
        rebalance: bool = True,
        step_damping: float = 1.0,
        decouple_sigma: bool = False,
        sigma_lr_ratio: float = 1.0,
        route: str = "auto",
        rank_tol: float | None = None,
        damping: float = 1e-6,
        lorsum_sweeps: int = 2,
        oracle_max_numel: int = 2**24,
        linalg_dtype: torch.dtype | None = None,
        pairing: str | PairingFn | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"SDSAdamW: skip_nonfinite={skip_nonfinite!r} must be True or False.")
        self.skip_nonfinite = skip_nonfinite
        self._skips = SkipLog()
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            mode=mode, warmup_steps=warmup_steps, coordinate_ramp=coordinate_ramp, resplit=resplit, rebalance=rebalance, step_damping=step_damping,
            decouple_sigma=decouple_sigma, sigma_lr_ratio=sigma_lr_ratio, route=route,
            rank_tol=rank_tol, damping=damping, lorsum_sweeps=lorsum_sweeps, oracle_max_numel=oracle_max_numel,
            linalg_dtype=linalg_dtype, maximize=maximize,
            foreach=foreach, fused=fused,
        )
        _check_hyperparameters(defaults, "defaults")
        self._pairing: PairingFn = _pairing.resolve_pairing(pairing)
        if isinstance(params, torch.nn.Module):  # e.g. Trainer(optimizer_cls_and_kwargs=(SDSAdamW, {"model": model}))
            params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        self._bucket_cache: dict[int, tuple[Any, ...]] = {}
        self._group_sizes: list[int] = []
        self._capture: LoraCapture | None = None
        super().__init__(params, defaults)
        if self._pairing is _pairing.peft_pairing:
            names = [n for g in self.param_groups for n in g.get("param_names", [])]
            lone = _pairing.lone_factors(names, [(p.name_a, p.name_b) for p in self.lora_pairs])
            if lone:
                warnings.warn(
                    f"SDSAdamW: {len(lone)} LoRA factor(s) without their partner get plain AdamW "
                    f"(first: {lone[0]!r}). Pass both factors to the optimizer to rewrite them.",
                    UserWarning, stacklevel=2,
                )
        if not self.lora_pairs:
            named = any("param_names" in g for g in self.param_groups)
            warnings.warn(
                "SDSAdamW found no LoRA pairs, so it behaves exactly as torch.optim.AdamW. "
                + ("No parameter name matched the pairing rule; pass pairing=... for custom names "
                   if named else "The parameters came without names: pass model.named_parameters() ")
                + "or give explicit pairs: [{'params': [...], 'lora_pairs': [(A, B), ...]}].",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ pairing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Optimizer.add_param_group``; also resolves the group's LoRA pairs.

        Pairs come from the group's explicit ``lora_pairs`` (tensors ``(A, B)``) and from the
        pairing rule applied to its parameter names.  Raises ``ValueError`` for a pair split
        across groups, a parameter in two pairs, or shapes that do not chain.
        """
        param_group = dict(param_group)
        explicit = param_group.pop("lora_pairs", None) or []
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        _check_hyperparameters(group, f"param group {gi}")
        try:
            group["lora_pairs"] = self._resolve_pairs(gi, group, explicit)
        except Exception:
            self.param_groups.pop()
            raise
        self._group_sizes.append(len(group["params"]))

    def _resolve_pairs(self, gi: int, group: dict[str, Any], explicit: list[Any]) -> list[tuple[int, int]]:
        params: list[Tensor] = group["params"]
        for i, p in enumerate(params):
            check_not_deepspeed(p, _param_label(group, i, gi))
        where = {id(p): i for i, p in enumerate(params)}
        pairs: list[tuple[int, int]] = []
        for k, pair in enumerate(explicit):
            if len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair):
                raise ValueError(f"param group {gi}: lora_pairs[{k}] must be a tuple of two tensors (A, B).")
            for t, role in zip(pair, "AB"):
                if id(t) not in where:
                    other = next((j for j, g in enumerate(self.param_groups[:-1])
                                  if any(p is t for p in g["params"])), None)
                    hint = (f"it is in param group {other}: a pair's two factors must share one group"
                            if other is not None else "add it to this group's 'params'")
                    raise ValueError(f"param group {gi}: factor {role} of lora_pairs[{k}] is not in this group's params; {hint}.")
            pairs.append((where[id(pair[0])], where[id(pair[1])]))

        names: list[str] | None = group.get("param_names")
        if names:
            index = {n: i for i, n in enumerate(names)}
            pairs += [(index[a], index[b]) for a, b in self._pairing(names)]
            self._check_not_split(gi, names)

        seen: dict[int, int] = {}
        for k, (ia, ib) in enumerate(pairs):
            for i in (ia, ib):
                if i in seen or ia == ib:
                    raise ValueError(
                        f"param group {gi}: {_param_label(group, i, gi)} is in more than one LoRA pair; "
                        "each factor may belong to one pair only (check explicit lora_pairs and the pairing rule)."
                    )
                seen[i] = k
            check_pair_shapes(params[ia], params[ib], _param_label(group, ia, gi), _param_label(group, ib, gi))
            check_pair_layout(params[ia], params[ib], _param_label(group, ia, gi), _param_label(group, ib, gi))
        return pairs

    def _check_not_split(self, gi: int, names: list[str]) -> None:
        """Raise if the pairing rule pairs a name of group ``gi`` with a name of an earlier group."""
        owner = {n: j for j, g in enumerate(self.param_groups[:gi]) for n in g.get("param_names", [])}
        if not owner:
            return
        mine = set(names)
        for a, b in self._pairing(list(owner) + names):
            if (a in mine) != (b in mine):
                raise ValueError(
                    f"LoRA pair {a!r} / {b!r} is split across param groups {owner.get(a, gi)} and "
                    f"{owner.get(b, gi)}; put both factors of a pair in the same param group "
                    "(group by module, not by factor)."
                )

    @property
    def lora_pairs(self) -> list[LoraPair]:
        """Every resolved pair, with its group, indices, names and ``(m, n, r)``."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for ia, ib in group["lora_pairs"]:
                A, B = group["params"][ia], group["params"][ib]
                names = group.get("param_names")
                out.append(LoraPair(
                    group=gi, index_a=ia, index_b=ib,
                    name_a=names[ia] if names else f"params[{ia}]", name_b=names[ib] if names else f"params[{ib}]",
                    m=B.shape[0], n=a_rows(A).shape[1], r=A.shape[0],
                ))
        return out

    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``; ``param_groups[0]['skipped_steps']`` carries :attr:`skipped_steps`
        (in a param group, so that ``torch.distributed.checkpoint``'s optimizer state dicts keep it)."""
        out = super().state_dict()
        if out["param_groups"]:
            out["param_groups"][0]["skipped_steps"] = self.skipped_steps
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, after checking that the checkpoint fits this optimizer.

        Raises ``ValueError`` (naming the param group or parameter, and what to do) before anything is
        changed when the checkpoint has other param groups, other LoRA pairs, another mode, or state
        tensors whose shapes differ from the parameters'.
        """
        self._check_state_dict(state_dict)
        skipped = int(state_dict["param_groups"][0].get("skipped_steps", 0)) if state_dict["param_groups"] else 0
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("skipped_steps", None)
        self._skips.reset(skipped)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = "SDSAdamW.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{where}: expected an optimizer state dict with 'state' and 'param_groups' "
                             "(what SDSAdamW.state_dict() returns).")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"{where}: the checkpoint has {len(saved)} param group(s), this optimizer "
                             f"{len(self.param_groups)}; build it with the same param groups as the one that was saved.")
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            if theirs.get("mode") == "sds" and "warmup_steps" not in theirs and state_dict["state"]:
                raise ValueError(
                    f"{where}: param group {gi} of the checkpoint was written by sdsopt 0.1, whose "
                    "mode 'sds' kept Adam moments of the plain factors. Since 0.2, 'sds' runs Adam in the bases' "
                    "coordinates and those moments do not apply. Resume with mode='sds_polar' (0.1's 'sds' under "
                    "its new name) and rewrite the checkpoint's param_groups[i]['mode'] to 'sds_polar', or start "
                    "the optimizer state afresh with mode='sds'."
                )
            ours = [tuple(p) for p in mine["lora_pairs"]]
            other = [tuple(p) for p in theirs.get("lora_pairs", [])]
            if ours != other:
                raise ValueError(
                    f"{where}: param group {gi} of the checkpoint has LoRA pairs {other[:3]}... "
                    f"but this optimizer has {ours[:3]}...; build the optimizer from the same model and "
                    "parameter order (and pairing rule) as the one that was saved."
                )
            if len(theirs["params"]) != len(mine["params"]):
                raise ValueError(f"{where}: param group {gi} of the checkpoint holds {len(theirs['params'])} "
                                 f"parameters, this optimizer's {len(mine['params'])}; build the optimizer from the "
                                 "same model and parameter order as the one that was saved.")
            if theirs.get("mode", mine["mode"]) != mine["mode"]:
                raise ValueError(
                    f"{where}: param group {gi} of the checkpoint ran mode={theirs['mode']!r}, this optimizer "
                    f"mode={mine['mode']!r}; its Adam moments are of other gradients (or other coordinates). "
                    f"Resume with mode={theirs['mode']!r}, or switch modes by loading only the model's "
                    "weights and starting the optimizer state afresh."
                )
            for i, (pid, p) in enumerate(zip(theirs["params"], mine["params"])):
                for key, value in state_dict["state"].get(pid, {}).items():
                    if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and isinstance(value, Tensor) \
                            and tuple(value.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{where}: {_param_label(mine, i, gi)} is {tuple(p.shape)} but the checkpoint's "
                            f"{key} for it is {tuple(value.shape)} (LoRA rank or model changed?); build the model "
                            "with the shapes it was saved with, or start the optimizer state afresh."
                        )

    def attach(self, model: torch.nn.Module) -> LoraCapture:
        """Record the LoRA layers' inputs and output gradients (modes ``lorsum`` with sweeps > 1, ``svd_oracle``).

        Returns the :class:`sdsopt.capture.LoraCapture`; ``capture.remove()`` detaches it.  The
        records are cleared after every :meth:`step`.
        """
        pairs = [(g["params"][ia], g["params"][ib]) for g in self.param_groups for ia, ib in g["lora_pairs"]]
        self._capture = LoraCapture(model, pairs)
        return self._capture

    # ------------------------------------------------------------------ step
    def _init_group(self, group: dict[str, Any], gi: int) -> tuple[dict[int, int], dict[str, list[Tensor]], bool]:
        """Collect params with grads and their AdamW state, as ``torch.optim.Adam._init_group`` does."""
        lists: dict[str, list[Tensor]] = defaultdict(list)
        position: dict[int, int] = {}
        has_complex = False
        device_step = bool(group["fused"])  # torch keeps `step` on the device for fused kernels
        if len(group["params"]) != self._group_sizes[gi]:
            raise RuntimeError(
                f"SDSAdamW: param group {gi} now holds {len(group['params'])} tensors instead of the "
                f"{self._group_sizes[gi]} it was built with, so its LoRA pairs are lost. A wrapper replaced the "
                "parameters (DeepSpeed ZeRO flattens them into partitions): SDSAdamW supports DDP and FSDP2, not ZeRO."
            )
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"SDSAdamW: {_param_label(group, i, gi)} has a sparse gradient; SDSAdamW (like AdamW) "
                    "needs dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            if "step" not in state:  # (mode sds may have put the pair's warm-up count there)
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if device_step
                    else torch.tensor(0.0, dtype=torch.float32)
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            position[i] = len(lists["params"])
            # DTensor (FSDP2) shards: the update is elementwise, so Adam runs on the local shards
            lists["params"].append(local(p))
            lists["grads"].append(local_grad(p, _param_label(group, i, gi)))
            lists["exp_avgs"].append(local(state["exp_avg"]))
            lists["exp_avg_sqs"].append(local(state["exp_avg_sq"]))
            if group["amsgrad"]:
                lists["max_exp_avg_sqs"].append(local(state["max_exp_avg_sq"]))
            lists["state_steps"].append(state["step"])
        return position, lists, has_complex

    def _adam(self, group: dict[str, Any], lists: dict[str, list[Tensor]], *, lr: float,
              weight_decay: float, has_complex: bool = False, found_inf: Tensor | None = None) -> None:
        beta1, beta2 = group["betas"]
        adam(
            lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"], lists["state_steps"],
            foreach=group["foreach"], fused=group["fused"], has_complex=has_complex, found_inf=found_inf,
            decoupled_weight_decay=True, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
            lr=lr, weight_decay=weight_decay, eps=group["eps"], maximize=group["maximize"],
        )

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SDS-AdamW step: rewrite the paired gradients, then the AdamW update (closure as in AdamW).

        Under ``torch.compile`` the step runs eagerly (``torch.compiler.disable``: a graph break):
        its data-dependent linear algebra (eigh) and per-shape bucketing do not trace, while the
        model's forward and backward around it still compile.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prepared = [(gi, group, *self._init_group(group, gi)) for gi, group in enumerate(self.param_groups)]
        found_inf = None
        if self.skip_nonfinite:
            skip, found_inf = self._guard(prepared)
            if skip:
                if self._capture is not None:
                    self._capture.clear()
                return loss
        for gi, group, position, lists, has_complex in prepared:
            if not lists["params"]:
                continue
            corrections: list[tuple[Tensor, Tensor]] = []
            replaced: list[tuple[Tensor, Tensor]] = []
            coordinates: list[_CoordinateBlock] = []
            mode = group["mode"]
            if mode == "sds":
                coordinates = self._enter_coordinates(gi, group, position, lists, found_inf)
            elif mode in SPECTRAL_MODES or (mode == "lorsum" and group["lorsum_sweeps"] == 1):
                corrections = self._rewrite_group(gi, group, position, lists)
            elif mode in ("lorsum", "svd_oracle"):
                replaced = self._rewrite_with_capture(gi, group, position, lists)
            self._adam(group, lists, lr=group["lr"], weight_decay=group["weight_decay"], has_complex=has_complex,
                       found_inf=found_inf)
            for block in coordinates:
                block.leave()
            if mode == "sds":
                self._advance_warmup(group, position)
            if corrections:
                targets, deltas = zip(*corrections)
                torch._foreach_add_(list(targets), list(deltas))
            for p, value in replaced:
                p.copy_(value.reshape(p.shape))
        if self._capture is not None:
            self._capture.clear()
        return loss

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``skip_nonfinite=True`` (saved in and restored from checkpoints)."""
        return self._skips.total

    def _guard(self, prepared: list[tuple[Any, ...]]) -> tuple[bool, Tensor | None]:
        """``skip_nonfinite``: is any gradient this step would use NaN/Inf?  Returns ``(skip now, found_inf)``.

        Under FSDP2 a shard's flag is summed over its process group (one all-reduce of one number per
        group), so that all ranks skip together; DDP's gradients are equal on all ranks already.  The
        decision stays on the device (``found_inf`` for torch's fused Adam, no host sync) when every
        gradient is on CUDA, every group has ``fused=True`` and no step of the group needs a host decision
        (``sds``'s warm-up counts, the σ channel's Adam, the capture modes); otherwise it is read on the host
        and a skipped step returns at once.
        """
        grads, where, groups_of = [], [], []
        for gi, group, position, lists, _ in prepared:
            for i, q in position.items():
                grads.append(lists["grads"][q])
                where.append((gi, i))
                groups_of.append(process_group(group["params"][i]))
        if not grads:
            return False, None

        def label(j: int) -> str:
            gi, i = where[j]
            return _param_label(self.param_groups[gi], i, gi)

        bad = nonfinite_flags(grads)
        found = bad.any().to(torch.float32)
        sharded = {pg: torch.stack([bad[j] for j, g in enumerate(groups_of) if g is pg]).any().to(torch.float32)
                   .reshape(1) for pg in {g for g in groups_of if g is not None}}
        for flag in _reduced(sharded, lambda pg: (pg, torch.float32, bad.device)).values():
            found = torch.maximum(found, (flag > 0).to(torch.float32).reshape(()))
        host_decisions = any(
            not group["fused"] or group["decouple_sigma"] or group["mode"] in ("svd_oracle", "lorsum")
            or (group["mode"] == "sds" and any(self._counting(group, ia) for ia, _ in group["lora_pairs"]))
            for _, group, _, lists, _ in prepared if lists["params"]
        )
        if not host_decisions and all(g.is_cuda for g in grads):
            self._skips.poll()
            self._skips.skipped_on_device(found, bad, label)
            return False, found
        if not found.item():
            return False, None
        self._skips.skipped_on_host(label(int(torch.argmax(bad.to(torch.uint8)))) if bad.any()
                                    else "a parameter on another rank")
        return True, None

    def _in_coordinates(self, group: dict[str, Any], ia: int) -> bool:
        """Mode ``sds``: has the pair whose A factor is ``group['params'][ia]`` finished its warm-up?"""
        return self.state.get(group["params"][ia], {}).get("sds_warmup", 0) >= group["warmup_steps"]

    def _counting(self, group: dict[str, Any], ia: int) -> bool:
        """Mode ``sds``: is the pair's step count still read on the host (warm-up or coordinate ramp)?"""
        count = self.state.get(group["params"][ia], {}).get("sds_warmup", 0)
        return count < group["warmup_steps"] + max(group["coordinate_ramp"] - 1, 0)

    def _ramp(self, group: dict[str, Any], ids_a: list[int], like: Tensor) -> float | Tensor | None:
        """The factors ``min(1, (n − warmup_steps + 1)/coordinate_ramp)`` of pairs at count ``n`` (``[k, 1, 1]``
        if they differ), or ``None`` once every pair of the bucket is past its ramp."""
        ramp, start = group["coordinate_ramp"], group["warmup_steps"]
        if ramp <= 1:
            return None
        c = [min(1.0, (self.state[group["params"][i]].get("sds_warmup", 0) - start + 1) / ramp) for i in ids_a]
        if all(v == 1.0 for v in c):
            return None
        if all(v == c[0] for v in c):
            return c[0]
        return torch.tensor(c, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def _buckets(self, gi: int, group: dict[str, Any], position: dict[int, int]) -> list[_Bucket]:
        """Pairs with a gradient, grouped into buckets of equal shapes, dtypes, device, grad presence
        and (mode ``sds``) phase: warm-up or coordinates.

        Cached per group: recomputed only when which factors have gradients, or a pair's phase, changes.
        """
        pairs = group["lora_pairs"]
        sds = group["mode"] == "sds"
        key = tuple((ia in position, ib in position, sds and self._in_coordinates(group, ia)) for ia, ib in pairs)
        cached = self._bucket_cache.get(gi)
        if cached is not None and cached[0] == key and cached[1] is pairs:
            return cached[2]
        params: list[Tensor] = group["params"]
        found: dict[tuple[Any, ...], _Bucket] = {}
        for (ia, ib), (has_a, has_b, coordinates) in zip(pairs, key):
            if not (has_a or has_b):
                continue
            A, B = params[ia], params[ib]
            k = (A.shape, B.shape, A.dtype, B.dtype, A.device, has_a, has_b, coordinates)
            bucket = found.setdefault(k, _Bucket(a_shape=A.shape, b_shape=B.shape, has_a=has_a, has_b=has_b,
                                                 coordinates=coordinates))
            bucket.a.append(ia)
            bucket.b.append(ib)
        buckets = list(found.values())
        self._bucket_cache[gi] = (key, pairs, buckets)
        return buckets

    def _factors(self, group: dict[str, Any], ids_a: list[int], ids_b: list[int], dt: torch.dtype
                 ) -> tuple[Tensor, Tensor]:
        """The pairs' factors stacked in ``dt``, natural layout: ``A`` ``[k, r, n]``, ``B`` ``[k, m, r]``
        (local shards under FSDP2)."""
        params: list[Tensor] = group["params"]
        A = torch.stack([local(params[i]) for i in ids_a]).to(dt)
        B = torch.stack([local(params[i]) for i in ids_b]).to(dt)
        return A.view(len(ids_a), A.shape[1], -1), B.view(len(ids_b), B.shape[1], B.shape[2])

    @staticmethod
    def _cholesky_all(requests: list[tuple[Tensor, Any, float, float]]) -> list[tuple[Tensor, Tensor]]:
        """``(K, L)``: every Gram batch of ``requests`` = ``(K, process group, τ, step shift μ_s)`` summed over
        its process group, and its lower Cholesky factor (MATH 2.1, 2.5) of ``K + (τ·trace K + μ_s)·I``.

        All Grams of a step that share an r, dtype, device, τ and process group go through *one*
        all-reduce (FSDP2 shards: the Grams of local shards are partial sums) and *one*
        ``cholesky_ex`` call, so neither the collectives nor the launches grow with the pair count.
        """
        pending: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for j, (K, pg, tol, shift) in enumerate(requests):
            pending[(K.shape[-1], K.dtype, K.device, tol, pg, shift)].append(j)
        stacked = _reduced({key: torch.cat([requests[j][0] for j in js]) for key, js in pending.items()},
                           lambda key: (key[4], key[1], key[2]))
        out: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * len(requests)
        for key, js in pending.items():
            sizes = [requests[j][0].shape[0] for j in js]
            K = stacked[key]
            for j, K_j, L_j in zip(js, K.split(sizes), cholesky_lower(K, key[3], shift=key[5]).split(sizes)):
                out[j] = (K_j, L_j)
        return out

    def _enter_coordinates(self, gi: int, group: dict[str, Any], position: dict[int, int],
                           lists: dict[str, list[Tensor]], found_inf: Tensor | None = None) -> list[_CoordinateBlock]:
        """Mode ``sds`` before Adam: hand Adam the coordinates (2.2) of every pair past its warm-up.

        Per shape bucket: one stack of each factor and one batched Gram; then all Cholesky factors of
        the step at once (:meth:`_cholesky_all`); then per bucket and factor one r×r triangular
        inverse and two batched matmuls (coordinates and their gradient).  ``lists['params']``/``['grads']`` of
        these factors are replaced by the coordinates and their gradients; the returned blocks map Adam's change
        back (``leave``).
        """
        requests: list[tuple[Tensor, Any, float, float]] = []
        work = []
        for bucket in self._buckets(gi, group, position):
            if not bucket.coordinates:
                continue  # warm-up: plain AdamW on the factors
            params: list[Tensor] = group["params"]
            dt, tol = algebra_precision(params[bucket.a[0]].dtype, group["linalg_dtype"], group["rank_tol"], "cholesky")
            A, B = self._factors(group, bucket.a, bucket.b, dt)
            # the step damping μ_s = γ·lr·√min(m, n) (see the class docstring), from the whole factors'
            # shapes: under FSDP2 A and B are local shards, and every rank must take the same step
            m, n = bucket.b_shape[0], math.prod(bucket.a_shape[1:])
            shift = group["step_damping"] * group["lr"] * math.sqrt(min(m, n))
            sides = []
            if bucket.has_a:  # Ã needs R_B
                sides.append(("A", A, bucket.a, len(requests)))
                requests.append((gram(B.mT), process_group(params[bucket.b[0]]), tol, shift))
            if bucket.has_b:  # B̃ needs R_A
                sides.append(("B", B, bucket.b, len(requests)))
                requests.append((gram(A), process_group(params[bucket.a[0]]), tol, shift))
            work.append((dt, sides, shift, bucket.a))
        factors = self._cholesky_all(requests)
        blocks = []
        for dt, sides, shift, a_ids in work:
            scales = {}
            if group["rebalance"] and group["lr"] > 0 and len(sides) == 2:  # lr = 0 (a scheduler) moves nothing
                (_, _, _, j_a), (_, _, _, j_b) = sides  # side A's request holds K_B, side B's holds K_A
                scales = dict(zip("AB", balance_scales(K_A=factors[j_b][0], K_B=factors[j_a][0])))
                if found_inf is not None:  # a step skipped on the device leaves the factors as they are
                    scales = {k: torch.where(found_inf > 0, torch.ones_like(c), c) for k, c in scales.items()}
            for side, X, ids, j in sides:
                pos = [position[i] for i in ids]
                like = lists["params"][pos[0]]
                G = torch.stack([lists["grads"][q] for q in pos]).to(dt).view(X.shape)
                K, L = factors[j]
                L_inv = lower_inverse(L)
                X_t, g_t = to_coordinates(L, L_inv, X, G, side)
                before = X_t.to(like.dtype)
                adam_view = before.clone()
                block = _CoordinateBlock(side=side, M=factor_map(K, L_inv, shift), X=X, before=before, after=adam_view,
                                         targets=[lists["params"][q] for q in pos], scale=scales.get(side),
                                         ramp=self._ramp(group, a_ids, X))
                g_t = g_t.to(like.dtype).contiguous()  # fused Adam needs the params' layout
                for q, p_t, g_q in zip(pos, _unstack(adam_view, like.shape), _unstack(g_t, like.shape)):
                    lists["params"][q] = p_t
                    lists["grads"][q] = g_q
                blocks.append(block)
        return blocks

    def _advance_warmup(self, group: dict[str, Any], position: dict[int, int]) -> None:
        """Mode ``sds`` after Adam: count the pair's steps (warm-up, then the coordinate ramp); pairs that just
        finished the warm-up are re-split (2.4) (if ``resplit``) and their Adam state reset, so that their moments
        start in coordinates."""
        params: list[Tensor] = group["params"]
        finished: list[tuple[int, int]] = []
        for ia, ib in group["lora_pairs"]:
            if not (ia in position or ib in position) or not self._counting(group, ia):
                continue
            count = self.state[params[ia]].get("sds_warmup", 0)
            for i in (ia, ib):
                self.state[params[i]]["sds_warmup"] = count + 1
            if count + 1 == group["warmup_steps"]:
                finished.append((ia, ib))
        if not finished:
            return
        # a frozen factor (LoRA-FA) is never rewritten; with r > min(m, n) the core R_B R_Aᵀ is rank-deficient by
        # construction, its SVD's null-space basis is whatever rounding makes it, and the coordinate steps after a
        # re-split would depend on that arbitrary choice (measured: a 1e-15 perturbation of the gradients moved the
        # parameters by 9e-5 after four steps), so such pairs keep their factors
        splittable = [(ia, ib) for ia, ib in finished
                      if params[ia].requires_grad and params[ib].requires_grad
                      and params[ia].shape[0] <= min(params[ib].shape[0], math.prod(params[ia].shape[1:]))]
        if group["resplit"] and splittable:
            self._resplit(group, splittable)
        for pair in finished:
            for i in pair:
                state = self.state[params[i]]
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                    if key in state:
                        state[key].zero_()

    def _resplit(self, group: dict[str, Any], pairs: list[tuple[int, int]]) -> None:
        """(2.4) for ``pairs``: ``B ← B·M_B``, ``A ← M_A·A`` with ``B'A' = BA`` (one batched SVD per shape;
        under FSDP2 one all-reduce of the Grams, on this one step of the pair's life)."""
        params: list[Tensor] = group["params"]
        by_shape: dict[tuple[Any, ...], list[tuple[int, int]]] = defaultdict(list)
        for ia, ib in pairs:
            A, B = params[ia], params[ib]
            by_shape[(A.shape, B.shape, A.dtype, B.dtype, A.device)].append((ia, ib))
        work, grams = [], {}
        for key, members in by_shape.items():
            ids_a, ids_b = [ia for ia, _ in members], [ib for _, ib in members]
            dt, tol = algebra_precision(key[2], group["linalg_dtype"], group["rank_tol"], "cholesky")
            A, B = self._factors(group, ids_a, ids_b, dt)
            grams[(key, "A")], grams[(key, "B")] = gram(A), gram(B.mT)
            work.append((key, ids_a, ids_b, A, B, tol))
        grams = _reduced(grams, lambda k: (process_group(params[by_shape[k[0]][0][0 if k[1] == "A" else 1]]),
                                           grams[k].dtype, grams[k].device))
        for key, ids_a, ids_b, A, B, tol in work:
            M_A, M_B = resplit_maps(grams[(key, "A")], grams[(key, "B")], tol)
            for ids, new in ((ids_a, M_A @ A), (ids_b, B @ M_B)):
                targets = [local(params[i]) for i in ids]
                torch._foreach_copy_(targets, [t.to(p.dtype).view(p.shape) for t, p in zip(new.unbind(0), targets)])

    def _rewrite_group(
        self, gi: int, group: dict[str, Any], position: dict[int, int], lists: dict[str, list[Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Replace the paired grads in ``lists['grads']`` by their rewrite (equation R of :mod:`sdsopt.rewrite`).

        In phases, so that the number of kernel launches and host synchronisations does not grow
        with the number of pairs: (1) per bucket of equal shapes, one stack of each factor kind and
        one batched Gram; (2) all Grams of equal size, over all buckets, in *one* all-reduce (FSDP2
        shards only) and *one* eigh or Newton–Schulz call; (3) per bucket and gradient kind, one
        stack and one bmm with ``P``; (4)-(5) with the singular-value channel, its r×r products
        (one more all-reduce per size under FSDP2) and split; the output slices are handed to Adam
        as the rewritten gradients.  Returns the singular-value corrections ``(param, delta)``
        (local shards under FSDP2) to add after the AdamW update.
        """
        params: list[Tensor] = group["params"]
        sigma = group["decouple_sigma"]
        kw = dict(mode="scaled" if group["mode"] == "lorsum" else group["mode"], damping=group["damping"])

        # (1) factor stacks (row form, MATH 2.1) and Grams
        work = []
        pending: dict[tuple[Any, ...], list[tuple[int, str, Tensor]]] = defaultdict(list)
        for bucket in self._buckets(gi, group, position):
            k, r = len(bucket.a), bucket.a_shape[0]
            route = resolve_route(group["route"], params[bucket.a[0]].device, kw["mode"])
            dt, tol = algebra_precision(params[bucket.a[0]].dtype, group["linalg_dtype"], group["rank_tol"], route)
            if route == "newton_schulz" and tol < 64 * torch.finfo(dt).eps:
                raise ValueError(
                    f"SDSAdamW param group {gi}: rank_tol={tol} is below 64·eps of {dt}, too small a damping for "
                    "the Newton–Schulz route to converge; raise rank_tol, pass linalg_dtype=torch.float64, "
                    "or use route='eigh'.")
            # local shards under FSDP2 (A along n, B along m): Grams are then partial sums, reduced in (2)
            A = torch.stack([local(params[i]) for i in bucket.a]).to(dt).view(k, r, -1)
            B = torch.stack([local(params[i]) for i in bucket.b]).to(dt).view(k, -1, r)
            rows = {"A": A, "B": B.transpose(1, 2)}
            groups = {"A": process_group(params[bucket.a[0]]), "B": process_group(params[bucket.b[0]])}
            needed = {"B"} if bucket.has_a else set()  # g̃A needs P(K_B)
            needed |= {"A"} if bucket.has_b else set()  # g̃B needs P(K_A)
            if sigma:
                needed |= {s for s, present in (("A", bucket.has_a), ("B", bucket.has_b)) if present}
            for side in sorted(needed):
                pending[(r, dt, tol, B.device, route, groups[side])].append((len(work), side, gram(rows[side])))
            work.append((bucket, dt, rows, {}, {}, groups))

        # (2) one all-reduce of all Grams (sharded factors only), one spectral computation per Gram size
        grams = _reduced({key: torch.cat([K for _, _, K in items]) for key, items in pending.items()},
                         lambda key: (key[5], key[1], key[3]))
        for key, items in pending.items():
            tol, route = key[2], key[4]
            K = finite_or_zero(grams[key])
            need_spec = route == "eigh" or sigma
            spec = spectrum(K, tol) if need_spec else None
            P = preconditioner(K, route=route, rank_tol=tol, spec_other=spec, **kw)
            start = 0
            for w, side, Kw in items:
                stop = start + Kw.shape[0]
                work[w][3][side] = P[start:stop]
                if spec is not None:
                    work[w][4][side] = spec.select(slice(start, stop))
                start = stop

        # (3) the rewrite (R), in row form for the singular-value channel
        rewritten = []
        for bucket, dt, rows, P, spec, groups in work:
            k, r = len(bucket.a), bucket.a_shape[0]
            for side, other, ids, present in (("A", "B", bucket.a, bucket.has_a), ("B", "A", bucket.b, bucket.has_b)):
                if not present:
                    continue
                pos = [position[i] for i in ids]
                G = torch.stack([lists["grads"][q] for q in pos]).to(dt)
                new = P[other] @ G.view(k, r, -1) if side == "A" else (G.view(k, -1, r) @ P[other]).transpose(1, 2)
                rewritten.append((side, ids, pos, new, rows[side], spec.get(side), groups[side]))

        # (4) the singular-value channel's r×r G̃ Xᵀ, summed over shards in one all-reduce
        GXt: dict[int, Tensor] = {}
        if sigma:
            GXt = _reduced({j: new @ X.transpose(1, 2) for j, (_, _, _, new, X, _, _) in enumerate(rewritten)},
                           lambda j: (rewritten[j][6], rewritten[j][4].dtype, rewritten[j][4].device))

        # (5) the channel's split (2.3) and Adam on σ (2.4), then the hand-over to Adam
        corrections: list[tuple[Tensor, Tensor]] = []
        for j, (side, ids, pos, new, X, spec_x, _) in enumerate(rewritten):
            if sigma:
                g_sigma, new = sigma_split(spec_x, X, new, GXt[j])
                steps = self._sigma_adam(group, [params[i] for i in ids], g_sigma, lists, pos)
                delta = sigma_correction(spec_x, X, steps)
                delta = delta if side == "A" else delta.transpose(1, 2)
                targets = [lists["params"][q] for q in pos]
                corrections += [(p, d.reshape(p.shape).to(p.dtype)) for p, d in zip(targets, delta)]
            like = lists["params"][pos[0]]
            new = new if side == "A" else new.transpose(1, 2)
            new = new.to(like.dtype).reshape(len(ids), *like.shape)  # views when 2-D (Linear, embedding)
            for q, g in zip(pos, new.unbind(0)):
                lists["grads"][q] = g
        return corrections

    def _rewrite_with_capture(
        self, gi: int, group: dict[str, Any], position: dict[int, int], lists: dict[str, list[Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Modes that need the full gradient applied to new vectors: ``lorsum`` (sweeps > 1), ``svd_oracle``.

        Research modes for ablations on small models: one pair at a time, in float32 or better.
        ``lorsum`` replaces the pair's gradients by its rewrite; ``svd_oracle`` runs Adam on the full
        ``W = BA`` (state ``oracle_exp_avg``/``oracle_exp_avg_sq`` on A's state, m×n) and returns the
        new factors, which are copied in after the step instead of an Adam update of A and B.
        """
        mode, capture = group["mode"], self._capture
        params: list[Tensor] = group["params"]
        if any(process_group(p) is not None or local(p) is not p for p in params):
            raise ValueError(
                f"SDSAdamW mode={mode!r} (sweeps > 1 / full matrices) cannot run on sharded (FSDP2) factors; "
                "use mode 'sds', 'scaled', 'lora' or 'lorsum' with lorsum_sweeps=1."
            )
        if capture is None:
            raise RuntimeError(
                f"SDSAdamW mode={mode!r} needs the LoRA layers' inputs: call opt.attach(model) once before training."
            )
        replaced: list[tuple[Tensor, Tensor]] = []
        drop: set[int] = set()
        for ia, ib in group["lora_pairs"]:
            if ia not in position or ib not in position:
                continue
            A, B = params[ia], params[ib]
            dt, _ = algebra_precision(A.dtype, group["linalg_dtype"], None)
            Am, Bm = a_rows(A).to(dt), b_matrix(B).to(dt)
            if mode == "lorsum":
                gA = a_rows(lists["grads"][position[ia]]).to(dt)
                gB = b_matrix(lists["grads"][position[ib]]).to(dt)
                new_a, new_b = lorsum_sweeps(
                    Am, Bm, gA, gB, lr=group["lr"], damping=group["damping"], sweeps=group["lorsum_sweeps"],
                    G_mul=lambda V, A=A, B=B: capture.matmul(A, B, V), Gt_mul=lambda U, A=A, B=B: capture.rmatmul(A, B, U),
                )
                lists["grads"][position[ia]] = new_a.reshape(A.shape).to(A.dtype)
                lists["grads"][position[ib]] = new_b.reshape(B.shape).to(B.dtype)
                continue
            m, n, r = Bm.shape[0], Am.shape[1], Am.shape[0]
            if m * n > group["oracle_max_numel"] or r > min(m, n):
                raise ValueError(
                    f"SDSAdamW mode='svd_oracle': pair {_param_label(group, ia, gi)} is {m}×{n} with r={r}; the oracle "
                    f"forms m×n matrices (limit oracle_max_numel={group['oracle_max_numel']}) and needs r ≤ min(m, n). "
                    "Raise oracle_max_numel for a larger model, or use another mode."
                )
            state = self.state[A]
            W = (Bm @ Am).to(A.dtype)
            if "oracle_exp_avg" not in state:
                state["oracle_exp_avg"] = torch.zeros_like(W)
                state["oracle_exp_avg_sq"] = torch.zeros_like(W)
            sub = {"params": [W], "grads": [capture.full(A, B, dt).to(A.dtype)],
                   "exp_avgs": [state["oracle_exp_avg"]], "exp_avg_sqs": [state["oracle_exp_avg_sq"]],
                   "max_exp_avg_sqs": [], "state_steps": [lists["state_steps"][position[ia]].clone()]}
            self._adam({**group, "amsgrad": False, "foreach": False, "fused": False}, sub,
                       lr=group["lr"], weight_decay=group["weight_decay"])
            new_a, new_b = svd_refactor(W.to(dt), Am, Bm)
            replaced += [(A, new_a.to(A.dtype)), (B, new_b.to(B.dtype))]
            drop |= {position[ia], position[ib]}
            for p in (A, B):
                self.state[p]["step"] += 1
        if drop:
            for key, values in lists.items():
                if len(values) == len(lists["params"]) and key != "params":
                    lists[key] = [v for q, v in enumerate(values) if q not in drop]
            lists["params"] = [v for q, v in enumerate(lists["params"]) if q not in drop]
        return replaced

    def _sigma_adam(self, group: dict[str, Any], factors: list[Tensor], g_sigma: Tensor,
                    lists: dict[str, list[Tensor]], pos: list[int]) -> Tensor:
        """Adam on the singular-value gradients ``gσ`` (2.4); returns the signed steps ``[k, r]``.

        Uses torch's functional Adam on a zero buffer: after the call the buffer holds
        ``−lr·sigma_lr_ratio·Adam(gσ)`` (no weight decay), in the factor's dtype.
        """
        dtype = factors[0].dtype
        buf = torch.zeros(g_sigma.shape, dtype=dtype, device=g_sigma.device)
        sub: dict[str, list[Tensor]] = defaultdict(list)
        for p, row, g, q in zip(factors, buf.unbind(0), g_sigma.to(dtype).unbind(0), pos):
            state = self.state[p]
            if "sigma_exp_avg" not in state:
                state["sigma_exp_avg"] = torch.zeros_like(row)
                state["sigma_exp_avg_sq"] = torch.zeros_like(row)
            if group["amsgrad"] and "sigma_max_exp_avg_sq" not in state:
                state["sigma_max_exp_avg_sq"] = torch.zeros_like(row)
            sub["params"].append(row)
            sub["grads"].append(g)
            sub["exp_avgs"].append(state["sigma_exp_avg"])
            sub["exp_avg_sqs"].append(state["sigma_exp_avg_sq"])
            if group["amsgrad"]:
                sub["max_exp_avg_sqs"].append(state["sigma_max_exp_avg_sq"])
            sub["state_steps"].append(lists["state_steps"][q].clone())
        self._adam({**group, "foreach": None, "fused": None}, sub,
                   lr=group["lr"] * group["sigma_lr_ratio"], weight_decay=0.0)
        return buf.to(g_sigma.dtype)
