"""Offline text for small language-model runs: two real corpora that ship with Python itself.

* ``"stdlib"``: the source code of Python's standard library (``.py`` files under ``sysconfig``'s
  ``stdlib`` path), a stand-in for pre-training data;
* ``"pydoc"``: the English reference documentation in ``pydoc_data.topics`` (what ``help()`` shows),
  a different distribution to adapt to.

Text is tokenised to bytes (vocabulary 256), so no tokenizer has to be downloaded.  The model is a
GPT-2 built from a ``transformers`` config: real architecture, random initial weights.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["CORPORA", "TextLMTask", "batch_iterator", "lm_loss", "load_corpus", "split", "tiny_gpt2"]

CORPORA = ("stdlib", "pydoc")


def load_corpus(name: str, max_bytes: int = 2_000_000) -> Tensor:
    """Bytes of corpus ``name`` as a uint8 tensor (deterministic order, at most ``max_bytes``)."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        data = text.encode("utf-8")
    elif name == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks, total = [], 0
        for path in sorted(root.glob("*.py")):
            blob = path.read_bytes()
            chunks.append(blob)
            total += len(blob)
            if total >= max_bytes:
                break
        data = b"\n".join(chunks)
    else:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    if not data:
        raise RuntimeError(f"corpus {name!r} is empty on this Python installation")
    return torch.frombuffer(bytearray(data[:max_bytes]), dtype=torch.uint8).clone()


def split(data: Tensor, holdout: float = 0.1) -> tuple[Tensor, Tensor]:
    """(train, held-out) split at a fixed position."""
    cut = int(len(data) * (1 - holdout))
    return data[:cut], data[cut:]


def batch_iterator(data: Tensor, block: int, batch: int, generator: torch.Generator):
    """Endless random ``[batch, block]`` windows (long), order fixed by ``generator``."""
    while True:
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + block] for s in starts.tolist()]).long()


def tiny_gpt2(layers: int = 2, width: int = 64, heads: int = 4, block: int = 64, seed: int = 0) -> nn.Module:
    """A byte-level GPT-2 (``transformers.GPT2LMHeadModel``) built from a config, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256, n_positions=block, n_embd=width, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Next-byte cross-entropy of a causal LM on ``tokens``."""
    return model(input_ids=tokens, labels=tokens).loss


class TextLMTask:
    """Pre-train a byte-level GPT-2 on ``stdlib`` source, LoRA-adapt (PEFT) it to ``pydoc`` text.

    Full fine-tuning on ``pydoc`` is the reference; held-out loss on the last 10 % of ``pydoc``.
    """

    name = "textlm"

    def __init__(self, rank: int = 8, width: int = 64, layers: int = 2, block: int = 64, batch: int = 16,
                 pretrain_steps: int = 600, max_bytes: int = 2_000_000, eval_batches: int = 8,
                 device: str = "cpu") -> None:
        self.rank, self.width, self.layers, self.block, self.batch = rank, width, layers, block, batch
        self.pretrain_steps, self.max_bytes, self.eval_batches = pretrain_steps, max_bytes, eval_batches
        self.device = torch.device(device)
        self._base: dict[int, nn.Module] = {}

    def setup(self, seed: int) -> None:
        self.train, self.test = split(load_corpus("pydoc", self.max_bytes))
        if seed not in self._base:
            model = tiny_gpt2(layers=self.layers, width=self.width, block=self.block, seed=seed).to(self.device)
            source = load_corpus("stdlib", self.max_bytes)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
            batches = batch_iterator(source, self.block, self.batch, torch.Generator().manual_seed(seed))
            for _ in range(self.pretrain_steps):
                opt.zero_grad()
                lm_loss(model, next(batches).to(self.device)).backward()
                opt.step()
            self._base[seed] = model

    def lora_model(self, seed: int) -> nn.Module:
        import copy
        import warnings

        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        config = LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=["c_attn", "c_proj", "c_fc"],
                            lora_dropout=0.0, fan_in_fan_out=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(copy.deepcopy(self._base[seed]), config)

    def full_model(self, seed: int) -> nn.Module:
        import copy

        return copy.deepcopy(self._base[seed])

    def batches(self, seed: int):
        return batch_iterator(self.train, self.block, self.batch, torch.Generator().manual_seed(10_000 + seed))

    @staticmethod
    def loss(model: nn.Module, batch: Tensor) -> Tensor:
        return lm_loss(model, batch)

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        batches = batch_iterator(self.test, self.block, self.batch, torch.Generator().manual_seed(2))
        device = next(model.parameters()).device
        return sum(float(lm_loss(model, next(batches).to(device))) for _ in range(self.eval_batches)) / self.eval_batches
