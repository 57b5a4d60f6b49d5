"""``PSILoRA``: LoRSum / PSI-LoRA (arXiv 2602.16456) as its authors compute it — the factors are *replaced* by the
proximal rank-r solution of a full-weight step, found by alternating least squares; no Adam on the factors.

For a LoRA pair ``ΔW = B·A`` (``A`` r×n, ``B`` m×r) with full gradient ``G = ∂L/∂(BA)`` (applied to vectors from
the layers' recorded inputs and output gradients, :class:`sdsopt.capture.LoraCapture`, never formed) and a
low-rank momentum ``M = U_M V_M`` (rank ``q = rank_multiplier·r``, kept as factors), one step is

    D  = (1 − dampening)·G + momentum·M            (SGD-with-momentum direction, torch's convention)
    W̄  = B A − lr·D
    (A, B) ← argmin ‖B'A' − W̄‖² + λ(‖A' − A‖² + ‖B' − B‖²),   λ = lr·lmbd       (proximal_als)
    (V_M, U_M) ← the same problem for the target ``momentum·M + (1 − dampening)·G``, proximal to ``M``

(docs/math.md §6).  ``dampening = momentum`` gives the EMA form ``W̄ = BA − lr(1−β)G − lr·β·M``.  Parameters that are
not LoRA factors get torch's AdamW (``betas``, ``eps``, ``weight_decay``).

``G`` is only ever applied to vectors (:class:`RowGradient`): ``G V = δᵀ(X V)``, ``Gᵀ U = Xᵀ(δ U)`` over the recorded
rows, under DDP summed over ranks (one all-reduce per half-sweep of the products of a bucket of equal-shaped pairs)
and divided by the world size as DDP averages gradients, so a multi-process step equals the single-process step on
the global batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer

from . import pairing as _pairing
from .adam import adamw
from .capture import LoraCapture
from .checkpoint import check_state_dict
from .distributed import is_dtensor
from .linalg import algebra_precision
from .pairing import PairingFn, check_pair_shapes

__all__ = ["PSILoRA", "RowGradient", "proximal_als"]

MatMul = Callable[[Tensor], Tensor]


def _solve_left(K: Tensor, lam: float, rhs: Tensor) -> Tensor:
    """``(K + λI)^{-1} rhs`` for Grams ``K`` (``[..., r, r]``, λ > 0: positive definite) by batched Cholesky.

    The diagonal shift is ``max(λ, r·ε·tr K)`` (ε the dtype's machine epsilon): a rounded Gram of a
    (near-)rank-deficient factor can have eigenvalues down to ``−ε‖K‖``, and a smaller λ (float32, a tiny
    lr·lmbd) would fail to factor although everything is finite; below that floor the solve is rounding noise
    anyway (in float64 the floor is ~1e-15·r·tr K, below any λ of practical use).  Only a non-finite ``K`` (factors that
    already overflowed: a diverging lr) still fails; the result is then NaN, as AdamW's parameters would be,
    instead of an exception (and without a host sync)."""
    r = K.shape[-1]
    eye = torch.eye(r, dtype=K.dtype, device=K.device)
    floor = K.diagonal(dim1=-2, dim2=-1).sum(-1) * (r * torch.finfo(K.dtype).eps)
    L, info = torch.linalg.cholesky_ex(K + torch.clamp(floor, min=lam)[..., None, None] * eye)
    return torch.where((info == 0)[..., None, None], torch.cholesky_solve(rhs, L), torch.nan)


def proximal_als(A: Tensor, B: Tensor, W_mul: MatMul, Wt_mul: MatMul, lam: float, sweeps: int,
                 metric: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Rank-r factors ``(A', B')`` near ``W̄`` and proximal to ``(A, B)`` (docs/math.md (6.1), PSI-LoRA's ``low_rank_sum``):

        min ‖B'A' − W̄‖²_F + λ(‖A' − A‖²_F + ‖B' − B‖²_F)

    given only the products ``W_mul(V) = W̄ V`` (V: n×k) and ``Wt_mul(U) = W̄ᵀ U`` (U: m×k).  Batched: ``A``
    ``[..., r, n]``, ``B`` ``[..., m, r]``, the products and the metric with the same leading dimensions (a bucket
    of pairs of one shape is one call).  The half-sweeps are

        A' = (B_tᵀ B_t + λI)^{-1} (B_tᵀ W̄ + λA)          B' = (W̄ A_tᵀ + λB)(A_t A_tᵀ + λI)^{-1}

    ``sweeps = K ≥ 1``: K Gauss–Seidel sweeps, ``A`` first (``start_turn='in'``), each half-sweep using the other
    factor's newest value.  ``sweeps = 0``: one Jacobi pass, both halves from ``(A, B)``; for
    ``W̄ = BA − lr·G`` it is exactly Riemannian-preconditioned gradient descent, ``A − lr(BᵀB + λI)^{-1}BᵀG``
    (mode ``scaled`` with ``δ = λ``).  (The authors' code returns its inputs unchanged when ``lookahead_iters=0``;
    this is the pass it intends.)  ``λ > 0`` keeps every solve positive definite, also at LoRA's ``B = 0``.

    ``metric = (s_in, s_out)`` (positive n- and m-vectors, ``S = diag(s)``): the same problem in the metric
    norm, ``min ‖S_out^{1/2}(B'A' − W̄)S_in^{1/2}‖² + λ(‖(A' − A)S_in^{1/2}‖² + ‖S_out^{1/2}(B' − B)‖²)``
    (PSI-LoRA's ``scaled_low_rank_sum``), whose half-sweeps are

        A' = (B_tᵀ S_out B_t + λI)^{-1} (B_tᵀ S_out W̄ + λA)     B' = (W̄ S_in A_tᵀ + λB)(A_t S_in A_tᵀ + λI)^{-1}
    """
    if lam <= 0:
        raise ValueError(f"proximal_als: λ={lam} must be > 0 (it keeps the r×r solves positive definite)")

    s_in, s_out = metric if metric is not None else (None, None)

    def update_a(B_t: Tensor) -> Tensor:
        SB = B_t if s_out is None else s_out[..., :, None] * B_t
        return _solve_left(SB.mT @ B_t, lam, Wt_mul(SB).mT + lam * A)

    def update_b(A_t: Tensor) -> Tensor:
        AS = A_t if s_in is None else A_t * s_in[..., None, :]
        return _solve_left(AS @ A_t.mT, lam, W_mul(AS.mT).mT + lam * B.mT).mT

    if sweeps == 0:
        return update_a(B), update_b(A)
    A_t, B_t = A, B
    for _ in range(sweeps):
        A_t = update_a(B_t)
        B_t = update_b(A_t)
    return A_t, B_t


class RowGradient:
    """The full gradients ``G_i = c·w·Σ_ranks Σ_rows δ_iᵀX_i`` of a bucket of ``k`` LoRA pairs of one shape, applied
    to stacked vectors without being formed.

    ``rows[i]``: pair ``i``'s recorded ``(X, δ)`` of every micro-batch on this rank (``X``: N×n inputs of
    ``lora_A``, ``δ``: N×m gradients at the output of ``lora_B``; none on a rank that did not run the layer),
    converted to ``dtype`` product by product (bf16 rows are never all copied to float32 at once);
    ``w = 1/world`` (DDP averages gradients; 1 in one process); ``c`` the clipping coefficient (:meth:`scale_`,
    a tensor: no host sync).  Every product of the bucket is one all-reduce of the stacked result over ``group``
    (``None``: one process, none).
    """

    def __init__(self, rows: list[list[tuple[Tensor, Tensor]]], shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, group=None, world: int = 1) -> None:
        self.rows, self.shape, self.dtype, self.device = rows, shape, dtype, device
        self.group, self.world = group, world
        self.scale: Tensor | float = 1.0 / world

    def _apply(self, V: Tensor, transpose: bool) -> Tensor:
        dt, out_dim = self.dtype, self.shape[1] if transpose else self.shape[0]
        outs = []
        for parts, v in zip(self.rows, V.unbind(0)):
            if transpose:
                terms = [x.to(dt).T @ (g.to(dt) @ v) for x, g in parts]
            else:
                terms = [g.to(dt).T @ (x.to(dt) @ v) for x, g in parts]
            outs.append(sum(terms[1:], terms[0]) if terms else v.new_zeros(out_dim, v.shape[-1]))
        out = torch.stack(outs)
        if self.group is not None:
            torch.distributed.all_reduce(out, group=self.group)
        return out * self.scale

    def __call__(self, V: Tensor) -> Tensor:
        """``G_i V_i`` (``[k, m, c]``) for ``V`` (``[k, n, c]``)."""
        return self._apply(V, transpose=False)

    def t(self, U: Tensor) -> Tensor:
        """``G_iᵀ U_i`` (``[k, n, c]``) for ``U`` (``[k, m, c]``)."""
        return self._apply(U, transpose=True)

    def scale_(self, coef: Tensor) -> None:
        """Multiply every ``G_i`` by ``coef`` (gradient clipping)."""
        self.scale = self.scale * coef

    def sq_norms(self) -> Tensor:
        """``‖G_i‖²_F`` (``[k]``) before clipping.  One process: ``⟨XXᵀ, δδᵀ⟩`` (O(N²(m+n)), PSI-LoRA's formula)
        when ``N(m+n) < mn``, else ``‖δᵀX‖²`` formed (O(Nmn)).  Under DDP the cross-rank terms need the whole
        sum: ``δᵀX`` is formed and all-reduced pair by pair (m·n numbers per pair: what full fine-tuning's DDP
        moves per step)."""
        (m, n), dt, norms = self.shape, self.dtype, []
        for parts in self.rows:
            X = torch.cat([x for x, _ in parts]).to(dt) if parts else torch.zeros(0, n, dtype=dt, device=self.device)
            delta = torch.cat([g for _, g in parts]).to(dt) if parts else X.new_zeros(0, m)
            if self.group is None and X.shape[0] * (m + n) < m * n:
                norms.append(((X @ X.T) * (delta @ delta.T)).sum())
                continue
            full = delta.T @ X
            if self.group is not None:
                torch.distributed.all_reduce(full, group=self.group)
            norms.append(full.square().sum())
        return torch.stack(norms) / self.world**2


class PSILoRA(Optimizer):
    r"""PSI-LoRA: each LoRA pair is replaced, every step, by the proximal rank-r solution of a full-weight
    SGD(-momentum) step (:func:`proximal_als`); other trainable parameters get torch's AdamW.

    Args:
        model: the model; its trainable parameters are optimised, LoRA pairs found by name (``pairing``) and
            their layers' inputs and output gradients recorded by hooks from construction on.  Only
            ``nn.Linear`` LoRA factors (PEFT's Linear LoRA) are supported.
        lr: step size of the full-weight SGD step (PSI-LoRA's lrs are SGD-sized: 0.1 on its linear task).
        lookahead_iters: ALS sweeps K per step (authors' default 1); 0 = one Jacobi pass (= ``scaled`` GD).
        lmbd: proximal weight relative to ``lr``: ``λ = lr·lmbd`` (authors' default 1e-2); > 0.
        momentum, dampening: the low-rank momentum (torch SGD convention; default 0 = none).  The momentum
            factors start at ``U_M = 0`` and a Gaussian ``V_M`` (seeded per pair) as the authors', so the first
            ALS half-sweep has a basis to project on.
        rank_multiplier: momentum rank ``q = round(rank_multiplier·r)``.
        metric: ``"none"`` (Euclidean) or ``"diagonal"`` (the authors' ``ScaledOPLoraOptimizer`` default, a
            diagonal K-FAC metric): running averages (``metric_beta``, bias-corrected) of the squared layer
            inputs per input feature (``s_in``, n) and of the squared output gradients per output (``s_out``, m),
            plus ``damping``, raised to ``metric_power`` (``s = (avg + damping)^p``, the authors' order: damping
            inside the power bounds ``S^{-1}`` by ``damping^{-p}`` ≈ 316, not ``1/damping`` = 1e5); the full step
            becomes ``S_out^{-1} D S_in^{-1}`` and the ALS runs in the metric's norm (:func:`proximal_als` with
            ``metric``).  Values of the authors' GLUE scripts: power 0.5, damping 1e-5, β 0.99.  With momentum
            the metric preconditions the whole direction ``D`` and the momentum factors stay an (Euclidean)
            running average of ``G``, as the authors' code does.
        max_grad_norm: clip the *full* gradient (every pair's ``G`` and the other parameters' gradients) to this
            norm, ``c = min(1, max_grad_norm / (‖g‖ + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` (the factors'
            own gradients are not what PSI-LoRA steps on, so clipping them outside would clip the wrong thing).
            ``‖G‖`` comes from the recorded rows (:meth:`RowGradient.sq_norms`); the norm before clipping is kept
            in :attr:`last_grad_norm` (a tensor, no host sync).  ``None``: no clipping.
        adam_lr, betas, eps, weight_decay: AdamW's, for parameters that are not LoRA factors (a classifier
            head, biases); ``adam_lr=None`` uses ``lr``.
        pairing: as :class:`sdsopt.SDSAdamW`'s.
        linalg_dtype: dtype of the factor algebra (default: float32, or float64 for float64 factors).
        process_group: data-parallel group (DDP); default: the default group when ``torch.distributed`` is
            initialised with more than one rank. Every rank must hold the same model (replicated, not FSDP2 shards)
            and the step equals the single-process step on the global batch: ``G``'s products are summed over ranks
            and divided by the world size (DDP's gradient averaging), the metric's averages are over all ranks'
            rows. Cost per step, per bucket of ``k`` equal-shaped pairs: one all-reduce of ``k·r×m`` or ``k·r×n``
            numbers per half-sweep (``2K`` of them, ``K = lookahead_iters`` or 1; twice that with momentum), one of
            ``k(m + n + 1)`` for the metric; per pair one of ``m×n`` for ``max_grad_norm``; plus one all-reduce per
            step of a flag per pair, so that a pair recorded on some ranks only is stepped everywhere (the others
            add zero rows). DDP still all-reduces the factors' ``.grad``, which PSI-LoRA does not read.

    Design choices: the diagonal metric's running averages are bias-corrected like Adam's (the authors' start from
    zero without), so the first steps are not inflated by ``1/(1−β)``; there is no weight decay on the factors (the
    proximal term plays its part); the factors' ``.grad`` is not read (the step uses ``G`` from the recorded rows,
    which also covers gradient accumulation: the rows of every micro-batch are summed); a pair whose layer recorded
    no forward/backward since the last step (on any rank) is left unchanged; ``lr = 0`` leaves every factor
    unchanged; the diagonal metric is estimated from the recorded rows before clipping (clipping bounds the step,
    not the curvature estimate; the authors' code clips the inputs in place first); activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) records the same rows as without it (tested). Not supported:
    FSDP2-sharded factors (refused at construction).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        lookahead_iters: int = 1,
        lmbd: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        rank_multiplier: float = 1.0,
        metric: str = "none",
        metric_power: float = 0.5,
        damping: float = 1e-5,
        metric_beta: float = 0.99,
        adam_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        pairing: str | PairingFn | None = None,
        linalg_dtype: torch.dtype | None = None,
        process_group: Any = None,
    ) -> None:
        checks = [
            (isinstance(model, nn.Module),
             "model must be the nn.Module holding the LoRA layers (its inputs are recorded)"),
            (isinstance(lr, (int, float)) and lr >= 0, f"lr={lr!r} must be a float >= 0"),
            (isinstance(lookahead_iters, int) and lookahead_iters >= 0,
             f"lookahead_iters={lookahead_iters!r} must be an int >= 0 (0: one Jacobi pass)"),
            (lmbd > 0, f"lmbd={lmbd} must be > 0 (λ = lr·lmbd keeps the r×r solves positive definite)"),
            (0 <= momentum < 1 and 0 <= dampening <= 1,
             f"momentum={momentum} must be in [0, 1), dampening={dampening} in [0, 1]"),
            (rank_multiplier > 0, f"rank_multiplier={rank_multiplier} must be > 0"),
            (len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas={betas} must be two numbers in [0, 1)"),
            (eps >= 0 and weight_decay >= 0, f"eps={eps} and weight_decay={weight_decay} must be >= 0"),
            (adam_lr is None or adam_lr >= 0, f"adam_lr={adam_lr!r} must be None or >= 0"),
            (metric in ("none", "diagonal"), f"metric={metric!r} is unknown; use 'none' or 'diagonal'"),
            (max_grad_norm is None or max_grad_norm > 0, f"max_grad_norm={max_grad_norm!r} must be None or > 0"),
            (metric_power > 0 and damping > 0 and 0 <= metric_beta < 1,
             f"metric_power={metric_power} and damping={damping} must be > 0, metric_beta={metric_beta} in [0, 1)"),
            (linalg_dtype in (None, torch.float32, torch.float64),
             f"linalg_dtype={linalg_dtype!r} must be None, torch.float32 or torch.float64"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PSILoRA: {message}.")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for name, p in named:
            if is_dtensor(p):
                raise ValueError(f"PSILoRA: {name!r} is a DTensor (FSDP2 shard); PSILoRA replaces whole factors from "
                                 "the layers' rows and supports replicated parameters only: use DDP, or SDSAdamW "
                                 "with FSDP2.")
        names = [n for n, _ in named]
        index = {n: i for i, n in enumerate(names)}
        pairs = [(index[a], index[b]) for a, b in _pairing.resolve_pairing(pairing)(names)]
        params = [p for _, p in named]
        for ia, ib in pairs:
            check_pair_shapes(params[ia], params[ib], repr(names[ia]), repr(names[ib]))
        defaults = dict(lr=lr, lookahead_iters=lookahead_iters, lmbd=lmbd, momentum=momentum, dampening=dampening,
                        rank_multiplier=rank_multiplier, metric=metric, metric_power=metric_power, damping=damping,
                        metric_beta=metric_beta, adam_lr=adam_lr, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, linalg_dtype=linalg_dtype, max_grad_norm=max_grad_norm)
        super().__init__([{"params": params, "param_names": names}], defaults)
        self.param_groups[0]["lora_pairs"] = pairs
        self._capture = LoraCapture(model, [(params[ia], params[ib]) for ia, ib in pairs])
        dist = torch.distributed
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self._world = dist.get_world_size(process_group) if process_group is not None else 1
        self._group = process_group if self._world > 1 else None
        self.last_grad_norm: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("PSILoRA takes the model's parameters at construction; it has one param group.")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, after checking that the checkpoint fits (same param group, LoRA pairs
        and parameter count; momentum factors, metric averages and AdamW moments of the parameters' shapes):
        ``ValueError`` naming the parameter and the fix, before anything is changed."""
        group = self.param_groups[0]
        params = group["params"]
        role = {ia: ("A", ib) for ia, ib in group["lora_pairs"]} | {ib: ("B", ia) for ia, ib in group["lora_pairs"]}
        saved = state_dict.get("param_groups", [{}])[0] if isinstance(state_dict, dict) else {}
        multiplier = saved.get("rank_multiplier", group["rank_multiplier"])  # the saved group's options apply

        def expected(gi: int, i: int, key: str) -> tuple[int, ...] | None:
            p = params[i]
            if key in ("exp_avg", "exp_avg_sq"):
                return tuple(p.shape)
            if i not in role or key not in ("psi_momentum", "psi_metric"):
                return None
            side, partner = role[i]
            A, B = (p, params[partner]) if side == "A" else (params[partner], p)
            q = max(1, round(A.shape[0] * multiplier))
            if key == "psi_momentum":
                return (q, A.shape[1]) if side == "A" else (B.shape[0], q)
            return (A.shape[1],) if side == "A" else (B.shape[0],)

        check_state_dict("PSILoRA.load_state_dict", state_dict, self.param_groups, expected)
        super().load_state_dict(state_dict)

    def _momentum_factors(self, A: Tensor, B: Tensor, k: int, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(V_M, U_M)`` of the pair, created at its first step: ``V_M`` Gaussian (seeded by the pair's index),
        ``U_M = 0``."""
        state = self.state[A]
        if "psi_momentum" not in state:
            q = max(1, round(A.shape[0] * self.param_groups[0]["rank_multiplier"]))
            gen = torch.Generator(device="cpu").manual_seed(k)
            state["psi_momentum"] = torch.randn(q, A.shape[1], generator=gen, dtype=dt).to(A.device)
            self.state[B]["psi_momentum"] = torch.zeros(B.shape[0], q, dtype=dt, device=B.device)
        return state["psi_momentum"], self.state[B]["psi_momentum"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One PSI-LoRA step on every recorded pair (after clipping, if asked), then AdamW on the other parameters.

        Pairs of equal shapes, dtype and device form a bucket whose ALS runs batched (:func:`proximal_als` on
        ``[k, r, n]`` / ``[k, m, r]`` stacks); only the row products loop over its pairs."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params: list[Tensor] = group["params"]
        pairs: list[tuple[int, int]] = group["lora_pairs"]
        for ia, ib in pairs:
            if not self._capture.has(params[ia]) and (params[ia].grad is not None or params[ib].grad is not None):
                raise RuntimeError(
                    f"PSILoRA: {group['param_names'][ia]!r} has a gradient but its layer's inputs were not "
                    "recorded: run the forward pass of the model given to PSILoRA (not a copy or a compiled "
                    "graph that bypasses module hooks) with gradients enabled.")
        buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for k, seen in enumerate(self._recorded(pairs)):
            if seen:
                A, B = params[pairs[k][0]], params[pairs[k][1]]
                buckets[(A.shape, B.shape, A.dtype, A.device)].append(k)
        in_pairs = {i for pair in pairs for i in pair}
        others = [p for i, p in enumerate(params) if i not in in_pairs and p.grad is not None]
        other_grads = [p.grad for p in others]
        grads = [(ks, self._row_gradient(ks)) for ks in buckets.values()]
        if group["max_grad_norm"] is not None:
            coef = self._clip_coefficient([G for _, G in grads], other_grads, group["max_grad_norm"])
            for _, G in grads:
                G.scale_(coef)
            other_grads = [g * coef.to(g.device, g.dtype) for g in other_grads]
        if group["lr"] != 0:
            for ks, G in grads:
                self._bucket_step(ks, G)
        self._capture.clear()
        self._adam_others(group, others, other_grads)
        return loss

    def _recorded(self, pairs: list[tuple[int, int]]) -> list[bool]:
        """Whether each pair's layer ran forward and backward since the last step, here or (DDP) on any rank."""
        params = self.param_groups[0]["params"]
        seen = [self._capture.has(params[ia]) for ia, _ in pairs]
        if self._group is None or not pairs:
            return seen
        flags = torch.tensor(seen, dtype=torch.float32, device=params[pairs[0][0]].device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return [bool(f) for f in flags.tolist()]

    def _row_gradient(self, ks: list[int]) -> RowGradient:
        """The :class:`RowGradient` of the bucket of pairs ``ks`` (equal shapes, dtype and device)."""
        group = self.param_groups[0]
        params, pairs = group["params"], group["lora_pairs"]
        A, B = params[pairs[ks[0]][0]], params[pairs[ks[0]][1]]
        dt, _ = algebra_precision(A.dtype, group["linalg_dtype"], None)
        rows = [self._capture.rows(params[pairs[k][0]], params[pairs[k][1]]) if self._capture.has(params[pairs[k][0]])
                else [] for k in ks]
        return RowGradient(rows, (B.shape[0], A.shape[1]), dt, A.device, self._group, self._world)

    def _clip_coefficient(self, grads: list[RowGradient], other_grads: list[Tensor], max_norm: float) -> Tensor:
        """``min(1, max_norm / (‖g‖ + 1e-6))`` for the full gradient ``g`` (every bucket's ``G``, the other
        parameters' gradients), as ``clip_grad_norm_``; ``‖g‖`` is kept in :attr:`last_grad_norm`."""
        device = self.param_groups[0]["params"][0].device
        parts = [G.sq_norms().to(torch.float64).sum().to(device) for G in grads]
        parts += [g.to(torch.float64).square().sum().to(device) for g in other_grads]
        total = torch.stack(parts).sum().sqrt() if parts else torch.zeros((), dtype=torch.float64, device=device)
        self.last_grad_norm = total
        return (max_norm / (total + 1e-6)).clamp(max=1.0)

    def _bucket_step(self, ks: list[int], G: RowGradient) -> None:
        """The step of the bucket of pairs ``ks``: one batched :func:`proximal_als` for the factors (and one for the
        momentum factors), written back with one ``_foreach_copy_`` each."""
        group = self.param_groups[0]
        params, pairs = group["params"], group["lora_pairs"]
        lr, beta, damp, K = group["lr"], group["momentum"], group["dampening"], group["lookahead_iters"]
        lam = lr * group["lmbd"]
        As = [params[pairs[k][0]] for k in ks]
        Bs = [params[pairs[k][1]] for k in ks]
        dt = G.dtype
        A0 = torch.stack([A.detach() for A in As]).to(dt)
        B0 = torch.stack([B.detach() for B in Bs]).to(dt)

        momentum = [self._momentum_factors(A, B, k, dt) for k, A, B in zip(ks, As, Bs)] if beta > 0 else []
        V_M = torch.stack([v for v, _ in momentum]) if momentum else None
        U_M = torch.stack([u for _, u in momentum]) if momentum else None

        def D(V: Tensor) -> Tensor:  # the direction (1 − d)·G + β·M applied to V
            out = (1 - damp) * G(V)
            return out if V_M is None else out + beta * (U_M @ (V_M @ V))

        def Dt(U: Tensor) -> Tensor:
            out = (1 - damp) * G.t(U)
            return out if V_M is None else out + beta * (V_M.mT @ (U_M.mT @ U))

        metric = self._metric(As, Bs, G) if group["metric"] == "diagonal" else None
        s_in, s_out = (1.0, 1.0) if metric is None else (metric[0][..., :, None], metric[1][..., :, None])
        # the full step S_out^{-1} D S_in^{-1} (S = I without the metric)
        A_new, B_new = proximal_als(A0, B0, lambda V: B0 @ (A0 @ V) - lr * D(V / s_in) / s_out,
                                    lambda U: A0.mT @ (B0.mT @ U) - lr * Dt(U / s_out) / s_in, lam, K, metric)
        if V_M is not None:  # momentum ← β·M + (1 − d)·G, proximal to M, warm-started at its factors
            V_new, U_new = proximal_als(V_M, U_M, lambda V: beta * (U_M @ (V_M @ V)) + (1 - damp) * G(V),
                                        lambda U: beta * (V_M.mT @ (U_M.mT @ U)) + (1 - damp) * G.t(U), lam, K)
            torch._foreach_copy_([v for v, _ in momentum] + [u for _, u in momentum],
                                 list(V_new.unbind(0)) + list(U_new.unbind(0)))
        torch._foreach_copy_(As + Bs, [t.to(p.dtype) for t, p in zip(list(A_new.unbind(0)) + list(B_new.unbind(0)),
                                                                     As + Bs)])

    def _metric(self, As: list[Tensor], Bs: list[Tensor], G: RowGradient) -> tuple[Tensor, Tensor]:
        """``(s_in, s_out)`` (``[k, n]``, ``[k, m]``): the diagonal metric of the bucket after this step's rows
        (bias-corrected running averages of the mean squared inputs and output gradients over all ranks' rows,
        ``δ`` scaled as ``G`` is by DDP's averaging, plus ``damping``, to ``metric_power``); state ``psi_metric``
        on every factor and ``psi_metric_step`` on ``A``.  Under DDP one all-reduce of ``k(n + m + 1)`` numbers."""
        group = self.param_groups[0]
        (m, n), dt = G.shape, G.dtype
        sums = []
        for parts in G.rows:
            x_sq = sum((x.to(dt).square().sum(0) for x, _ in parts), torch.zeros(n, dtype=dt, device=G.device))
            d_sq = sum((g.to(dt).square().sum(0) for _, g in parts), torch.zeros(m, dtype=dt, device=G.device))
            count = torch.full((1,), sum(x.shape[0] for x, _ in parts), dtype=dt, device=G.device)
            sums.append(torch.cat([x_sq, d_sq, count]))
        sums = torch.stack(sums)
        if G.group is not None:
            torch.distributed.all_reduce(sums, group=G.group)
        count = sums[:, -1:]
        means = (sums[:, :n] / count, sums[:, n:-1] / (count * G.world**2))
        beta, out = group["metric_beta"], []
        steps = []
        for A in As:
            state = self.state[A]
            state["psi_metric_step"] = state.get("psi_metric_step", 0) + 1
            steps.append(state["psi_metric_step"])
        correction = torch.tensor([1 / (1 - beta**t) for t in steps], dtype=dt, device=G.device)[:, None]
        for factors, squares in zip((As, Bs), means):
            for p in factors:
                if "psi_metric" not in self.state[p]:
                    self.state[p]["psi_metric"] = torch.zeros(squares.shape[1], dtype=dt, device=G.device)
            averages = [self.state[p]["psi_metric"] for p in factors]
            torch._foreach_mul_(averages, beta)
            torch._foreach_add_(averages, list(squares.unbind(0)), alpha=1 - beta)
            out.append((torch.stack(averages) * correction + group["damping"]).pow(group["metric_power"]))
        return out[0], out[1]

    def _adam_others(self, group: dict[str, Any], others: list[Tensor], grads: list[Tensor]) -> None:
        """torch's AdamW (foreach) on the parameters that are not LoRA factors, with ``grads`` (clipped)."""
        if not others:
            return
        lists: dict[str, list[Tensor]] = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps")}
        for p, grad in zip(others, grads):
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            for key, value in (("params", p), ("grads", grad), ("exp_avgs", state["exp_avg"]),
                               ("exp_avg_sqs", state["exp_avg_sq"]), ("state_steps", state["step"])):
                lists[key].append(value)
        adamw({**group, "amsgrad": False, "maximize": False, "foreach": None, "fused": None}, lists,
              lr=group["lr"] if group["adam_lr"] is None else group["adam_lr"], weight_decay=group["weight_decay"])

    def remove_hooks(self) -> None:
        """Remove the recording hooks from the model (the optimizer can no longer step its pairs)."""
        self._capture.remove()
