"""The README's demo runs end to end (tiny settings) and both optimizers' losses fall."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs(capsys):
    curves, evals = load("demo").main(
        ["--steps", "12", "--pretrain-steps", "5", "--batch", "4", "--block", "16", "--width", "16", "--every", "4"]
    )
    out = capsys.readouterr().out
    assert "AdamW" in out and "SDSAdamW" in out and "held-out loss" in out
    assert set(curves) == {"AdamW", "SDSAdamW"} and all(len(c) == 12 for c in curves.values())
    assert all(c[-1] < c[0] for c in curves.values())


def test_quickstart_runs():
    assert load("quickstart").main(["--steps", "30"]) < 1.5


def test_custom_lora_runs(capsys):
    load("custom_lora").main(["--steps", "20"])
    out = capsys.readouterr().out
    assert "explicit pairs: 1 pair(s)" in out and "('down', 'up')" in out


def test_peft_trainer_runs(tmp_path):
    results = load("peft_trainer").main(["--steps", "3", "--width", "16", "--block", "16", "--out", str(tmp_path)])
    assert set(results) == {"AdamW", "SDSAdamW"} and all(v > 0 for v in results.values())


def test_ablation_example_runs(tmp_path):
    table = load("ablation").main(["--steps", "5", "--out", str(tmp_path)])
    assert set(table) == {"full", "lora", "sds", "scaled"}
