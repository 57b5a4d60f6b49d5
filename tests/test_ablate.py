"""The ablation harness end to end at tiny sizes: every task, every mode, outputs written."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from sdsopt.ablate import ABLATION_MODES, main  # noqa: E402


@pytest.mark.parametrize("task,extra", [
    ("linear", ["--m", "12", "--n", "10", "--rank", "2", "--target-rank", "2", "--batch", "32"]),
    ("digits", ["--pretrain-steps", "20", "--rank", "2"]),
    ("textlm", ["--pretrain-steps", "3", "--width", "16", "--block", "16", "--rank", "2"]),
])
def test_cli_smoke(tmp_path, capsys, task, extra):
    if task == "digits":
        pytest.importorskip("sklearn")
    if task == "textlm":
        pytest.importorskip("peft")
    modes = list(ABLATION_MODES) if task == "linear" else ["full", "lora", "sds"]
    table = main(["--task", task, "--steps", "6", "--lrs", "1e-3", "1e-2", "--metrics-every", "3",
                  "--modes", *modes, "--out", str(tmp_path), "--quiet", *extra])
    assert set(table) == set(modes)
    out = capsys.readouterr().out
    assert "best lr per mode" in out and "gap to full closed" in out
    for name in ("curves.csv", "metrics.csv", "summary.json", "loss_vs_step.png", "final_vs_lr.png",
                 "metrics_vs_step.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert len(rows) == len(modes) * 2 * 6
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["table"]["lora"]["gap_closed"] == pytest.approx(0.0)
    assert summary["table"]["full"]["gap_closed"] == pytest.approx(1.0)


def test_same_seed_same_data_and_init(tmp_path):
    """Two runs of one mode at one lr and seed are identical: data order and init depend on the seed only."""
    args = ["--task", "linear", "--steps", "5", "--lrs", "1e-2", "--modes", "sds", "--metrics-every", "0",
            "--m", "8", "--n", "8", "--rank", "2", "--batch", "16", "--quiet"]
    main([*args, "--out", str(tmp_path / "a")])
    main([*args, "--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "curves.csv").read_text() == (tmp_path / "b" / "curves.csv").read_text()
