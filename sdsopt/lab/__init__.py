"""The lab: the A/B harness that compares :class:`sdsopt.SDSAdamW`'s modes with LoRA, its peers and full
fine-tuning on small tasks, with the paper's metrics (``python -m sdsopt.lab``; results in benchmarks/RESULTS.md).

It stands on the optimizer library and the library never imports it: ``import sdsopt`` loads neither the lab nor
its plotting and Hugging Face dependencies (extras ``ablate``, ``hf``).  :class:`RunConfig` and
:class:`TaskConfig` are the typed recipe that the CLI builds from its options and scripts build directly; a task of
one's own follows :class:`Task` (:mod:`sdsopt.lab.protocol`), :class:`CausalLMTask` is one built from a causal LM
and records, and :func:`trainer_ab` runs the same A/B over a user's Hugging Face ``Trainer``.
"""

from .cli import main
from .optimizers import ABLATION_MODES, DEFAULT_MODES, make_optimizer
from .protocol import Task
from .report import format_table, format_tables, summarise, write_outputs
from .runs import RunConfig, run_grid, run_one
from .tasks import TASKS, TaskConfig, make_task
from .tasks.causal_lm import CausalLMTask
from .trainer_ab import trainer_ab

__all__ = ["ABLATION_MODES", "DEFAULT_MODES", "TASKS", "CausalLMTask", "RunConfig", "Task", "TaskConfig",
           "format_table", "format_tables", "main", "make_optimizer", "make_task", "run_grid", "run_one",
           "summarise", "trainer_ab", "write_outputs"]
