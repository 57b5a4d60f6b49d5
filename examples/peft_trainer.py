"""PEFT LoRA + transformers Trainer, AdamW vs SDSAdamW, offline (GPT-2 from a config, pydoc text).

    python examples/peft_trainer.py [--steps 200] [--out runs/peft_trainer]

The Trainer builds the optimizer itself: `optimizer_cls_and_kwargs=(SDSAdamW, {"model": model, ...})`
makes it call `SDSAdamW(model, ...)`, which pairs the LoRA factors by name.

Needs the extra ``hf`` (transformers, PEFT, accelerate): ``pip install ".[hf]"`` in the checkout.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from sdsopt import SDSAdamW
from sdsopt.lab.extras import exit_if_missing
from sdsopt.lab.tasks.text import load_corpus, tiny_gpt2


class ByteWindows(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor, block: int):
        self.data, self.block = data.long(), block

    def __len__(self):
        return len(self.data) // self.block

    def __getitem__(self, i):
        x = self.data[i * self.block:(i + 1) * self.block]
        return {"input_ids": x, "labels": x}


def run(optimizer: str, args) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = tiny_gpt2(layers=2, width=args.width, block=args.block, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                                 fan_in_fan_out=True))
    data = load_corpus("pydoc", max_bytes=200_000)
    train = ByteWindows(data[:180_000], args.block)
    training_args = TrainingArguments(output_dir=f"{args.out}/{optimizer}", max_steps=args.steps, learning_rate=args.lr,
                                      per_device_train_batch_size=16, logging_steps=max(1, args.steps // 6),
                                      save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                                      seed=0, disable_tqdm=True)
    kwargs = {}
    if optimizer == "SDSAdamW":
        kwargs["optimizer_cls_and_kwargs"] = (SDSAdamW, {"model": model, "lr": args.lr, "weight_decay": 0.01})
    trainer = Trainer(model=model, args=training_args, train_dataset=train, **kwargs)
    result = trainer.train()
    return result.training_loss


def main(argv=None):
    exit_if_missing(["transformers", "peft", "accelerate"], "examples/peft_trainer.py")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--out", default="runs/peft_trainer")
    args = ap.parse_args(argv)
    results = {name: run(name, args) for name in ("AdamW", "SDSAdamW")}
    print("mean training loss:", ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
