"""A user's causal LM on a user's data: the task of ``python -m sdsopt.lab --model DIR --data FILE``.

:class:`CausalLMTask` is a task of the lab's protocol (:mod:`sdsopt.lab.tasks`) built from a model and records
(:mod:`sdsopt.lab.data`'s formats); :meth:`CausalLMTask.from_paths` builds it from a local checkpoint and data
files as the CLI does, checking every input before anything trains.  LoRA is PEFT's on ``target_modules``
(default: every linear projection, PEFT's ``all-linear``), dropout off, the model in eval mode; each seed has its
own LoRA initialisation and its own order of the training records (shuffled epochs), the same in every mode.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import IGNORE, InputError, detect_format, encode_all, load_records, split
from .causal import Row, check_targets, collate, evaluate, load_pretrained, locate, peft_lora

__all__ = ["DTYPES", "CausalLMTask"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMTask:
    """LoRA fine-tuning of ``model`` on ``train`` records, held-out loss and token accuracy on ``held_out``.

    Args:
        model: a causal LM (``transformers``' ``*ForCausalLM``; the base, without LoRA): copied for each run.
        tokenizer: its tokenizer (a chat template for chat records).
        train, held_out: records in one of :data:`sdsopt.lab.data.FORMATS` (dicts, or a ``datasets.Dataset``).
        rank, alpha, rslora, target_modules: the adapter (``alpha`` default ``2·rank``; ``target_modules`` None:
            every linear projection but the output head).
        batch: sequences per micro-batch; max_len: tokens kept per record (the first ones).
        name: the task's name in tables and plots.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, train: Iterable[dict[str, Any]],
                 held_out: Iterable[dict[str, Any]], rank: int = 8, alpha: float | None = None,
                 target_modules: Sequence[str] | None = None, rslora: bool = False, batch: int = 8,
                 max_len: int = 512, name: str = "causal_lm") -> None:
        self.name, self.tokenizer = name, tokenizer
        self.rank, self.alpha, self.rslora = rank, (alpha if alpha is not None else 2.0 * rank), rslora
        self.batch, self.max_len = batch, max_len
        self.target_modules = list(target_modules) if target_modules is not None else None
        check_targets(model, self.target_modules)
        train, held_out = list(train), list(held_out)
        if not train:
            raise InputError("--data: the training split holds no record")
        if not held_out:
            raise InputError("--eval-data: the held-out split is empty; pass a file with records, or leave "
                             "--eval-data out to hold out --eval-fraction of --data")
        self.format = detect_format(train, "--data")
        eval_format = detect_format(held_out, "--eval-data")
        if eval_format != self.format:
            raise InputError(f"--eval-data is in the {eval_format} format and --data in the {self.format} format; "
                             "write both in one format")
        self.train_rows: list[Row] = encode_all(train, self.format, tokenizer, max_len, "--data")
        self.eval_rows: list[Row] = encode_all(held_out, self.format, tokenizer, max_len, "the held-out split")
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.base = model.eval()

    @classmethod
    def from_records(cls, model: nn.Module, tokenizer: Any, records: Iterable[dict[str, Any]],
                     eval_records: Iterable[dict[str, Any]] | None = None, eval_fraction: float = 0.1,
                     **options: Any) -> CausalLMTask:
        """The task of a model and a data set (records, or a ``datasets.Dataset``): the held-out split is
        ``eval_records``, else the last ``eval_fraction`` of ``records`` (:func:`sdsopt.lab.data.split`, fixed
        whatever the run's seed).  ``options``: :meth:`__init__`'s."""
        records = list(records)
        if eval_records is None:
            records, eval_records = split(records, eval_fraction)
        return cls(model, tokenizer, records, eval_records, **options)

    @classmethod
    def from_paths(cls, model: str | Path, data: str | Path, eval_data: str | Path | None = None,
                   eval_fraction: float = 0.1, dtype: str = "float32", device: str = "cpu",
                   **options: Any) -> CausalLMTask:
        """The task of a local checkpoint (a ``save_pretrained`` folder or a ``.gguf`` file) and data files
        (:func:`sdsopt.lab.data.load_records`), as :meth:`from_records` splits them; every input is checked
        before the model loads.  ``options``: :meth:`__init__`'s."""
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        folder, gguf_file = locate(model)
        records = load_records(data, "--data")
        detect_format(records, "--data")  # (before the model loads: a bad file fails in a second)
        if eval_data is not None:
            eval_records = load_records(eval_data, "--eval-data")
        else:
            records, eval_records = split(records, eval_fraction)
        base, tokenizer = load_pretrained(folder, gguf_file, DTYPES[dtype])
        name = options.pop("name", None) or (Path(gguf_file).stem if gguf_file else folder.name)
        return cls(base.to(device), tokenizer, records, eval_records, name=name, **options)

    # -- the task protocol (sdsopt.lab.tasks) -------------------------------------------------------------------
    def setup(self, seed: int) -> None:
        """Nothing to build per seed: the base and the tokenised records are the task's."""

    def full_model(self, seed: int) -> nn.Module:
        return copy.deepcopy(self.base)

    def lora_model(self, seed: int) -> nn.Module:
        return peft_lora(self.base, seed, self.rank, self.alpha, self.target_modules, self.rslora)

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Micro-batches of ``batch`` records in shuffled epochs, the order fixed by ``seed``."""
        gen = torch.Generator().manual_seed(10_000 + seed)
        order: list[int] = []
        while True:
            while len(order) < self.batch:
                order += torch.randperm(len(self.train_rows), generator=gen).tolist()
            take, order = order[: self.batch], order[self.batch:]
            yield collate([self.train_rows[i] for i in take], self.pad)

    @staticmethod
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ids, mask, labels = batch
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def eval_loss(self, model: nn.Module) -> float:
        """Token-averaged loss on the labelled tokens of the held-out records."""
        return evaluate(model, self.eval_rows, self.pad)[0]

    def eval_accuracy(self, model: nn.Module) -> float:
        """Greedy next-token accuracy on the labelled tokens of the held-out records (teacher-forced)."""
        return evaluate(model, self.eval_rows, self.pad)[1]

    def describe(self) -> dict[str, Any]:
        """What the summary records of the task: format, record and token counts, the adapter."""
        return {"format": self.format, "train_records": len(self.train_rows), "eval_records": len(self.eval_rows),
                "eval_tokens": sum(sum(t != IGNORE for t in labels[1:]) for _, labels in self.eval_rows),
                "rank": self.rank, "lora_alpha": self.alpha, "rslora": self.rslora,
                "target_modules": self.target_modules or "all-linear"}
