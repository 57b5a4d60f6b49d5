"""Every script in benchmarks/ at toy size on the CPU (seconds each), so that a refused option or a renamed
function fails here instead of in a user's run.  The CUDA-only scripts (kernel_blocks, fsdp_step) are imported
and parse their options here, and run at toy size where CUDA is present."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, timeout: int = 300) -> str:
    """Run a script as a user would: without conftest's TRITON_INTERPRET (which would run the fused kernels
    under Triton's interpreter, minutes instead of seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCH.parent, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_every_script_has_a_smoke_test():
    covered = {"e2e_step.py", "step_time.py", "profile_step.py", "psi_step.py", "long_run.py", "psi_linear.py",
               "pack_minilm.py", "kernel_blocks.py", "fsdp_step.py", "llm_sweep.py", "delta_alignment.py",
               "roofline.py", "diagnostics_cost.py", "paired.py", "gs_cost.py", "parallel_runs.py",
               "smollm_folder.py", "e2e_profile.py"}  # llm_sweep: test_smollm_task; delta_alignment: test_delta_alignment
    assert {p.name for p in BENCH.glob("*.py")} == covered


@pytest.mark.slow  # builds SmolLM2-135M's shapes (random weights) on the CPU
def test_gs_cost():
    pytest.importorskip("peft")
    out = run("gs_cost.py", "--device", "cpu", "--steps", "2", "--skip", "1", "--batch", "1", "--seq", "8",
              "--configs", "lora", "lora_gs")
    rows = [line for line in out.splitlines() if line.startswith("| lora")]
    assert len(rows) == 2 and rows[1].startswith("| lora_gs |") and rows[1].endswith("| False |")  # stopped itself


def test_the_gpu_and_checkpoint_scripts_parse():
    """parallel_runs.py needs CUDA, smollm_folder.py the SmolLM2 GGUF: their options parse / they import here."""
    assert "--procs" in run("parallel_runs.py", "--help")
    spec = importlib.util.spec_from_file_location("smollm_folder", BENCH / "smollm_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
def test_e2e_step():
    pytest.importorskip("peft")
    out = run("e2e_step.py", "--device", "cpu", "--layers", "1", "--hidden", "64", "--heads", "2", "--vocab", "256",
              "--batch", "1", "2", "--seq", "16", "--steps", "2", "--warmup", "1")
    assert out.count("ms/step") == 6 and "batch 1x16" in out and "batch 2x16" in out
    assert "below sds's 10 plain-AdamW steps" in out


@pytest.mark.slow  # builds a model and profiles its steps
def test_e2e_profile(tmp_path):
    pytest.importorskip("peft")
    tiny = ("--device", "cpu", "--layers", "1", "--hidden", "64", "--heads", "2", "--vocab", "256", "--seq", "16",
            "--ranks", "8")
    out = run("e2e_profile.py", *tiny, "--batch", "1", "--steps", "2", "--out", str(tmp_path / "split"))
    assert "AdamW fused" in out and "SDSAdamW (sds)" in out and "products" in out
    split = json.loads((tmp_path / "split" / "split.json").read_text())
    assert set(split) == {"split r8 b1"} and (tmp_path / "split" / "profile_r8_b1.txt").stat().st_size > 0
    out = run("e2e_profile.py", *tiny, "--products", "--out", str(tmp_path / "products"))
    errors = [float(e) for e in re.findall(r"tf32x3 rel.err ([0-9.e+-]+)", out)]
    assert errors and max(errors) < 1e-5  # three TF32 products keep float32's accuracy (on the CPU: IEEE anyway)
    refused = subprocess.run([sys.executable, str(BENCH / "e2e_profile.py"), *tiny, "--overlap"],
                             capture_output=True, text=True, cwd=BENCH.parent)
    assert refused.returncode == 2 and "--overlap times CUDA streams" in refused.stderr


@pytest.mark.slow  # runs the lab (sdsopt.lab)
def test_step_time(tmp_path):
    peers = ["loraplus", "rite", "peft_riemannian"] if importlib.util.find_spec("pytorch_optimizer") else []
    out = run("step_time.py", "--device", "cpu", "--shape", "small", "--ranks", "2", "--dtypes", "fp32", "bf16",
              "--steps", "1", "--warmup", "0", "--modes", "sds", "lorapro", "--peers", *peers,
              "--out", str(tmp_path / "rows.json"))
    assert "SDSAdamW sds" in out and "SDSAdamW lorapro" in out and (tmp_path / "rows.json").stat().st_size > 0
    assert all(f"peer {p}" in out for p in peers)


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
def test_roofline(tmp_path):
    out = run("roofline.py", "--device", "cpu", "--shape", "small", "--ranks", "2", "--mb", "8", "--reps", "1",
              "--steps", "1", "--out", str(tmp_path / "rows.json"))
    assert "copy bandwidth" in out and "torch path predicted" in out and (tmp_path / "rows.json").stat().st_size > 0


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
def test_profile_step():
    assert "Self CPU time total" in run("profile_step.py", "--device", "cpu", "--shape", "small", "--rank", "2",
                                        "--rows", "3")


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
def test_psi_step():
    assert "PSILoRA" in run("psi_step.py", "--device", "cpu", "--shape", "small", "--ranks", "2", "--dtypes", "fp32",
                            "--tokens", "4", "--steps", "1", "--warmup", "0")


@pytest.mark.slow  # runs the lab (sdsopt.lab)
def test_long_run(tmp_path):
    pytest.importorskip("sklearn")
    out = run("long_run.py", "--tasks", "digits", "--modes", "sds", "--dtypes", "fp32", "--steps", "4", "--log-every",
              "2", "--device", "cpu", "--out", str(tmp_path / "long.json"))
    assert "| digits | sds | fp32 |" in out


@pytest.mark.slow  # runs the lab (sdsopt.lab)
def test_psi_linear(tmp_path):
    pytest.importorskip("matplotlib")
    run("psi_linear.py", "--seeds", "1", "--steps", "3", "--out", str(tmp_path))
    assert (tmp_path / "table.md").read_text().count("|") > 10


def test_pack_minilm(tmp_path, monkeypatch):
    """The fp16 copy of a checkpoint folder: every file copied, floating weights halved, others kept."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    save_file({"w": torch.randn(3, 2), "ids": torch.arange(4)}, source / "model.safetensors")
    spec = importlib.util.spec_from_file_location("pack_minilm", BENCH / "pack_minilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "minilm_dir", lambda: source)
    module.main(str(tmp_path / "out"))
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert weights["w"].dtype == torch.float16 and weights["ids"].dtype == torch.int64
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("script", ["kernel_blocks.py", "fsdp_step.py"])
def test_cuda_scripts_parse_their_options(script):
    assert "usage" in run(script, "--help")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels' sweep needs CUDA")
def test_kernel_blocks_on_cuda():
    run("kernel_blocks.py", "--ranks", "16", "--dtypes", "fp32", "--modes", "sds", "--steps", "2", "--sweep", "adam")


def test_diagnostics_cost_smoke():
    out = run("diagnostics_cost.py", "--layers", "1", "--width", "32", "--rank", "2", "--repeats", "2", "--threads", "1")
    assert "6 pairs 32x32 r=2" in out and "| diagnostics after a tracked step |" in out


def test_paired(tmp_path):
    """paired.py on hand-made summaries: best lr by the mean over common seeds, the paired per-seed differences
    (mean ± population sd, seeds ahead) against the reference and the best peer, computed here by hand."""
    import json

    evals = {("sds", 0.01): [0.10, 0.20], ("sds", 0.03): [0.30, 0.40],
             ("loraplus4", 0.01): [0.25, 0.15], ("lora", 0.01): [0.50, 0.70], ("lora", 0.03): [0.40, 0.60]}
    for (mode, lr), values in evals.items():
        folder = tmp_path / f"{mode}-{lr}"
        folder.mkdir()
        runs = [{"mode": mode, "lr": lr, "seed": s, "eval": v} for s, v in enumerate(values)]
        json.dump({"runs": runs}, open(folder / "summary.json", "w"))
    out = run("paired.py", str(tmp_path), "--ref", "sds", "--peers", "loraplus4")
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 0.01 (edge) | 2 | 0.15 ± 0.05 |" in rows["sds"]
    assert "| 0.03 (edge) | 2 | 0.5 ± 0.1 |" in rows["lora"]
    assert "+0.35 ± 0.05 (0/2)" in rows["lora"]  # vs sds: (0.40-0.10, 0.60-0.20)
    assert "+0.3 ± 0.15 (0/2)" in rows["lora"]  # vs loraplus4: (0.40-0.25, 0.60-0.15)
    assert "-0.05 ± 0.1 (1/2)" in rows["sds"]  # vs loraplus4: (0.10-0.25, 0.20-0.15)


def test_device_stage_splits_joins_and_refuses_a_changed_file(tmp_path):
    """benchmarks/device_stage.sh on a small fake GGUF: split into the two carry folders (the wheel beside the
    second half), part1 stages the first half, join gives back the file byte for byte; a record whose sha256
    differs (or halves that do not decompress) is refused and the joined file removed."""
    import shutil

    if shutil.which("xz") is None:
        pytest.skip("split compresses with xz")
    gguf, wheel = tmp_path / "model.gguf", tmp_path / "gguf-0.0-py3-none-any.whl"
    noise = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    gguf.write_bytes(bytes(range(256)) * 300 + bytes(noise.tolist()))
    wheel.write_bytes(b"a wheel")
    env = {**os.environ, "CARRY1": str(tmp_path / "c1"), "CARRY2": str(tmp_path / "c2"),
           "STAGE": str(tmp_path / "stage")}

    def stage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(BENCH / "device_stage.sh"), *args], capture_output=True, text=True,
                              env=env, timeout=120)

    assert stage("split", str(gguf), str(wheel)).returncode == 0
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == ["smollm.gguf.xz.part1"]
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == [wheel.name, "gguf.sha256", "smollm.gguf.xz.part2"]
    assert stage("part1").returncode == 0
    shutil.copy(tmp_path / "c2" / "smollm.gguf.xz.part2", tmp_path / "stage")  # (what part2 does before joining)
    joined = tmp_path / "stage" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    done = stage("join")
    assert done.returncode == 0 and joined.read_bytes() == gguf.read_bytes(), done.stderr
    record = tmp_path / "c2" / "gguf.sha256"
    sha, size, name = record.read_text().split()
    record.write_text(f"{'0' * 64} {size} {name}\n")
    refused = stage("join")
    assert refused.returncode == 1 and "differs" in refused.stderr and not joined.exists()
    record.write_text(f"{sha} {size} {name}\n")
    (tmp_path / "stage" / "smollm.gguf.xz.part2").write_bytes(b"not the second half")
    refused = stage("join")
    assert refused.returncode == 1 and "do not decompress" in refused.stderr and not joined.exists()
