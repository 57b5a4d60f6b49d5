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


def test_summary_survives_a_diverged_grid_point():
    """A (mode, lr) whose runs went non-finite ranks last, with a NaN spread, instead of crashing the summary
    (an H100 grid of psi_scaled was lost to this)."""
    from sdsopt.ablate import summarise

    runs = [{"mode": "psi", "lr": lr, "seed": seed, "eval": ev, "final_train": ev, "accuracy": 0.5}
            for lr, evals in ((1e-3, [float("inf"), 2.0]), (1e-4, [1.0, 1.5])) for seed, ev in enumerate(evals)]
    table = summarise(runs)
    assert table["psi"]["lr"] == 1e-4 and table["psi"]["eval"] == 1.25 and table["psi"]["eval_std"] == 0.25
    only_diverged = summarise(runs[:2])
    assert only_diverged["psi"]["eval"] == float("inf") and only_diverged["psi"]["eval_std"] != 0.0


def test_plots_survive_a_grid_where_every_run_diverged(tmp_path):
    """Every run NaN (an H100 psi_scaled grid before the metric fix): the plots are still written."""
    from sdsopt.ablate import plot, summarise

    nan = float("nan")
    runs = [{"mode": "psi_scaled", "lr": lr, "seed": 0, "eval": nan, "final_train": nan, "accuracy": 0.2,
             "curve": [nan, nan, nan], "metrics": []} for lr in (1e-6, 1e-5)]
    plot("minilm", runs, summarise(runs), tmp_path)
    assert (tmp_path / "loss_vs_step.png").stat().st_size > 0 and (tmp_path / "final_vs_lr.png").stat().st_size > 0
