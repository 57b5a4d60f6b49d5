"""benchmarks/delta_alignment.py: its measures against hand computations (QR projections instead of SVDs, s·B·A
from the modules), its layer matching (hand-written LoRA and PEFT), and the script end to end on digits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "delta_alignment.py"
spec = importlib.util.spec_from_file_location("delta_alignment", SCRIPT)
da = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = da  # (dataclasses look their module up there)
spec.loader.exec_module(da)

UNIT = ("captured", "captured_best", "cos2_left", "cos2_right", "cos2")


def projector(M: torch.Tensor) -> torch.Tensor:
    Q = torch.linalg.qr(M.double()).Q
    return Q @ Q.T


def test_alignment_own_subspaces_and_bounds():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    dm, df = B @ A, torch.randn(20, 12, generator=gen, dtype=torch.float64)
    own = da.alignment(dm, dm, 3)
    for key in ("captured", "captured_best", "cos2_left", "cos2_right", "cosine", "norm_ratio"):
        assert own[key] == pytest.approx(1.0, abs=1e-10), key
    assert own["stable_rank"] <= 3 + 1e-9
    m = da.alignment(dm, df, 3)
    assert all(0 <= m[k] <= 1 + 1e-12 for k in ("captured", "captured_best", "cos2_left", "cos2_right"))
    assert m["captured"] <= m["captured_best"] + 1e-12  # no rank-3 pair beats df's own top-3 subspaces
    hand = (projector(B) @ df @ projector(A.T)).square().sum() / df.square().sum()
    assert m["captured"] == pytest.approx(float(hand), rel=1e-10)
    assert da.alignment(df, df, 12)["captured"] == pytest.approx(1.0)  # all of df in its own (full-rank) subspaces
    S, U, V = da.top(df, 3)
    fast = da.lowrank_alignment(B, A, 0.5, da.Snapshot(df, U, V))
    slow = da.alignment(0.5 * B @ A, df, 3)
    for key in ("captured", "cos2_left", "cos2_right", "cosine", "norm_ratio", "stable_rank"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-9), key


@pytest.mark.slow  # runs the lab (sdsopt.lab)
def test_recorded_values_equal_hand_computations():
    pytest.importorskip("sklearn")
    from sdsopt.lab.runs import RunConfig, run_one
    from sdsopt.lab.tasks import TaskConfig, make_task

    task = make_task(TaskConfig(name="digits", rank=2, pretrain_steps=5))
    task.setup(0)
    layers = da.match_layers(task.lora_model(0), task.full_model(0))
    assert [layer.weight for layer in layers] == ["0.weight", "2.weight", "4.weight"]
    config = RunConfig(steps=4, schedule="cosine", warmup_ratio=0.25, metrics_every=0)
    steps, snaps, full_rec, rec, models = {2, 4}, {}, [], [], {}

    def keep(hook, name):
        def on_step(step, model, opt):
            hook(step, model, opt)
            models[name] = model
        return on_step

    run_one(task, "full", 1e-3, 0, config, on_step=keep(da.full_hook(layers, steps, snaps, 2, full_rec), "full"))
    run_one(task, "lora", 1e-2, 0, config, on_step=keep(da.lora_hook(layers, steps, snaps, rec), "lora"))
    assert [r["step"] for r in rec] == [2, 4] and [r["step"] for r in full_rec] == [2, 4]
    start, full, lora = task.full_model(0), models["full"], models["lora"]
    captured, norms, norm_B = [], [], []
    for i, layer in zip((0, 2, 4), layers):
        df = (full[i].weight - start[i].weight).detach().double()
        assert torch.allclose(snaps[4][layer.weight].delta.double(), df, atol=1e-6)
        B, A = lora[i].lora_B["default"].weight.detach().double(), lora[i].lora_A["default"].weight.detach().double()
        direct = lora[i].scaling * B @ A
        assert torch.equal(da.lora_delta(lora[i], layer.scale), direct)
        captured.append(float((projector(B) @ df @ projector(A.T)).square().sum() / df.square().sum()))
        norms.append(float(direct.norm()))
        norm_B.append(float(B.norm()))
        assert da.alignment(direct, direct, 2)["captured"] == pytest.approx(1.0, abs=1e-9)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert rec[-1]["captured"] == pytest.approx(mean(captured), rel=1e-6)
    assert rec[-1]["delta_norm"] == pytest.approx(mean(norms), rel=1e-9)
    assert rec[-1]["norm_B"] == pytest.approx(mean(norm_B), rel=1e-6)  # (float32 norm)


def test_match_layers_peft_and_mismatch():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    import copy

    model = peft.get_peft_model(copy.deepcopy(full), peft.LoraConfig(r=2, lora_alpha=8, target_modules=["0", "2"]))
    layers = da.match_layers(model, full)
    assert [(layer.weight, layer.scale) for layer in layers] == [("0.weight", 4.0), ("2.weight", 4.0)]
    with torch.no_grad():
        full[2].weight.add_(1.0)
    with pytest.raises(ValueError, match="2.weight"):
        da.match_layers(model, full)


@pytest.mark.slow  # runs the lab (sdsopt.lab)
def test_script_writes_json_and_plot(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    result = da.main(["--task", "digits", "--modes", "lora", "sds_gs", "--steps", "6", "--every", "3",
                      "--pretrain-steps", "5", "--seeds", "2", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert data["lrs"] == {"full": 1e-2, "lora": 3e-2, "sds_gs": 3e-2} == result["lrs"]
    assert [r["mode"] for r in data["runs"]] == ["full", "lora", "sds_gs"] * 2
    for run in data["runs"]:
        assert [r["step"] for r in run["records"]] == [3, 6]
        for r in run["records"]:
            keys = {"delta_norm", "stable_rank"} | ({"captured_best"} if run["mode"] == "full" else
                                                   {*UNIT[:1], *UNIT[2:], "cosine", "norm_ratio", "norm_A", "norm_B"})
            assert keys <= r.keys()
            assert all(0 <= r[k] <= 1 + 1e-9 for k in UNIT if k in r)
            assert -1 - 1e-9 <= r.get("cosine", 0) <= 1 + 1e-9 and r["stable_rank"] >= 1 - 1e-9
    assert data["summary"]["sds_gs"]["steps"][-1]["captured"]["sd"] >= 0
