"""Lightning: :class:`SDSDiagnosticsLightningCallback`, the diagnostics through ``pl_module.log_dict``."""

from __future__ import annotations

from typing import Any

try:  # the unified package (lightning >= 2), else the standalone one
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning import Callback

from .common import check_every, due, find_sdsadamw, log_keys

__all__ = ["SDSDiagnosticsLightningCallback"]


class SDSDiagnosticsLightningCallback(Callback):
    """Logs :meth:`sdsopt.SDSAdamW.diagnostics`' summary (keys ``sds/…``) every ``every`` optimizer steps through
    ``pl_module.log_dict`` (so to the Trainer's logger), with the step's own numbers (:meth:`~sdsopt.SDSAdamW.track_step`
    armed at the start of the step's batch).  The module's optimizer must be (or wrap) an :class:`sdsopt.SDSAdamW`; the first
    one of ``trainer.optimizers`` that is counts; with none the callback does nothing."""

    def __init__(self, every: int = 50, prefix: str = "sds/", per_pair: bool = False) -> None:
        self.every = check_every(every)
        self.prefix, self.per_pair = prefix, per_pair
        self.last: dict[str, float] = {}

    @staticmethod
    def _opt(trainer: Any) -> Any:
        return next((o for o in map(find_sdsadamw, trainer.optimizers) if o is not None), None)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # armed here, not in on_before_optimizer_step: Lightning runs the training step as the optimizer's closure,
        # inside opt.step(), after the step's pre-hooks (which take the copy)
        opt = self._opt(trainer)
        if opt is not None and due(trainer.global_step + 1, self.every):
            opt.track_step()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = self._opt(trainer)
        if opt is None or not due(trainer.global_step, self.every) or self.last.get("step") == trainer.global_step:
            return
        keys = log_keys(opt, self.prefix, self.per_pair)
        pl_module.log_dict(keys, on_step=True, on_epoch=False)
        self.last = {**keys, "step": trainer.global_step}
