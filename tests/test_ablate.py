"""The ablation harness end to end at tiny sizes: every task, every mode, outputs written."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from sdsopt.lab import ABLATION_MODES, RunConfig, main  # noqa: E402

pytestmark = pytest.mark.slow  # a lab test: outside the library's inner loop (pytest -m "not slow")


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
    from sdsopt.lab.report import summarise

    runs = [{"mode": "psi", "lr": lr, "seed": seed, "eval": ev, "final_train": ev, "accuracy": 0.5}
            for lr, evals in ((1e-3, [float("inf"), 2.0]), (1e-4, [1.0, 1.5])) for seed, ev in enumerate(evals)]
    table = summarise(runs)
    assert table["psi"]["lr"] == 1e-4 and table["psi"]["eval"] == 1.25 and table["psi"]["eval_std"] == 0.25
    only_diverged = summarise(runs[:2])
    assert only_diverged["psi"]["eval"] == float("inf") and only_diverged["psi"]["eval_std"] != 0.0


def test_plots_survive_a_grid_where_every_run_diverged(tmp_path):
    """Every run NaN (an H100 psi_scaled grid before the metric fix): the plots are still written."""
    from sdsopt.lab.report import plot, summarise

    nan = float("nan")
    runs = [{"mode": "psi_scaled", "lr": lr, "seed": 0, "eval": nan, "final_train": nan, "accuracy": 0.2,
             "curve": [nan, nan, nan], "metrics": []} for lr in (1e-6, 1e-5)]
    plot("minilm", runs, summarise(runs), tmp_path)
    assert (tmp_path / "loss_vs_step.png").stat().st_size > 0 and (tmp_path / "final_vs_lr.png").stat().st_size > 0


def test_schedules_follow_transformers_get_scheduler():
    """``--schedule cosine --warmup-ratio 0.1`` over 20 steps: the lr at each step is the closed form of a linear
    warm-up over ceil(2) steps then half a cosine to 0 (HF Trainer's schedule), on every optimizer of a run."""
    import math

    import torch

    pytest.importorskip("transformers")
    from sdsopt.lab.runs import make_schedulers

    args = RunConfig(schedule="cosine", warmup_ratio=0.1, steps=20)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-2)
    (scheduler,) = make_schedulers(opt, args)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    want = [1e-2 * (t / 2 if t < 2 else 0.5 * (1 + math.cos(math.pi * (t - 2) / 18))) for t in range(20)]
    assert seen == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert make_schedulers(opt, RunConfig(schedule="constant", warmup_ratio=0.0, steps=20)) == []


def test_cli_runs_the_users_recipe(tmp_path):
    """Warm-up + cosine at toy size with the peer LoRA+ and sds with the ratio (``sdsplus4``): the recipe is
    recorded in the summary and the ratio changes sds's result."""
    pytest.importorskip("transformers")
    table = main(["--task", "linear", "--steps", "8", "--lrs", "1e-2", "--modes", "loraplus4", "sdsplus4", "sds",
                  "--schedule", "cosine", "--warmup-ratio", "0.25", "--metrics-every", "0", "--m", "8", "--n", "8",
                  "--rank", "2", "--batch", "16", "--out", str(tmp_path), "--quiet"])
    assert set(table) == {"loraplus4", "sdsplus4", "sds"}
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["schedule"] == "cosine" and summary["warmup_ratio"] == 0.25
    assert table["sdsplus4"]["eval"] != table["sds"]["eval"]


@pytest.mark.filterwarnings("ignore:SDSAdamW found no LoRA pairs")
def test_gradient_started_modes_run_through_the_harness(tmp_path):
    """``<mode>_gs`` (docs/math.md (2.8)): SDSAdamW with ``gradient_start`` (sds without its warm-up), built from
    the model, which it records itself; the start changes the result of the same mode and lr."""
    from sdsopt import SDSAdamW
    from sdsopt.lab.optimizers import is_mode, make_optimizer

    assert all(map(is_mode, ("lora_gs", "loraplus16_gs", "sds_gs", "sdsplus8_gs")))
    assert not is_mode("rite_gs")
    model = __import__("torch").nn.Linear(3, 3)
    opt = make_optimizer("loraplus16_gs", model, 1e-3, (0.9, 0.999), 0.0)
    assert isinstance(opt, SDSAdamW)
    group = opt.param_groups[0]
    assert (group["mode"], group["b_lr_ratio"], group["gradient_start"]) == ("lora", 16.0, True)
    assert make_optimizer("sdsplus8_gs", model, 1e-3, (0.9, 0.999), 0.0).param_groups[0]["warmup_steps"] == 0
    table = main(["--task", "linear", "--steps", "6", "--lrs", "1e-2", "--modes", "sds", "sds_gs", "loraplus4_gs",
                  "--metrics-every", "0", "--m", "8", "--n", "8", "--rank", "2", "--batch", "16",
                  "--out", str(tmp_path), "--quiet"])
    assert set(table) == {"sds", "sds_gs", "loraplus4_gs"}
    assert table["sds_gs"]["eval"] != table["sds"]["eval"]


@pytest.mark.parametrize("steps, said", [(10, "never leaves its warm-up here: its first 10 steps are plain AdamW"),
                                         (15, "spends 10 of its 15 steps in its warm-up"), (40, None)])
def test_a_run_inside_the_warm_up_says_so(tmp_path, capsys, steps, said):
    """sds's first warmup_steps (10) are lora's AdamW: an A/B that never leaves them (or mostly stays) says so in one
    line before it trains and in the tables (issue 45: `+0 ± 0 (0/2)` and nothing else)."""
    main(["--task", "linear", "--modes", "lora", "sds", "--lrs", "1e-2", "--steps", str(steps), "--metrics-every",
          "0", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    tables = (tmp_path / "tables.md").read_text()
    if said is None:
        assert "note: mode" not in out and "note: mode" not in tables
    else:
        line = f"note: mode sds {said}"
        assert out.count(line) == 2 and tables.count(line) == 1  # (before training, and in the printed tables)
        assert "--opt warmup_steps=0" in next(x for x in out.splitlines() if x.startswith(line))
    # without a full run the table has no "gap to full closed" column, and with metrics off no metrics.csv
    assert "gap to full closed" not in tables and "| mode | best lr | held-out loss | final train loss |\n" in tables
    assert not (tmp_path / "metrics.csv").exists() and (tmp_path / "curves.csv").exists()
