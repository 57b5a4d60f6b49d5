"""What the lab's causal-LM tasks share: loading a local checkpoint (a ``save_pretrained`` folder or a GGUF file,
never the hub), PEFT LoRA on named projections with a check that they exist, right-padded batches with masked
labels, and the held-out token-averaged loss and next-token accuracy."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import IGNORE, InputError

__all__ = ["Row", "check_targets", "collate", "evaluate", "linear_names", "load_pretrained", "locate", "peft_lora"]

Row = tuple[list[int], list[int]]  # token ids, labels (IGNORE where there is no loss)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def locate(model: str | Path, option: str = "--model") -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)`` of a model given as a ``save_pretrained`` folder or a ``.gguf`` file;
    an :class:`InputError` when it is neither, or the folder has no tokenizer."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.exists():
        raise InputError(f"{option} {path}: no such folder or file; pass a transformers save_pretrained folder "
                         "(config.json, weights and tokenizer) or a .gguf file")
    if path.is_file():
        raise InputError(f"{option} {path}: a file but not a .gguf one; pass the folder that holds config.json "
                         "(a transformers save_pretrained folder) or a .gguf file")
    found = sorted(p.name for p in path.iterdir())
    if not (path / "config.json").exists():
        ggufs = [n for n in found if n.endswith(".gguf")]
        hint = f"; it holds {ggufs[0]}: pass {path / ggufs[0]}" if ggufs else ""
        raise InputError(f"{option} {path}: no model there (no config.json; the folder holds "
                         f"{found[:12] or 'nothing'}){hint}; save one with model.save_pretrained(DIR) and "
                         "tokenizer.save_pretrained(DIR)")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise InputError(f"{option} {path}: a model but no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save it there with tokenizer.save_pretrained(DIR)")
    return path, None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at errors only (loading a checkpoint warns about every unused or tied key)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_pretrained(folder: Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
                    ) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a local causal LM (a GGUF file is de-quantized by transformers with ``gguf``),
    the model in eval mode (dropout off: runs differ only by the optimizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        from ..extras import require

        require("gguf", f"loading {gguf_file}")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    return model.eval(), tokenizer


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``q_proj``, ``c_attn``, …): what
    ``target_modules`` can name."""
    kinds = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds = (nn.Linear, Conv1D)
    except ImportError:  # (transformers missing: the task that needs it says so first)
        pass
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def check_targets(model: nn.Module, targets: Sequence[str] | None, option: str = "--target-modules") -> None:
    """Every name of ``targets`` matches a module of ``model`` as PEFT matches it (the module's name, or its
    last dotted parts); an :class:`InputError` naming the linear modules there are otherwise."""
    if targets is None:
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise InputError(f"{option} {' '.join(unmatched)}: matches no module of the model; its linear modules "
                         f"are: {' '.join(linear_names(model))}")


def peft_lora(base: nn.Module, seed: int, rank: int, alpha: float, targets: Sequence[str] | None,
              rslora: bool = False, fan_in_fan_out: bool = False) -> nn.Module:
    """A copy of ``base`` with PEFT LoRA (dropout 0) on ``targets`` (None: PEFT's ``all-linear``, every linear
    projection but the output head), the factors drawn after ``torch.manual_seed(seed)``."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
                        target_modules=list(targets) if targets is not None else "all-linear",
                        fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def collate(rows: Sequence[Row], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, attention mask and labels (:data:`~sdsopt.lab.data.IGNORE` on padding)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, row_labels) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(row_labels)
    return ids, mask, labels


@torch.no_grad()
def evaluate(model: nn.Module, rows: Sequence[Row], pad: int, batch_size: int = 16) -> tuple[float, float]:
    """Token-averaged cross-entropy and greedy next-token accuracy on the labelled tokens of ``rows``."""
    device = next(model.parameters()).device
    total, hits, count = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(rows[i: i + batch_size], pad))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=IGNORE, reduction="sum"))
        kept = target != IGNORE
        hits += int((logits.argmax(-1)[kept] == target[kept]).sum())
        count += int(kept.sum())
    return total / count, hits / count
