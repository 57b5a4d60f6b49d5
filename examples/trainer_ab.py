"""An A/B over your own Hugging Face Trainer: lora vs sds vs LoRA+, each lr, paired seeds (sdsopt.lab.trainer_ab).

You write ``make_trainer(optimizer_cls, optimizer_kwargs, seed)``: your model with a fresh adapter (drawn after
``torch.manual_seed(seed)``), your data, ``TrainingArguments(seed=seed)``, and
``Trainer(optimizer_cls_and_kwargs=(optimizer_cls, optimizer_kwargs))``.  The lab runs it per mode × lr × seed,
reads the losses from the Trainer's logs and writes its tables.  Here: PEFT LoRA on a byte-level GPT-2 built from
a config (no download), adapted to Python's reference docs.

    python examples/trainer_ab.py [--steps 60] [--seeds 2] [--out runs/trainer_ab]

Needs the extras ``ablate`` and ``hf`` (the lab's tqdm, matplotlib; transformers, PEFT, accelerate):
``pip install ".[ablate,hf]"`` in the checkout.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from sdsopt.lab.extras import exit_if_missing
from sdsopt.lab.tasks.text import load_corpus, tiny_gpt2
from sdsopt.lab.trainer_ab import trainer_ab


def byte_windows(data: torch.Tensor, block: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive windows of ``block`` bytes as causal-LM examples (a list is a Dataset to Trainer)."""
    return [{"input_ids": w, "labels": w} for w in data[: len(data) // block * block].long().view(-1, block)]


def main(argv: list[str] | None = None) -> list[dict]:
    exit_if_missing(["transformers", "peft", "accelerate", "tqdm", "matplotlib"], "examples/trainer_ab.py")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--out", default="runs/trainer_ab")
    args = ap.parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments

    data = load_corpus("pydoc", max_bytes=120_000)
    train, held_out = byte_windows(data[:100_000], args.block), byte_windows(data[100_000:], args.block)[:32]
    base = tiny_gpt2(layers=2, width=args.width, block=args.block, seed=0)

    def make_trainer(optimizer_cls: type, optimizer_kwargs: dict, seed: int) -> Trainer:
        torch.manual_seed(seed)  # the adapter of this seed, the same for every mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(tiny_gpt2(layers=2, width=args.width, block=args.block, seed=0),
                                   LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                              fan_in_fan_out=True))
        model.base_model.model.load_state_dict(base.state_dict(), strict=False)
        training_args = TrainingArguments(output_dir=f"{args.out}/trainer", max_steps=args.steps, seed=seed,
                                          per_device_train_batch_size=16, logging_steps=1, eval_strategy="no",
                                          save_strategy="no", report_to=[], disable_tqdm=True,
                                          use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out,
                          optimizer_cls_and_kwargs=(optimizer_cls, optimizer_kwargs))
        trainer.remove_callback(PrinterCallback)  # (the lab prints the tables)
        return trainer

    return trainer_ab(make_trainer, ["lora", "sds", "loraplus16"], args.lrs, args.seeds, out=args.out,
                      name="trainer_ab")


if __name__ == "__main__":
    main()
