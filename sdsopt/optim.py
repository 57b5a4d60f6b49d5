"""``SDSAdamW``: AdamW for LoRA pairs in the coordinates of their orthonormal bases (docs/math.md §2), and the
comparison modes of §3.

The class validates (:mod:`sdsopt.validation`), pairs (:mod:`sdsopt.pair_groups`), holds state and orchestrates a
step: per param group the lists of one AdamW call (:class:`sdsopt.adam.StepLists`), the group's mode object
(:mod:`sdsopt.modes`) transforms what Adam sees, :func:`sdsopt.adam.adamw` (torch's AdamW kernel) updates the
rest, and the mode maps back.  Parameters outside LoRA pairs follow ``torch.optim.AdamW`` bit for bit (P7).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import compiled, modes, naming
from . import pairing as _pairing
from .adam import StepLists, adamw_sides
from .blocks import BlockViews
from .capture import LoraCapture
from .checkpoint import checked_sds
from .diagnostics import StepTracker, factor_pairs, report
from .fused import Tables
from .gradient_start import keeps_recording, recording_roots, start_pairs, starts_pending, waiting_pairs
from .guard import SkipLog, guard_step
from .linalg import float32_matmul
from .modes import Mode, StepContext
from .pair_groups import (PairingLog, PairingNotice, check_groups_intact, check_still_trainable, lora_pairs,
                          report_pairing, resolve_group_pairs)
from .pairing import LoraPair, PairingFn
from .validation import check_flag, check_group, resolve_warmup

__all__ = ["PairingNotice", "SDSAdamW"]


class SDSAdamW(Optimizer):
    r"""AdamW for LoRA that runs Adam in the coordinates of the factors' orthonormal bases (SDS-LoRA).

    For a LoRA pair ``ΔW = s·B·A`` with thin QRs ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` (the r×r ``R`` from Cholesky factors
    of the Grams ``BᵀB``, ``AAᵀ``; ``Q`` never formed), mode ``"sds"`` runs torch's AdamW on the coordinates
    ``Ã = R_B·A``, ``B̃ = B·R_Aᵀ`` with their gradients ``g̃A = R_B^{-T}·gA = s·Q_Bᵀ·G``,
    ``g̃B = gB·R_A^{-1} = s·G·Q_A`` (docs/math.md (2.2)) and maps the step back with r×r products.  The full gradient
    reaches the factors only through orthonormal bases, and the factors' singular values never multiply the
    weight-space step (2.3).  The first ``warmup_steps`` steps of each pair are plain AdamW (LoRA's ``B = 0`` has no
    basis); then the pair is re-split without changing ``BA`` and its Adam state reset (2.4).  Parameters outside pairs
    get exactly ``torch.optim.AdamW``.  Each mode's choices where the maths leaves one open are in its module's
    docstring (:mod:`sdsopt.modes`).

    Args:
        params: ``model.named_parameters()`` (pairs found by name, see ``pairing``), a model (its trainable named
            parameters, one group: what transformers' ``Trainer`` passes for
            ``optimizer_cls_and_kwargs=(SDSAdamW, {"model": model, ...})``), or param groups; a group may list explicit
            pairs: ``{"params": [...], "lora_pairs": [(A, B), ...]}``.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused: as ``torch.optim.AdamW`` (same defaults).
            ``fused=True`` on CUDA steps the LoRA pairs by Triton kernels (:mod:`sdsopt.fused`), and ``lr`` may then be
            a one-element Tensor (on the device: a schedule that ``fill_``\ s it reaches a step captured in a CUDA
            graph); the σ channel reads it on the host.
        mode: ``"sds"`` (default, above), ``"sds_polar"`` (sdsopt 0.1's ``sds``: a one-sided rewrite
            ``g̃B = gB (AAᵀ)^{-1/2}``, ``g̃A = (BᵀB)^{-1/2} gA`` with Adam on the plain factors), ``"lora"`` (identity:
            plain AdamW on the factors), ``"scaled"`` (``gB (K_A + δI)^{-1}``, ``(K_B + δI)^{-1} gA``; Zhang & Pilanci
            2024), ``"svd_oracle"`` (Adam on the full ``W = BA`` with the true ``G``, then the best rank-r
            re-factorisation; needs ``m·n ≤ oracle_max_numel`` and the layers' inputs: call :meth:`attach` with the
            model once), ``"lorapro"`` (LoRA-Pro's efficient mode, a peer, docs/math.md (7.1)) or ``"sds_muon"`` (the
            ``sds`` coordinates stepped by the matrix sign of their momentum, docs/math.md §8; no warm-up).  LoRSum /
            PSI-LoRA, 0.2's ``"lorsum"``, is the optimizer :class:`sdsopt.PSILoRA`.
        b_lr_ratio: the step size of every pair's B factor is ``b_lr_ratio·lr`` (A's is ``lr``), its decoupled weight
            decay included (docs/math.md (2.7)).  In mode ``"lora"`` this is LoRA+ (Hayou et al. 2024) exactly as
            PEFT's ``create_loraplus_optimizer(..., loraplus_lr_ratio=b_lr_ratio)`` builds it for the LoRA factors
            (PEFT also puts 1-D parameters such as biases at the ratio; here only B factors are).  In ``"sds"`` it
            scales B's step in both phases: the warm-up's plain AdamW step and the coordinate step of ``B̃``.  Default
            1.0; a group hyper-parameter, so a scheduler or callback may change it.  Refused with ``"svd_oracle"`` (no
            factor steps there).
        gradient_start: the gradient-aligned start (docs/math.md (2.8); LoRA-One's spectral start of ``A``,
            function-preserving): at a pair's first step, if its ``B`` is zero (PEFT's init), the rows of ``A`` become
            the top-r right singular vectors of that batch's full gradient ``G`` (scaled to ``A``'s norm) and ``B``'s
            gradient is recomputed there, so the first step already works in ``G``'s dominant subspace
            (:mod:`sdsopt.gradient_start`).  It needs the layers' inputs of that batch: the optimizer records them
            itself from the model that holds the pairs (the one passed as ``params``, else the outermost live module
            holding them; :meth:`attach` names another) and stops once every pair has started.  Any mode but
            ``"svd_oracle"``; default False.
        warmup_steps: mode ``"sds"``: plain AdamW steps of each pair before its coordinate steps.  Default ``None``: 10
            (the paper's), or 0 in a group with ``gradient_start`` (its ``A`` has orthonormal rows, so no warm-up waits
            for ``B`` to leave zero); 0 starts in coordinates at once.
        coordinate_ramp: mode ``"sds"``: the pair's first coordinate steps are scaled by ``k/coordinate_ramp``
            (``k = 1, 2, …``; default 0 = off; 10 at the top of the stable lr range or with a constant lr), a
            learning-rate warm-up restarted with the Adam state (docs/math.md (2.4); measurements in
            benchmarks/RESULTS.md).  It scales the applied change (weight decay included), not Adam's moments.
        resplit: mode ``"sds"``: re-split the pair at the end of its warm-up (default True).  The pair's Adam state is
            reset there either way (moments of the plain factors do not carry over to coordinates).
        rebalance: mode ``"sds"``: after each coordinate step, scale the pair to equal norms, ``(cA, B/c)`` with
            ``c = (‖B‖_F/‖A‖_F)^{1/2}`` from the step's Grams (default True).  The coordinates, their gradients and
            Adam's state are invariant under this scaling (docs/math.md P1), so it changes nothing in ``BA``'s
            trajectory; it stops the drift of the factors' balance that coordinate steps cause (a factor moves by
            ``η/σ(partner)``: the larger one grows faster), which would otherwise cost float32 precision.
        step_damping: mode ``"sds"``: γ of the trust-region shift ``μ_s = γ·lr·√min(m, n)`` added to both Grams before
            their Cholesky factorisation (default 1.0; 0 gives the exact coordinates of docs/math.md (2.2)).  A product
            ``B·A`` cannot take a coordinate step of size ``lr`` in a direction where its singular value ``σ`` is below
            ``~lr·√min(m, n)``: the ``δB·δA`` term, ``lr²·√(mn)/σ``, then dominates the step (ill-conditioned factors:
            the loss jumps at the end of the warm-up; docs/math.md (2.6)).  With ``μ_s`` such directions are stepped
            LoRA-like (gain ``μ_s^{-1/2}``), directions with ``σ ≫ μ_s`` (balanced factors: ``K``'s eigenvalues are
            ``σ``) keep the isotropic SDS step; as ``lr → 0`` the damping vanishes, so the first-order properties (P9,
            P11) are unchanged.
        decouple_sigma: the singular-value channel of ``"sds_polar"`` (docs/math.md (3.2)): each factor's gradient is
            split into a singular-value part ``gσ`` (its own r-vector Adam state, step size ``lr·sigma_lr_ratio``) and
            a basis part (the usual elementwise Adam).  Off by default; refused with ``"sds"``, whose singular values
            live in the r×r core.
        sigma_lr_ratio: step-size ratio of the singular-value channel.
        route: how the r×r algebra is done.  ``"sds"``: ``"cholesky"`` only.  ``"scaled"``: ``"cholesky"`` (default) or
            ``"eigh"``.  ``"sds_polar"``: ``"eigh"`` (exact hard cut of docs/math.md (2.5)) or ``"newton_schulz"``
            (matmul-only damped inverse root).  ``"auto"`` (default) picks Cholesky for ``sds``/``scaled`` and, for
            ``sds_polar``, Newton–Schulz on CUDA (where batched eigh is slow and synchronises) and eigh elsewhere.
        rank_tol: τ of docs/math.md (2.5).  Cholesky route: the relative shift ``K + τ·trace(K)·I`` (``None``: 1e-5 in
            float32 algebra, 1e-13 in float64).  eigh route: Gram eigenvalues ``≤ τ·λ_max`` pass no gradient (1e-6,
            1e-14).  Newton–Schulz: the relative damping δ (1e-5, 1e-11).
        damping: δ of modes ``"scaled"`` and ``"lorapro"`` (absolute, > 0): they invert ``K + δI``.
        oracle_max_numel: largest ``m·n`` for which ``"svd_oracle"`` forms the full matrices.
        linalg_dtype: dtype of the r×r algebra and of the coordinate maps; ``None`` means float32, or float64 for
            float64 parameters.  Never lower than float32, whatever the parameter dtype.
        skip_nonfinite: skip the whole step when any gradient it would use holds a NaN/Inf, as ``torch.amp.GradScaler``
            does: parameters, moments, step counts and ``sds``'s warm-up count stay bit-identical;
            :attr:`skipped_steps` counts the skips (saved in ``state_dict()``'s ``param_groups[0]['skipped_steps']``)
            and the first skip warns with the offending parameter's name.  Default False (AdamW's behaviour).  With
            ``fused=True`` on CUDA the check (one ``_foreach_norm(·, ∞)`` pass) feeds torch's fused Adam kernel its
            ``found_inf`` flag and the host never waits (CUDA-graph friendly; the warning arrives a step later), except
            while a step needs a host decision: pairs in ``sds``'s warm-up, ``decouple_sigma``, ``svd_oracle``.
            Otherwise (CPU, foreach, those cases) the flag is read on the host.  Under FSDP2 the flag is summed over
            each shard group (one all-reduce of one number per group and step while the guard is on), so all ranks skip
            together.
        pairing: how names become pairs: ``None`` (PEFT/loralib/LitGPT ``lora_A``/``lora_B``, torchtune ``lora_a``/
            ``lora_b``, kohya/LyCORIS ``lora_down``/``lora_up``; LitGPT's ``LoRAQKVLinear`` and loralib's
            ``MergedLinear`` one pair per q/k/v block: :mod:`sdsopt.blocks`), a regex with a named group ``factor``
            listing two values, A's first (``r"\.lora_(?P<factor>down|up)\."``; see :func:`sdsopt.pairing.regex_pairing`), or a function
            ``names -> [(name_A, name_B), ...]``.
        infer_names: parameters given without names (``model.parameters()``, unnamed param groups) are named as their
            outermost live ``nn.Module`` names them (:mod:`sdsopt.naming`), so they pair as ``named_parameters()``
            would, and a :class:`sdsopt.PairingNotice` says once what was paired.  ``False``: unnamed parameters pair
            only through explicit ``lora_pairs``.

    Distributed: under DDP nothing changes.  Under FSDP2 (or HSDP) the factors are DTensor shards (``A`` along n, ``B``
    along m: :func:`sdsopt.distributed.lora_shard_placement_fn`); the step all-reduces the stacked r×r Grams once and
    runs the rewrite and Adam on the local shards.  DeepSpeed ZeRO is refused (it flattens the parameters).

    Non-finite gradients, ``skip_nonfinite=False`` (default): as in AdamW, nothing is skipped or raised; a rewrite mixes
    the r entries of a row of ``B`` (column of ``A``), so one non-finite entry spreads along that row (column).
    """

    _watch_frozen = False  # (copies and unpickled optimizers do not repeat the first step's check)

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
        b_lr_ratio: float = 1.0,
        gradient_start: bool = False,
        warmup_steps: int | None = None,
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
        check_flag("skip_nonfinite", skip_nonfinite)
        check_flag("infer_names", infer_names)
        self.skip_nonfinite = skip_nonfinite
        self._skips = SkipLog()
        self._infer_names = infer_names
        self._names: dict[int, list[str]] = {}  # per group: names found for a group given without them
        self._pairing_log = PairingLog()  # what resolving the pairs leaves for report_pairing
        self._live_names: dict[int, str] | None = None  # naming.live_names() while __init__ adds the groups
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, mode=mode, b_lr_ratio=b_lr_ratio,
            gradient_start=gradient_start, warmup_steps=warmup_steps, coordinate_ramp=coordinate_ramp,
            resplit=resplit, rebalance=rebalance, step_damping=step_damping, decouple_sigma=decouple_sigma,
            sigma_lr_ratio=sigma_lr_ratio, route=route, rank_tol=rank_tol, damping=damping,
            oracle_max_numel=oracle_max_numel, linalg_dtype=linalg_dtype, maximize=maximize, foreach=foreach,
            fused=fused,
        )
        check_group(resolve_warmup(dict(defaults)), "defaults")
        self._pairing: PairingFn = _pairing.resolve_pairing(pairing)
        model = params if isinstance(params, torch.nn.Module) else None
        if model is not None:  # e.g. Trainer(optimizer_cls_and_kwargs=(SDSAdamW, {"model": model}))
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._fresh_caches()
        self._group_sizes: list[int] = []
        self._capture: LoraCapture | None = None
        self._start_recording = False  # is the capture there for gradient_start alone (removed once all started)?
        super().__init__(params, defaults)
        self._live_names = None
        names = [self._group_names(gi) for gi in range(len(self.param_groups))]
        self._watch_frozen = report_pairing(self.param_groups, names, self._pairing, self._pairing_log,
                                            names_found=bool(self._names))
        if starts_pending(self.param_groups, False) and (roots := recording_roots(self.param_groups, model)):
            self.attach(roots)  # (2.8): the optimizer records the first batch itself

    def _fresh_caches(self) -> None:
        """The caches of this instance's tensors (rebuilt lazily) and the compiled step's handle: new for every copy."""
        self._modes: dict[str, Mode] = {}  # the mode objects (their caches) of this optimizer
        self._tables = Tables()  # the fused kernels' entry tables (sdsopt.fused)
        self._lists = StepLists()
        self._blocks = BlockViews()  # the step's groups: stacked factors (LitGPT, loralib MergedLinear) per block
        self.compile_handle = compiled.register(self)  # the traced step's reference to this optimizer

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickling: ``Optimizer``'s state (defaults, state, param groups) and this
        optimizer's own settings (``skip_nonfinite`` and its count, pairing rule, group sizes).  Not the caches
        (:meth:`_fresh_caches`) and not :meth:`attach`'s hooks, which belong to the original's model: call
        ``attach`` on the copy's model (mode ``svd_oracle`` says so if it is missing)."""
        self._skips.poll(wait=True)  # (settles the skip count of sync-free steps still in flight)
        own = ("skip_nonfinite", "_skips", "_pairing", "_group_sizes", "_infer_names", "_names")
        return {**super().__getstate__(), **{key: self.__dict__[key] for key in own}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._capture, self._start_recording, self._live_names, self._starts_done = None, False, None, False
        self._fresh_caches()

    def _mode(self, group: dict[str, Any]) -> Mode:
        """The mode object of ``group`` (one per mode and optimizer)."""
        if (name := group["mode"]) not in self._modes:
            self._modes[name] = modes.create(name)
        return self._modes[name]

    # ------------------------------------------------------------------ pairing
    def _group_names(self, gi: int) -> list[str] | None:
        """The names of group ``gi``'s parameters: given, or found by ``infer_names``; ``None`` if neither."""
        return self.param_groups[gi].get("param_names") or self._names.get(gi)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Optimizer.add_param_group``; also resolves the group's LoRA pairs: its explicit ``lora_pairs`` (tensors
        ``(A, B)``) and the pairing rule on its names (:func:`sdsopt.pair_groups.resolve_group_pairs` raises
        ``ValueError`` for a pair split across groups, a parameter in two pairs, or shapes that do not chain)."""
        param_group = dict(param_group)
        explicit = param_group.pop("lora_pairs", None) or []
        self._starts_done = False  # (a new group may hold pairs still to start)
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = resolve_warmup(self.param_groups[gi])
        check_group(group, f"param group {gi}")
        try:
            if "param_names" not in group and self._infer_names:  # named from the live modules (sdsopt.naming)
                names, self._live_names = naming.all_names(group["params"], self._live_names)
                if names:
                    self._names[gi] = names
            earlier = [(g["params"], self._group_names(j)) for j, g in enumerate(self.param_groups[:-1])]
            group["lora_pairs"] = resolve_group_pairs(gi, group, explicit, self._group_names(gi), self._pairing,
                                                      earlier, self._pairing_log)
        except Exception:
            self.param_groups.pop()
            self._names.pop(gi, None)
            raise
        self._group_sizes.append(len(group["params"]))

    @property
    def lora_pairs(self) -> list[LoraPair]:
        """Every resolved pair, with its group, indices, names and ``(m, n, r)``."""
        return lora_pairs(self.param_groups, self._group_names)

    # ------------------------------------------------------------------ checkpoints
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
        tensors whose shapes differ from the parameters'.  A ``torch.optim.AdamW`` checkpoint of the same param
        groups resumes in modes ``sds`` and ``lora`` (switching mid-run: :func:`sdsopt.checkpoint.from_adamw`).
        """
        state_dict = checked_sds("SDSAdamW.load_state_dict", state_dict, self.param_groups)
        skipped = int(state_dict["param_groups"][0].get("skipped_steps", 0)) if state_dict["param_groups"] else 0
        self._modes.clear()  # (their caches know the old state)
        self._lists.clear()  # the state tensors are new objects
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("skipped_steps", None)
        self._skips.reset(skipped)

    def attach(self, model: torch.nn.Module | list[torch.nn.Module], keep: bool | None = None) -> LoraCapture:
        """Record the LoRA layers' inputs and output gradients in ``model`` (a module or a list of them) for mode
        ``svd_oracle``, ``gradient_start`` or the harness's metrics, replacing an earlier recording; returns the
        :class:`sdsopt.capture.LoraCapture` (also :attr:`capture`; ``capture.remove()`` detaches it).

        The records are cleared after every :meth:`step`.  ``keep``: go on recording once every pair took its
        gradient-aligned start (default: only where a group is in mode ``svd_oracle``, which needs the inputs at
        every step, or where no start is pending); else the recording is removed then and :attr:`capture` is None.
        """
        if self._capture is not None:
            self._capture.remove()
        self._capture = LoraCapture(model, factor_pairs(self.param_groups))
        self._start_recording = not (keeps_recording(self.param_groups, self._starts_done) if keep is None else keep)
        return self._capture

    @property
    def capture(self) -> LoraCapture | None:
        """The recorder :meth:`attach` installed, if any."""
        return self._capture

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SDS-AdamW step: each group's mode transforms what Adam sees, AdamW, the map back (closure as in AdamW).

        Under ``torch.compile`` the step is one custom operator in the graph (:mod:`sdsopt.compiled`: no graph break,
        ``fullgraph=True`` works), whose implementation is :meth:`eager_step`: its host logic (pairing, buckets,
        warm-up counts, the kernels' tables) does not trace, and need not.
        """
        if torch.compiler.is_compiling():
            return compiled.step(self, closure)
        return self.eager_step(closure)

    @torch.no_grad()
    def eager_step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """The step outside ``torch.compile`` (what :meth:`step` runs eagerly, and the compiled step's operator)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._watch_frozen:  # the first step: all frozen since construction? (pair_groups)
            self._watch_frozen = False
            check_still_trainable(self.param_groups)
        starting = starts_pending(self.param_groups, self._starts_done)
        waiting = waiting_pairs(self.param_groups, self.state) if starting else []
        check_groups_intact(self.param_groups, self._group_sizes)
        groups, state = self._blocks.prepare(self.param_groups, self._group_names, self.state)  # (sdsopt.blocks)
        prepared = [(gi, group, *self._lists(group, gi, state)) for gi, group in enumerate(groups)]
        skip, found_inf = False, None
        if self.skip_nonfinite:  # (the start needs the decision on the host)
            host = bool(waiting) or any(not group["fused"] or self._mode(group).host_decision(group, state)
                                        for _, group, _, lists, _ in prepared if lists["params"])
            skip, found_inf = guard_step(prepared, groups, host, self._skips)
        with float32_matmul():  # the factors' algebra at float32 accuracy, whatever the user's TF32 flag
            if skip:  # (2.8): the pairs still to start keep no state (this step made it), to start at the next step
                self._lists.forget(state, [p for *_, A, B in waiting for p in (A, B)])
            elif waiting:  # (2.8), first steps only: A from G, B's gradient at the new A
                start_pairs(self.param_groups, waiting, self._capture, self._group_names)
            for gi, group, position, lists, has_complex in ([] if skip else prepared):
                if not lists["params"]:
                    continue
                b_factors = {id(lists["params"][position[ib]]) for _, ib in group["lora_pairs"] if ib in position}
                ctx = StepContext(gi, group, position, lists, state, self._tables, found_inf, self._capture)
                map_back = self._mode(group).transform(ctx)
                if lists["params"]:  # (a mode may have stepped every parameter itself)
                    adamw_sides(group, lists, b_factors, has_complex=has_complex, found_inf=found_inf)
                map_back()
        self._blocks.release_grads()
        if self._capture is not None:
            self._capture.clear()
        if starting and not skip and not waiting_pairs(self.param_groups, self.state):
            self._starts_done = True
            if self._start_recording:  # (the recording was there for the start alone)
                self._capture.remove()
                self._capture, self._start_recording = None, False
        return loss

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, Any]:
        """Per LoRA pair and summarised: phase, κ(A), κ(B), norms and ‖B‖/‖A‖, and the last step's effective rank,
        relative size and B-side share if :meth:`track_step` was called before it (:func:`sdsopt.diagnostics.report`).
        Python floats: reads the device once per rank; costs nothing when not called."""
        tracker = self.__dict__.get("_step_tracker")
        return report(*self._blocks.view(self.param_groups, self._group_names, self.state), self.lora_pairs,
                      tracker.before if tracker else None)

    def track_step(self) -> None:
        """Copy the LoRA factors at the start of the next :meth:`step` (that step only), so that :meth:`diagnostics`
        reports it (:class:`sdsopt.diagnostics.StepTracker`)."""
        self.__dict__.setdefault("_step_tracker", StepTracker()).arm(self)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``skip_nonfinite=True`` (saved in and restored from checkpoints)."""
        return self._skips.total
