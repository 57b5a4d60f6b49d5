"""The lab's tasks (small offline ones shared with the demo, the examples and the tests; no hub downloads) and
their registry: :data:`TASKS`, each one's default lr grid and length, and :func:`make_task` from a
:class:`TaskConfig`.

Every task offers what :class:`sdsopt.lab.protocol.Task` lists: ``name``, ``setup(seed)``, ``full_model(seed)``,
``lora_model(seed)``, ``batches(seed)``, ``loss(model, batch)``, ``eval_loss(model)`` and, for the classifiers and
the LLM tasks, ``eval_accuracy(model)``; ``causal_lm`` (:class:`~sdsopt.lab.tasks.causal_lm.CausalLMTask`, a
user's model and data) is built by the CLI's ``--model``/``--data``, not by :func:`make_task`.
Each task module is imported only when :func:`make_task` builds it (``transformers`` and PEFT load with the tasks
that need them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_LRS", "DEFAULT_STEPS", "TASKS", "TaskConfig", "make_task"]

TASKS = ("linear", "psi_linear", "digits", "textlm", "minilm", "smollm_math", "smollm_code")
DEFAULT_LRS = {"linear": [1e-3, 3e-3, 1e-2, 3e-2], "digits": [3e-4, 1e-3, 3e-3, 1e-2], "textlm": [1e-3, 3e-3, 1e-2, 3e-2],
               "minilm": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "psi_linear": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
               "smollm_math": [1e-4, 3e-4, 1e-3, 3e-3], "smollm_code": [1e-4, 3e-4, 1e-3, 3e-3]}
DEFAULT_STEPS = dict.fromkeys(TASKS, 300)


@dataclass(frozen=True)
class TaskConfig:
    """The sizes of a task of :data:`TASKS` (the CLI's "task sizes"; each task reads the fields it has).

    ``batch`` 0 means the task's own default (linear: full batch, smollm: 8), ``max_len`` None likewise (minilm:
    128 tokens per paragraph, smollm: longest example kept 320), ``lora_alpha`` None ``2·rank`` (smollm);
    ``model_dir`` None the checkpoint of the ``sdsopt[minilm]`` / ``sdsopt[smollm]`` package.
    """

    name: str = "linear"
    rank: int = 4
    m: int = 64
    n: int = 64
    target_rank: int = 4
    kappa: float = 100.0
    noise: float = 0.0
    batch: int = 0
    pretrain_steps: int = 300
    width: int = 64
    layers: int = 2
    block: int = 64
    max_len: int | None = None
    lora_alpha: float | None = None
    rslora: bool = False
    eval_examples: int = 64
    difficulty: int = 0
    gguf_file: str | None = None
    model_dir: str | None = None


def make_task(config: TaskConfig, device: str = "cpu") -> Any:
    """The task ``config.name`` of :data:`TASKS` at ``config``'s sizes, its models built on ``device``;
    ``ValueError`` for an unknown name."""
    c = config
    if c.name == "linear":
        from .linear import LinearTask

        return LinearTask(m=c.m, n=c.n, rank=c.rank, target_rank=c.target_rank, kappa=c.kappa, noise=c.noise,
                          batch=c.batch)
    if c.name == "digits":
        from .digits import DigitsTask

        return DigitsTask(rank=c.rank, pretrain_steps=c.pretrain_steps)
    if c.name == "textlm":
        from .text import TextLMTask

        return TextLMTask(rank=c.rank, width=c.width, layers=c.layers, block=c.block,
                          pretrain_steps=c.pretrain_steps, device=device)
    if c.name == "psi_linear":
        from .linear import SyntheticLowRankTask

        return SyntheticLowRankTask(rank=c.rank, batch=c.batch)
    if c.name == "minilm":
        from .minilm import MiniLMTopicsTask

        return MiniLMTopicsTask(rank=c.rank, max_len=c.max_len or 128, model_dir=c.model_dir, device=device)
    if c.name in ("smollm_math", "smollm_code"):
        from .smollm import SmolLMTask

        return SmolLMTask(kind=c.name.split("_")[1], rank=c.rank, alpha=c.lora_alpha, rslora=c.rslora,
                          batch=c.batch or 8, max_len=c.max_len or 320, eval_examples=c.eval_examples,
                          difficulty=c.difficulty, model_dir=c.model_dir, gguf_file=c.gguf_file, device=device)
    raise ValueError(f"unknown task {c.name!r}; choose one of {', '.join(TASKS)}")
