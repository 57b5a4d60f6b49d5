"""transformers: :class:`SDSDiagnosticsCallback`, the diagnostics in the Trainer's logs."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .common import check_every, due, find_sdsadamw, log_keys

__all__ = ["SDSDiagnosticsCallback"]


class SDSDiagnosticsCallback(TrainerCallback):
    """Adds :meth:`sdsopt.SDSAdamW.diagnostics`' summary (keys ``sds/…``) to the Trainer's logs every ``every``
    optimizer steps, with the step's own numbers (:meth:`~sdsopt.SDSAdamW.track_step` is armed just before that
    step, so the factors are copied for that step only).

    On a due step it asks the Trainer to log (``control.should_log``) and merges the keys into that log: into
    ``logs`` (what the callbacks after it see) and ``state.log_history``.  The Trainer calls its reporting
    callbacks (TensorBoard, W&B, …) before the ones given as ``callbacks=``, so for the keys to reach them install
    the callback first: ``SDSDiagnosticsCallback(every=N).install(trainer)``.  The Trainer's optimizer must be (or
    wrap) an :class:`sdsopt.SDSAdamW`; otherwise the callback does nothing.
    """

    def __init__(self, every: int = 50, prefix: str = "sds/", per_pair: bool = False) -> None:
        self.every = check_every(every)
        self.prefix, self.per_pair = prefix, per_pair
        self._pending: dict[str, float] | None = None

    def install(self, trainer: Any) -> SDSDiagnosticsCallback:
        """Put this callback first in ``trainer``'s callbacks (ahead of the reporting ones); returns it."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        opt = find_sdsadamw(optimizer)
        if opt is not None and due(state.global_step + 1, self.every):
            opt.track_step()

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> Any:
        opt = find_sdsadamw(optimizer)
        if opt is not None and due(state.global_step, self.every):
            self._pending = {**log_keys(opt, self.prefix, self.per_pair), "step": state.global_step}
            control.should_log = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._pending is None or logs is None or self._pending.pop("step") != state.global_step:
            self._pending = None
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = None
