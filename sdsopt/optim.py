"""``SDSAdamW``: AdamW for LoRA pairs in the coordinates of their orthonormal bases (docs/math.md §2), and the
comparison modes of §3.

The class validates, pairs, holds state and orchestrates; each mode is one object of :mod:`sdsopt.modes` (what it
does before and after Adam), over the geometry of :mod:`sdsopt.coordinates` (mode ``sds``), :mod:`sdsopt.rewrite`
(gradient rewrites) and :mod:`sdsopt.linalg`, and the Adam update itself is torch's functional
``torch.optim.adam.adam(..., decoupled_weight_decay=True)`` — the very kernel behind
``torch.optim.AdamW`` — so foreach/fused kernels and AdamW's exact semantics are inherited, and
parameters outside LoRA pairs follow ``torch.optim.AdamW`` bit for bit (MATH P7).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import Optimizer

from . import compiled, naming
from . import pairing as _pairing
from .capture import LoraCapture
from .checkpoint import check_state_dict
from .distributed import (
    check_not_deepspeed,
    check_pair_layout,
    is_dtensor,
    local,
    local_grad,
    process_group,
    reduce_parts,
)
from .fused import Tables
from .guard import SkipLog, nonfinite_flags
from .modes import Bucket, Coordinates, StepContext, mode_of
from .pairing import LoraPair, PairingFn, a_rows, check_pair_shapes, param_label
from .rewrite import MODE_ROUTES, MODES, ROUTES, SPECTRAL_MODES

__all__ = ["PairingNotice", "SDSAdamW"]


class PairingNotice(UserWarning):
    """What ``SDSAdamW`` paired when it named parameters given without names (``infer_names``): said once per
    optimizer.  Filter it like any warning: ``warnings.filterwarnings("ignore", category=PairingNotice)``."""

_LINALG_DTYPES = (None, torch.float32, torch.float64)


_YAML_HINT = " (YAML reads 1e-8 as a string: write 1.0e-8, or convert with float())"
_REALS = ("eps", "weight_decay", "step_damping", "damping", "sigma_lr_ratio")
_BOOLS = ("amsgrad", "maximize", "decouple_sigma", "resplit", "rebalance")
_INTS = ("warmup_steps", "coordinate_ramp", "oracle_max_numel")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming an option of the wrong type (a string from a config file, a bool for a
    number...) before any comparison can raise a bare ``TypeError``."""
    def fail(key: str, value: Any, want: str) -> None:
        hint = _YAML_HINT if isinstance(value, str) and want.startswith("a number") else ""
        raise ValueError(f"SDSAdamW {where}: {key}={value!r} must be {want}, got {type(value).__name__}{hint}.")

    for key in _REALS:
        if not _is_real(group[key]):
            fail(key, group[key], "a number")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_is_real, betas))):
        fail("betas", betas, "a number pair such as (0.9, 0.999)")
    if group["rank_tol"] is not None and not _is_real(group["rank_tol"]):
        fail("rank_tol", group["rank_tol"], "a number or None")
    for key in _BOOLS:
        if not isinstance(group[key], bool):
            fail(key, group[key], "True or False")
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            fail(key, group[key], "True, False or None")
    for key in _INTS:
        if not isinstance(group[key], int) or isinstance(group[key], bool):
            fail(key, group[key], "an int")
    for key in ("mode", "route"):
        if not isinstance(group[key], str):
            fail(key, group[key], "a string")


def _check_hyperparameters(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the offending option (``where``: 'defaults' or 'param group i')."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"SDSAdamW {where}: a Tensor lr must be one floating-point number, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}.")
        if not group["fused"]:
            raise ValueError(f"SDSAdamW {where}: a Tensor lr needs fused=True (as torch.optim.AdamW's fused or "
                             "capturable kernels, which read it on the device); pass fused=True or a float lr.")
        lr = float(lr)  # checked once here (a read on the host); the steps never read it
    elif not _is_real(lr):
        raise ValueError(f"SDSAdamW {where}: lr={lr!r} must be a float or a one-element Tensor, got "
                         f"{type(lr).__name__}{_YAML_HINT if isinstance(lr, str) else ''}.")
    _check_types(group, where)
    checks = [
        (lr >= 0.0, f"lr={lr} must be >= 0"),
        (group["eps"] >= 0.0, f"eps={group['eps']} must be >= 0"),
        (group["weight_decay"] >= 0.0, f"weight_decay={group['weight_decay']} must be >= 0"),
        (len(group["betas"]) == 2 and all(0.0 <= b < 1.0 for b in group["betas"]),
         f"betas={group['betas']} must be two numbers in [0, 1)"),
        (group["mode"] != "lorsum", "mode='lorsum' is gone since 0.2: LoRSum / PSI-LoRA replaces the factors by "
         "proximal ALS instead of feeding Adam, so it is its own optimizer: sdsopt.PSILoRA(model, lr=..., "
         "lookahead_iters=..., lmbd=...)"),
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
        (group["warmup_steps"] >= 0, f"warmup_steps={group['warmup_steps']!r} must be an int >= 0"),
        (group["coordinate_ramp"] >= 0, f"coordinate_ramp={group['coordinate_ramp']!r} must be an int >= 0"),
        (group["step_damping"] >= 0.0, f"step_damping={group['step_damping']} must be >= 0"),
        (group["oracle_max_numel"] > 0, f"oracle_max_numel={group['oracle_max_numel']!r} must be a positive int"),
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
            (same defaults).  ``fused=True`` on CUDA steps the LoRA pairs by Triton kernels
            (:mod:`sdsopt.fused`), and ``lr`` may then be a one-element Tensor (on the device: a schedule
            that ``fill_``\ s it reaches a step captured in a CUDA graph); the σ channel reads it on the host.
        mode: ``"sds"`` (default, above), ``"sds_polar"`` (sdsopt 0.1's ``sds``: a one-sided rewrite
            ``g̃B = gB (AAᵀ)^{-1/2}``, ``g̃A = (BᵀB)^{-1/2} gA`` with Adam on the plain factors),
            ``"lora"`` (identity: plain AdamW on the factors), ``"scaled"``
            (``gB (K_A + δI)^{-1}``, ``(K_B + δI)^{-1} gA``; Zhang & Pilanci 2024) or ``"svd_oracle"``
            (Adam on the full ``W = BA`` with the true ``G``, then the best rank-r re-factorisation;
            needs ``m·n ≤ oracle_max_numel`` and the layers' inputs: call :meth:`attach` with the model
            once).  LoRSum / PSI-LoRA, 0.2's ``"lorsum"``, is the optimizer :class:`sdsopt.PSILoRA`.
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
        damping: δ of mode ``"scaled"`` (absolute, > 0).
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
            step needs a host decision: pairs in ``sds``'s warm-up, ``decouple_sigma``, ``svd_oracle``.  Otherwise (CPU, foreach, those cases) the flag is read on the
            host.  Under FSDP2 the flag is summed over each shard group (one all-reduce of one number
            per group and step while the guard is on), so all ranks skip together.
        pairing: how names become pairs: ``None`` (PEFT/loralib ``lora_A``/``lora_B``, torchtune
            ``lora_a``/``lora_b``, kohya/LyCORIS ``lora_down``/``lora_up``), a regex with a named group
            ``factor`` listing two values, A's first (``r"\.lora_(?P<factor>down|up)\."``; see
            :func:`sdsopt.pairing.regex_pairing`), or a function ``names -> [(name_A, name_B), ...]``.
        infer_names: parameters given without names (``model.parameters()``, unnamed param groups) are
            named as their outermost live ``nn.Module`` names them (:mod:`sdsopt.naming`), so they pair as
            ``named_parameters()`` would, and a :class:`sdsopt.PairingNotice` says once what was paired.
            ``False``: unnamed parameters pair only through explicit ``lora_pairs``.

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
        oracle_max_numel: int = 2**24,
        linalg_dtype: torch.dtype | None = None,
        pairing: str | PairingFn | None = None,
        infer_names: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"SDSAdamW: skip_nonfinite={skip_nonfinite!r} must be True or False.")
        if not isinstance(infer_names, bool):
            raise ValueError(f"SDSAdamW: infer_names={infer_names!r} must be True or False.")
        self.skip_nonfinite = skip_nonfinite
        self._skips = SkipLog()
        self._infer_names = infer_names
        self._names: dict[int, list[str]] = {}  # per group: names found for a group given without them
        self._merged_names: set[str] = set()  # loralib MergedLinear factors left to AdamW (warned once)
        self._live_names: dict[int, str] | None = None  # naming.live_names() while __init__ adds the groups
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad,
            mode=mode, warmup_steps=warmup_steps, coordinate_ramp=coordinate_ramp, resplit=resplit,
            rebalance=rebalance, step_damping=step_damping,
            decouple_sigma=decouple_sigma, sigma_lr_ratio=sigma_lr_ratio, route=route,
            rank_tol=rank_tol, damping=damping, oracle_max_numel=oracle_max_numel,
            linalg_dtype=linalg_dtype, maximize=maximize,
            foreach=foreach, fused=fused,
        )
        _check_hyperparameters(defaults, "defaults")
        self._pairing: PairingFn = _pairing.resolve_pairing(pairing)
        if isinstance(params, torch.nn.Module):  # e.g. Trainer(optimizer_cls_and_kwargs=(SDSAdamW, {"model": model}))
            params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        self._fresh_caches()
        self._group_sizes: list[int] = []
        self._capture: LoraCapture | None = None
        super().__init__(params, defaults)
        self._live_names = None
        self._report_pairing()

    def _fresh_caches(self) -> None:
        """The per-instance caches, rebuilt lazily (they hold data pointers, lists and device tables of this
        instance's tensors), and the handle of the compiled step: new for every instance, copies included."""
        self._bucket_cache: dict[Any, tuple[Any, ...]] = {}
        self._tables = Tables()  # the fused kernels' entry tables (sdsopt.fused)
        self._settled: dict[int, tuple[int, int]] = {}  # mode sds: groups past every pair's warm-up and ramp
        self._param_kinds: dict[int, list[tuple[bool, bool]]] = {}  # per group: (complex, DTensor) per parameter
        self._lists_cache: dict[int, tuple[Any, ...]] = {}  # per group: the last step's lists (_init_group)
        self._handle = compiled.register(self)  # the traced step's reference to this optimizer (torch.compile)

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickling: ``Optimizer``'s state (defaults, state, param groups) and this
        optimizer's own settings (``skip_nonfinite`` and its count, pairing rule, group sizes).  Not the caches
        (:meth:`_fresh_caches`) and not :meth:`attach`'s hooks, which belong to the original's model: call
        ``attach`` on the copy's model (mode ``svd_oracle`` says so if it is missing)."""
        self._skips.poll(wait=True)  # (settles the skip count of sync-free steps still in flight)
        return {**super().__getstate__(), "skip_nonfinite": self.skip_nonfinite, "_skips": self._skips,
                "_pairing": self._pairing, "_group_sizes": self._group_sizes, "_infer_names": self._infer_names,
                "_names": self._names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._capture = None
        self._live_names = None
        self._fresh_caches()

    # ------------------------------------------------------------------ pairing
    def _report_pairing(self) -> None:
        """The construction's one message about pairing: lone factors, names found, or no pair at all."""
        names = [n for gi in range(len(self.param_groups)) for n in self._group_names(gi) or []]
        if self._pairing is _pairing.default_pairing:
            lone = [n for n in _pairing.lone_factors(names, [(p.name_a, p.name_b) for p in self.lora_pairs])
                    if n not in self._merged_names]
            if lone:
                warnings.warn(
                    f"SDSAdamW: {len(lone)} LoRA factor(s) without their partner get plain AdamW "
                    f"(first: {lone[0]!r}). Pass both factors to the optimizer to rewrite them.",
                    UserWarning, stacklevel=3,
                )
        if self._names and self.lora_pairs:
            pairs = [(p.name_a, p.name_b) for p in self.lora_pairs]
            rule = (_pairing.default_pairing.describe(pairs) if self._pairing is _pairing.default_pairing
                    else "the pairing= rule")
            warnings.warn(
                f"SDSAdamW: the parameters came without names; named them from their module and paired "
                f"{len(pairs)} LoRA pair(s) by name ({rule}; first: {pairs[0][0]!r} / {pairs[0][1]!r}). "
                "infer_names=False turns this off.", PairingNotice, stacklevel=3)
        if not self.lora_pairs:
            named = any("param_names" in g for g in self.param_groups) or bool(self._names)
            warnings.warn(
                "SDSAdamW found no LoRA pairs, so it behaves exactly as torch.optim.AdamW. "
                + ("No parameter name matched the pairing rule; pass pairing=... for custom names "
                   if named else "The parameters came without names and no module holds them: pass "
                   "model.named_parameters() ")
                + "or give explicit pairs: [{'params': [...], 'lora_pairs': [(A, B), ...]}].",
                UserWarning,
                stacklevel=3,
            )

    def _group_names(self, gi: int) -> list[str] | None:
        """The names of group ``gi``'s parameters: given, or found by ``infer_names``; ``None`` if neither."""
        return self.param_groups[gi].get("param_names") or self._names.get(gi)

    def _find_names(self, gi: int, params: list[Tensor]) -> None:
        """Name an unnamed group from the live modules (:func:`sdsopt.naming.find_names`) when every one of its
        parameters has a name there."""
        if self._live_names is None or any(id(p) not in self._live_names for p in params):
            self._live_names = naming.live_names()
        names = naming.find_names(params, self._live_names)
        if params and all(n is not None for n in names):
            self._names[gi] = names

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
            if "param_names" not in group and self._infer_names:
                self._find_names(gi, group["params"])
            group["lora_pairs"] = self._resolve_pairs(gi, group, explicit)
        except Exception:
            self.param_groups.pop()
            self._names.pop(gi, None)
            raise
        self._group_sizes.append(len(group["params"]))

    def _resolve_pairs(self, gi: int, group: dict[str, Any], explicit: list[Any]) -> list[tuple[int, int]]:
        params: list[Tensor] = group["params"]
        for i, p in enumerate(params):
            check_not_deepspeed(p, param_label(group, i, gi))
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

        names = self._group_names(gi)
        if names:
            index = {n: i for i, n in enumerate(names)}
            explicit_pairs = set(pairs)  # a pair given explicitly and found by name again counts once
            for a, b in self._pairing(names):
                if self._merged(params[index[a]], params[index[b]], a, b):
                    self._merged_names.update((a, b))
                elif (index[a], index[b]) not in explicit_pairs:
                    pairs.append((index[a], index[b]))
            self._check_not_split(gi, names)

        seen: dict[int, int] = {}
        for k, (ia, ib) in enumerate(pairs):
            for i in (ia, ib):
                if i in seen or ia == ib:
                    raise ValueError(
                        f"param group {gi}: {param_label(group, i, gi)} is in more than one LoRA pair; "
                        "each factor may belong to one pair only (check explicit lora_pairs and the pairing rule)."
                    )
                seen[i] = k
            label_a, label_b = self._label(gi, ia), self._label(gi, ib)
            m, n, r = check_pair_shapes(params[ia], params[ib], label_a, label_b)
            check_pair_layout(params[ia], params[ib], label_a, label_b)
            if r > m and r > n:
                warnings.warn(
                    f"SDSAdamW: LoRA pair {label_a} / {label_b} has rank r={r} above both its dimensions "
                    f"(m={m}, n={n}): A and B may be swapped (A is r×n, the input side; B is m×r). Pass pairs "
                    "as (A, B), or fix the pairing rule's order of values (A's first).", UserWarning, stacklevel=4)
        return pairs

    def _label(self, gi: int, index: int) -> str:
        """How errors name parameter ``index`` of group ``gi``: its given or found name, or its position."""
        names = self._group_names(gi)
        return repr(names[index]) if names else param_label(self.param_groups[gi], index, gi)

    @staticmethod
    def _merged(A: Tensor, B: Tensor, name_a: str, name_b: str) -> bool:
        """Whether a named pair has loralib ``MergedLinear``'s layout (k pairs stacked in each tensor): such a
        pair is left to plain AdamW, with a warning that says so and how to get SDS for it."""
        k = _pairing.merged_layout(A, B)
        if k is not None:
            warnings.warn(
                f"SDSAdamW: {name_a!r} / {name_b!r} have loralib MergedLinear's layout ({k} LoRA pairs of rank "
                f"{B.shape[1]} stacked in each tensor, applied as a grouped convolution); SDSAdamW steps whole "
                "tensors as pairs, so these get plain AdamW. For SDS on them, adapt each projection with its own "
                "loralib.Linear (or PEFT LoRA).", UserWarning, stacklevel=5)
        return k is not None

    def _check_not_split(self, gi: int, names: list[str]) -> None:
        """Raise if the pairing rule pairs a name of group ``gi`` with a name of an earlier group."""
        owner = {n: j for j in range(gi) for n in self._group_names(j) or []}
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
                names = self._group_names(gi)
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
        self._settled.clear()
        self._lists_cache.clear()  # the state tensors are new objects
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("skipped_steps", None)
        self._skips.reset(skipped)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = "SDSAdamW.load_state_dict"
        moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        check_state_dict(where, state_dict, self.param_groups,
                         lambda gi, i, key: self.param_groups[gi]["params"][i].shape if key in moments else None)
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            if theirs.get("mode") == "sds" and "warmup_steps" not in theirs and state_dict["state"]:
                raise ValueError(
                    f"{where}: param group {gi} of the checkpoint was written by sdsopt 0.1, whose "
                    "mode 'sds' kept Adam moments of the plain factors. Since 0.2, 'sds' runs Adam in the bases' "
                    "coordinates and those moments do not apply. Resume with mode='sds_polar' (0.1's 'sds' under "
                    "its new name) and rewrite the checkpoint's param_groups[i]['mode'] to 'sds_polar', or start "
                    "the optimizer state afresh with mode='sds'."
                )
            if theirs.get("mode", mine["mode"]) != mine["mode"]:
                raise ValueError(
                    f"{where}: param group {gi} of the checkpoint ran mode={theirs['mode']!r}, this optimizer "
                    f"mode={mine['mode']!r}; its Adam moments are of other gradients (or other coordinates). "
                    f"Resume with mode={theirs['mode']!r}, or switch modes by loading only the model's "
                    "weights and starting the optimizer state afresh."
                )

    def attach(self, model: torch.nn.Module) -> LoraCapture:
        """Record the LoRA layers' inputs and output gradients (mode ``svd_oracle``).

        Returns the :class:`sdsopt.capture.LoraCapture`; ``capture.remove()`` detaches it.  The
        records are cleared after every :meth:`step`.
        """
        pairs = [(g["params"][ia], g["params"][ib]) for g in self.param_groups for ia, ib in g["lora_pairs"]]
        self._capture = LoraCapture(model, pairs)
        return self._capture

    # ------------------------------------------------------------------ step
    def _init_group(self, group: dict[str, Any], gi: int) -> tuple[dict[int, int], dict[str, list[Tensor]], bool]:
        """Collect params with grads and their AdamW state, as ``torch.optim.Adam._init_group`` does.

        The lists of a step whose parameters with gradients, ``amsgrad`` and ``fused`` are those of the previous
        step are that step's (state tensors are updated in place), with this step's gradients: the per-parameter
        loop runs only when that changes, on the first steps and after ``load_state_dict``.
        """
        if len(group["params"]) != self._group_sizes[gi]:
            raise RuntimeError(
                f"SDSAdamW: param group {gi} now holds {len(group['params'])} tensors instead of the "
                f"{self._group_sizes[gi]} it was built with, so its LoRA pairs are lost. A wrapper replaced the "
                "parameters (DeepSpeed ZeRO flattens them into partitions): SDSAdamW supports DDP and FSDP2, not ZeRO."
            )
        now = [p.grad for p in group["params"]]
        key = (tuple(g is not None for g in now), group["amsgrad"], group["fused"])
        cached = self._lists_cache.get(gi)
        if cached is not None and cached[0] == key:
            _, position, template, has_complex = cached
            grads = [now[i] for i in position]
            if not any(g.is_sparse for g in grads):
                lists: dict[str, list[Tensor]] = defaultdict(list, {k: list(v) for k, v in template.items()})
                lists["grads"] = grads
                return position, lists, has_complex
        position, lists, has_complex = self._collect(group, gi)
        if not any(sharded for _, sharded in self._param_kinds[gi]):  # (DTensor local views are per call)
            template = {k: list(v) for k, v in lists.items() if k != "grads"}
            self._lists_cache[gi] = (key, position, template, has_complex)
        return position, lists, has_complex

    def _collect(self, group: dict[str, Any], gi: int) -> tuple[dict[int, int], dict[str, list[Tensor]], bool]:
        """:meth:`_init_group`'s per-parameter loop (creates the state of parameters stepped the first time)."""
        lists: dict[str, list[Tensor]] = defaultdict(list)
        position: dict[int, int] = {}
        has_complex = False
        device_step = bool(group["fused"])  # torch keeps `step` on the device for fused kernels
        params, grads, exp_avgs, exp_avg_sqs, steps = (lists[k] for k in
                                                      ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"))
        amsgrad = group["amsgrad"]
        kinds = self._param_kinds.get(gi)
        if kinds is None or len(kinds) != len(group["params"]):  # per parameter: (complex, DTensor), fixed
            kinds = self._param_kinds[gi] = [(torch.is_complex(p), is_dtensor(p)) for p in group["params"]]
        for i, (p, (complex_p, sharded)) in enumerate(zip(group["params"], kinds)):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"SDSAdamW: {param_label(group, i, gi)} has a sparse gradient; SDSAdamW (like AdamW) "
                    "needs dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            has_complex |= complex_p
            state = self.state[p]
            if "step" not in state:  # (mode sds may have put the pair's warm-up count there)
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if device_step
                    else torch.tensor(0.0, dtype=torch.float32)
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            position[i] = len(params)
            if sharded:  # FSDP2 shards: the update is elementwise, so Adam runs on the local shards
                params.append(local(p))
                grads.append(local_grad(p, param_label(group, i, gi)))
                exp_avgs.append(local(state["exp_avg"]))
                exp_avg_sqs.append(local(state["exp_avg_sq"]))
                if amsgrad:
                    lists["max_exp_avg_sqs"].append(local(state["max_exp_avg_sq"]))
            else:
                params.append(p)
                grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if amsgrad:
                    lists["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
            steps.append(state["step"])
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SDS-AdamW step: rewrite the paired gradients, then the AdamW update (closure as in AdamW).

        Under ``torch.compile`` the step is one custom operator in the graph (:mod:`sdsopt.compiled`: no graph
        break, ``fullgraph=True`` works), whose implementation is this eager step: its host logic (pairing,
        buckets, warm-up counts, the kernels' tables) does not trace, and need not.
        """
        if torch.compiler.is_compiling():
            return compiled.step(self, closure)
        return self._step(closure)

    def _step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """The eager step (:meth:`step`)."""
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
            after = mode_of(group).before(StepContext(self, gi, group, position, lists, found_inf))
            if lists["params"]:  # (mode sds has stepped its coordinate pairs itself, bucket by bucket)
                self._adam(group, lists, lr=group["lr"], weight_decay=group["weight_decay"],
                           has_complex=has_complex, found_inf=found_inf)
            after()
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
            return param_label(self.param_groups[gi], i, gi)

        bad = nonfinite_flags(grads)
        found = bad.any().to(torch.float32)
        sharded = {pg: torch.stack([bad[j] for j, g in enumerate(groups_of) if g is pg]).any().to(torch.float32)
                   .reshape(1) for pg in {g for g in groups_of if g is not None}}
        for flag in reduce_parts(sharded, lambda pg: (pg, torch.float32, bad.device)).values():
            found = torch.maximum(found, (flag > 0).to(torch.float32).reshape(()))
        host_decisions = any(not group["fused"] or mode_of(group).host_decision(self, group)
                             for _, group, _, lists, _ in prepared if lists["params"])
        if not host_decisions and all(g.is_cuda for g in grads):
            self._skips.poll()
            self._skips.skipped_on_device(found, bad, label)
            return False, found
        if not found.item():
            return False, None
        self._skips.skipped_on_host(label(int(torch.argmax(bad.to(torch.uint8)))) if bad.any()
                                    else "a parameter on another rank")
        return True, None

    def _buckets(self, gi: int, group: dict[str, Any], position: dict[int, int]) -> list[Bucket]:
        """Pairs with a gradient, grouped into buckets of equal shapes, dtypes, device, grad presence
        and (mode ``sds``) phase: warm-up or coordinates.

        Cached per group: recomputed only when which factors have gradients, or a pair's phase, changes.
        """
        pairs = group["lora_pairs"]
        sds = group["mode"] == "sds"
        if sds and Coordinates.settled(self, group):  # every pair in coordinates: no per-pair state lookups
            key = tuple((ia in position, ib in position, True) for ia, ib in pairs)
        else:
            key = tuple((ia in position, ib in position, sds and Coordinates.in_coordinates(self, group, ia))
                        for ia, ib in pairs)
        cached = self._bucket_cache.get(gi)
        if cached is not None and cached[0] == key and cached[1] is pairs:
            return cached[2]
        params: list[Tensor] = group["params"]
        found: dict[tuple[Any, ...], Bucket] = {}
        for (ia, ib), (has_a, has_b, coordinates) in zip(pairs, key):
            if not (has_a or has_b):
                continue
            A, B = params[ia], params[ib]
            k = (A.shape, B.shape, A.dtype, B.dtype, A.device, has_a, has_b, coordinates)
            bucket = found.setdefault(k, Bucket(a_shape=A.shape, b_shape=B.shape, has_a=has_a, has_b=has_b,
                                                 coordinates=coordinates))
            bucket.a.append(ia)
            bucket.b.append(ib)
        buckets = list(found.values())
        self._bucket_cache[gi] = (key, pairs, buckets)
        return buckets
