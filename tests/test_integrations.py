"""The README's stack recipes against the real libraries (extra ``integrations``), offline: tiny models built from
configs, a tokenizer built with ``tokenizers`` from a small vocabulary, generated data.  Each test checks that the
LoRA pairs were found, that they reached coordinate steps (past a short ``warmup_steps``) and that the loss fell;
the callbacks' tests check that the diagnostics reached the stack's logs.  A missing library skips its tests."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from sdsopt import SDSAdamW

pytestmark = [pytest.mark.slow, pytest.mark.integrations]
WARMUP = 2
VOCAB = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(40)]


def assert_sds_ran(opt: SDSAdamW, pairs: int, losses: list[float]) -> None:
    """``pairs`` LoRA pairs found, every one of them in coordinate steps, and the loss down."""
    report = opt.diagnostics()
    assert len(opt.lora_pairs) == pairs and report["summary"]["pairs"] == pairs
    assert report["summary"].get("pairs_coordinates") == pairs, report["summary"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def loop(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, steps: int = 12) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- transformers / TRL: tiny Llama, offline tokenizer
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")


def tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def texts(n: int = 64) -> list[str]:
    """Counting sequences (``w3 w4 w5 …``): learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 30, (n,), generator=g).tolist()
    return [" ".join(f"w{s + k}" for k in range(10)) for s in starts]


def lora_config(**kw):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kw)


def peft_llama():
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(tiny_llama(), lora_config())


class Recorder:
    """A TrainerCallback stand-in for a reporting integration: the logs it was handed."""

    def __init__(self):
        transformers = pytest.importorskip("transformers")

        class _Cb(transformers.TrainerCallback):
            def on_log(cb, args, state, control, logs=None, **kw):  # noqa: N805
                self.logs.append(dict(logs or {}))

        self.logs: list[dict] = []
        self.callback = _Cb()


def test_transformers_trainer_with_the_diagnostics_callback(tmp_path):
    from sdsopt.integrations import SDSDiagnosticsCallback

    tok = tokenizer()
    model = peft_llama()
    data = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for ids in tok(texts())["input_ids"]]
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8,
                                          logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                                          save_strategy="no")
    recorder = Recorder()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[recorder.callback],
                                   optimizer_cls_and_kwargs=(SDSAdamW, {"lr": 1e-2, "warmup_steps": WARMUP}))
    SDSDiagnosticsCallback(every=5).install(trainer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert_sds_ran(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                   2 * 2, losses)
    logged = [h for h in trainer.state.log_history if "sds/kappa_A_max" in h]
    assert [h["step"] for h in logged] == [5, 10]
    assert all(h["sds/pairs_coordinates"] == 4 and 0 < h["sds/step_effective_rank_mean"] <= 8 for h in logged)
    seen = [entry for entry in recorder.logs if "sds/step_share_B_mean" in entry]
    assert len(seen) == 2  # the callbacks after it (the reporting ones when installed first) got the keys


def sft(tmp_path, model, peft_config):
    pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8, logging_steps=1,
                               report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no",
                               max_length=16, dataset_text_field="text")
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts()}),
                                 processing_class=tokenizer(), peft_config=peft_config,
                                 optimizer_cls_and_kwargs=(SDSAdamW, {"lr": 1e-2, "warmup_steps": WARMUP}))
        trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return opt, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trl_sft_trainer_with_peft_config(tmp_path):
    opt, losses = sft(tmp_path, tiny_llama(), lora_config())
    assert_sds_ran(opt, 2 * 2, losses)


def test_trl_sft_trainer_on_a_peft_model(tmp_path):
    opt, losses = sft(tmp_path, peft_llama(), None)
    assert_sds_ran(opt, 2 * 2, losses)


def test_accelerate_prepare():
    accelerate = pytest.importorskip("accelerate")
    from sdsopt.integrations import find_sdsadamw

    model = peft_llama()
    ids = tokenizer()(texts(16))["input_ids"]
    batch = torch.tensor(ids)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, SDSAdamW(model.parameters(), lr=1e-2, warmup_steps=WARMUP))
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        opt.step()
        losses.append(loss.item())
    assert_sds_ran(find_sdsadamw(opt), 2 * 2, losses)


# ---------------------------------------------------------------- PEFT variants on a small module
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids, img):
        h = self.emb(ids).mean(1) + self.conv(img).mean((-1, -2))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


PEFT_VARIANTS = {
    "lora": (dict(target_modules=["fc1", "fc2"]), 2),
    "dora": (dict(target_modules=["fc1", "fc2"], use_dora=True), 2),
    "rslora": (dict(target_modules=["fc1", "fc2"], use_rslora=True), 2),
    "embedding": (dict(target_modules=["emb"]), 1),
    "conv2d": (dict(target_modules=["conv"]), 1),
    "modules_to_save": (dict(target_modules=["fc1", "fc2"], modules_to_save=["head"]), 2),
    "two_adapters": (dict(target_modules=["fc1", "fc2"]), 4),
}


@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_peft_variants(variant):
    peft = pytest.importorskip("peft")
    kw, pairs = PEFT_VARIANTS[variant]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Small(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", **kw))
        if variant == "two_adapters":
            model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
            model.base_model.set_adapter(["default", "other"])  # both active and trainable
    opt = SDSAdamW(model.parameters(), lr=1e-2, warmup_steps=WARMUP)
    ids, img, y = torch.randint(0, 20, (16, 5)), torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    losses = loop(model, opt, lambda m: nn.functional.cross_entropy(m(ids, img), y), steps=15)
    assert_sds_ran(opt, pairs, losses)


# ---------------------------------------------------------------- loralib, torchtune: their own layers
def regression(make_layer):
    """Two LoRA layers of ``make_layer(n, m)`` and a regression loss."""
    torch.manual_seed(0)
    model = nn.Sequential(make_layer(12, 16), nn.Tanh(), make_layer(16, 3))
    x, y = torch.randn(64, 12), torch.randn(64, 3)
    return model, lambda m: ((m(x) - y) ** 2).mean()


def test_loralib_layers():
    loralib = pytest.importorskip("loralib")

    def layer(n, m):
        lin = loralib.Linear(n, m, r=4, lora_alpha=8)
        nn.init.normal_(lin.lora_B, std=0.1)  # loralib starts at B = 0 too; a non-zero B moves both factors at once
        return lin

    model, loss_fn = regression(layer)
    loralib.mark_only_lora_as_trainable(model)
    opt = SDSAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, warmup_steps=WARMUP)
    assert_sds_ran(opt, 2, loop(model, opt, loss_fn))


def test_torchtune_lora_linear():
    pytest.importorskip("torchao")
    peft_mod = pytest.importorskip("torchtune.modules.peft")

    model, loss_fn = regression(lambda n, m: peft_mod.LoRALinear(n, m, rank=4, alpha=8.0))
    peft_mod.set_trainable_params(model, peft_mod.get_adapter_params(model))
    opt = SDSAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, warmup_steps=WARMUP)
    assert {(p.name_a.rsplit(".", 2)[-2], p.name_b.rsplit(".", 2)[-2]) for p in opt.lora_pairs} == {("lora_a", "lora_b")}
    assert_sds_ran(opt, 2, loop(model, opt, loss_fn))


# ---------------------------------------------------------------- Lightning
def test_lightning_trainer_with_the_diagnostics_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from conftest import Net, make_data

    from sdsopt.integrations import SDSDiagnosticsLightningCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Net(zero_b=False)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = ((self.net(x) - y) ** 2).mean()
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):  # the README's recipe
            return SDSAdamW(self.parameters(), lr=1e-2, warmup_steps=WARMUP)

    x, y = make_data(n=32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module, callback = Module(), SDSDiagnosticsLightningCallback(every=4)
    logger = pl.loggers.CSVLogger(str(tmp_path))
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", logger=logger, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    trainer.fit(module, loader)
    assert_sds_ran(trainer.optimizers[0], 2, module.losses)
    assert callback.last["step"] == 12 and callback.last["sds/pairs_coordinates"] == 2
    assert 0 < callback.last["sds/step_effective_rank_min"] and "sds/step_share_B_mean" in callback.last
    assert "sds/kappa_A_max" in trainer.logged_metrics
    logger.finalize("success")
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "sds/norm_ratio_mean" in header
