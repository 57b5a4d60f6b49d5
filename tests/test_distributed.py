"""SDSAdamW under DDP, FSDP2 and HSDP (2 CPU processes, gloo) against one process on the same global batch.

The ranks run ``tests/dist_worker.py`` as plain subprocesses (not ``multiprocessing`` inside pytest)
with a hard timeout, so a stuck rendezvous fails the test instead of hanging CI.  Everything is
float64, so the tolerances below measure the distributed algebra, not float32 rounding:

* DDP, FSDP2 and HSDP vs one process: ``1e-12`` absolute after 6 steps (eigh route; sums over 2 shards
  and gloo's reduction order only reorder float64 additions), ``1e-9`` for the Newton–Schulz route
  (its damped iteration, δ = 1e-11, amplifies those reorderings).
* torch.distributed.checkpoint resume: bit-exact.

``SDSOPT_DIST_DEVICE=cuda`` runs the same tests with NCCL on 2 GPUs (route ``auto`` is then
Newton–Schulz, in the reference too); CI runs them on CPUs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dist_worker as worker
from sdsopt import SDSAdamW
from sdsopt.distributed import check_pair_layout, lora_shard_placement_fn

# several processes each: outside the inner loop (pytest -m "not slow")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                                   reason="torch.distributed with gloo is not available")]
if worker.DEVICE == "cuda" and torch.cuda.device_count() < 2:  # SDSOPT_DIST_DEVICE=cuda: NCCL on 2 GPUs
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason="SDSOPT_DIST_DEVICE=cuda needs 2 GPUs")]

WORLD = 2
TIMEOUT_S = 240
DEFAULT_TOL = 1e-9 if worker.DEVICE == "cuda" else 1e-12  # on CUDA sds_polar's route "auto" is Newton–Schulz
# sds_muon: its last layer has r = 3 > min(m, n) = 1, where the matrix sign of the A path's momentum (rank 1 plus
# rounding) amplifies a 1e-15 relative change of the gradients (DDP's other summation order) ~1e3-fold (measured)
TOL = {"sds_polar_newton_schulz": 1e-9, "sds_muon": 1e-10}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(case: str, out: Path) -> dict:
    """Run ``WORLD`` ranks of the worker; return rank 0's results (fail with the ranks' output)."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), case, str(out)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{case}: the {WORLD} ranks did not finish within {TIMEOUT_S} s")
    codes = [p.returncode for p in procs]
    assert codes == [0] * WORLD, f"{case}: ranks exited with {codes}\n" + "\n".join(s[-3000:] for s in logs)
    return torch.load(out / f"{case}.pt", weights_only=False)


def _single_process(options: dict) -> dict[str, torch.Tensor]:
    model = worker.build_model()
    opt = SDSAdamW(model.named_parameters(), lr=worker.LR, **options)
    worker.train(model, opt, range(worker.STEPS))
    return worker.full_params(model)


def _assert_close(label: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys()
    start = worker.full_params(worker.build_model())
    for name in want:
        # the run moved the parameter, so agreement is not trivially the initial value
        if "lora_" in name:
            assert (want[name] - start[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=f"{label}: {name}")


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, torch.Tensor]]:
    return {label: _single_process(options) for label, options in worker.CASES}


@pytest.mark.parametrize("case", ["ddp", "fsdp"])
def test_matches_one_process(case, references, tmp_path):
    results = _launch(case, tmp_path)
    for label, _ in worker.CASES:
        _assert_close(f"{case}/{label}", results[label], references[label], TOL.get(label, DEFAULT_TOL))
    if case == "fsdp":
        _check_fsdp_extras(results)


def test_hsdp_matches_one_process(references, tmp_path):
    """HSDP (2-D mesh replicate × shard): Grams are summed over the shard dimension only."""
    results = _launch("hsdp", tmp_path)
    gram_bytes = sum(2 * r * r * 8 for r in worker.RANKS)
    for (shape, label), logs in results["collectives"].items():
        _assert_close(f"hsdp {shape}/{label}", results[(shape, label)], references[label], DEFAULT_TOL)
        calls = 2 if label == "sds_sigma" else 1
        # a shard dimension of one rank has nothing to sum: no collective at all
        expected = [("c10d.allreduce_.default", gram_bytes)] * calls if shape[1] > 1 else []
        assert all(step == expected for step in logs), f"{shape}/{label}: {logs}"
    assert len(results["collectives"]) == 4


def test_psilora_ddp_matches_one_process(tmp_path):
    """PSILoRA under DDP = one process on the global batch (G's products summed over ranks and divided by the
    world size; the metric over all rows; the clipping norm of the summed G), with the collectives the
    docstring states: per step one flag all-reduce; per bucket of equal shapes (3 here: the two (6, 6) layers
    share one) and half-sweep one of its stacked r×m or r×n products (twice with momentum) and one for the
    metric; per pair one of m×n for clipping."""
    from sdsopt import PSILoRA

    results = _launch("psi", tmp_path)
    for label, options in worker.PSI_CASES:
        model = worker.build_model()
        opt = PSILoRA(model, lr=worker.PSI_LR, **options)
        worker.train(model, opt, range(worker.STEPS))
        _assert_close(f"psi/{label}", results[label], worker.full_params(model), 1e-10)
        if options.get("max_grad_norm"):
            assert results[f"{label}_norm"] == pytest.approx(float(opt.last_grad_norm), rel=1e-12)
            assert results[f"{label}_norm"] > options["max_grad_norm"]  # the clipping was active
        sweeps = max(1, options.get("lookahead_iters", 1))
        buckets = len({(shape, r) for shape, r in zip(worker.LAYERS, worker.RANKS)})
        assert buckets == 3
        per_bucket = 2 * sweeps * (2 if options.get("momentum") else 1) + (options.get("metric") == "diagonal")
        expected = 1 + buckets * per_bucket + len(worker.RANKS) * bool(options.get("max_grad_norm"))
        for calls in results["collectives"][label]:
            # DDP's own gradient all-reduce happens in backward, outside the optimizer step
            assert [name for name, _ in calls] == ["c10d.allreduce_.default"] * expected, label


def _check_fsdp_extras(results: dict) -> None:
    # communication of the optimizer step: r×r Grams only, one all-reduce per step (two with the
    # singular-value channel) whatever the mix of ranks, never a gather of factors
    gram_bytes = sum(2 * r * r * 8 for r in worker.RANKS)  # float64 K_A and K_B of every pair, one buffer
    for label, options in worker.CASES:
        expected = [] if options.get("mode") == "lora" else [("c10d.allreduce_.default", gram_bytes)]
        if options.get("decouple_sigma"):
            expected = expected * 2  # + the stacked r×r G̃Xᵀ of both factors of every pair
        if options.get("mode") == "sds_muon":
            expected = expected * 3  # + the transport's cross-Grams and the momenta's Grams (docs/math.md (8.1), (8.3))
        # sds's last warm-up step reduces only the Grams of the pairs it re-splits (r ≤ min(m, n))
        resplit_bytes = sum(2 * r * r * 8 for (i, o), r in zip(worker.LAYERS, worker.RANKS) if r <= min(i, o))
        warmup = options.get("warmup_steps", 0)
        for step, calls in enumerate(results["collectives"][label]):
            if step < warmup - 1:  # plain AdamW: nothing to reduce
                assert calls == [], f"{label} step {step}: {calls}"
            elif step == warmup - 1:
                assert calls == [("c10d.allreduce_.default", resplit_bytes)], f"{label} step {step}: {calls}"
            else:
                assert calls == expected, f"{label} step {step}: {calls}"
    # skip_nonfinite: rank 1's NaN made both ranks skip; the result is one process that never took that step
    model = worker.build_model()
    opt = SDSAdamW(model.named_parameters(), lr=worker.LR, warmup_steps=0)
    worker.train(model, opt, [s for s in range(worker.STEPS) if s != worker.GUARD_STEP])
    _assert_close("fsdp/guard", results["guard"], worker.full_params(model), DEFAULT_TOL)
    assert results["guard_skipped"] == 1
    assert [m for m in results["guard_warnings"] if "skipped a step" in m] == [
        "SDSAdamW(skip_nonfinite=True) skipped a step: the gradient of a parameter on another rank is not finite. "
        "Parameters, moments and step counts were left as they were; further skips are counted in "
        "opt.skipped_steps without another warning."]
    # modes that need whole factors refuse with the fix named
    for mode in ("svd_oracle",):
        message = results[f"refused_{mode}"]
        assert "sharded (FSDP2)" in message and "'sds', 'sds_polar', 'scaled' or 'lora'" in message
    ours, torchs = results["adamw_parity"]
    for name, value in torchs.items():
        assert torch.equal(ours[name], value), name
    # optimizer state is sharded like the parameters; DCP resume is bit-exact
    assert results["state_placements"] == [("DTensor", "(Shard(dim=0),)"), ("DTensor", "(Shard(dim=1),)")]
    for name, value in results["dcp_uninterrupted"].items():
        assert torch.equal(results["dcp_resumed"][name], value), name


# ---------------------------------------------------------------- layout and ZeRO checks (one process)
@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A 1-rank gloo process group (file rendezvous), so DTensors can be built in-process."""
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_layout_check_names_the_fix(gloo_world_of_one):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    A = distribute_tensor(torch.randn(3, 8), mesh, [Shard(0)])  # along r: Grams are not sums of shards
    B = distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"lora_A.*Shard\(1\).*lora_shard_placement_fn"):
        check_pair_layout(A, B, "lora_A", "lora_B")
    with pytest.raises(ValueError, match="one factor is a DTensor"):
        check_pair_layout(torch.randn(3, 8), B, "lora_A", "lora_B")
    A1 = distribute_tensor(torch.randn(3, 8), mesh, [Shard(1)])
    check_pair_layout(A1, B, "lora_A", "lora_B")  # the layout SDSAdamW needs
    mesh2 = init_device_mesh("cpu", (1, 1))
    A2 = distribute_tensor(torch.randn(3, 8), mesh2, [Shard(1), Shard(1)])  # two mesh dims, as with TP
    B2 = distribute_tensor(torch.randn(6, 3), mesh2, [Replicate(), Shard(0)])
    with pytest.raises(ValueError, match=r"over one mesh dimension"):
        check_pair_layout(A2, B2, "lora_A", "lora_B")
    check_pair_layout(distribute_tensor(torch.randn(3, 8), mesh2, [Replicate(), Shard(1)]), B2, "lora_A", "lora_B")


def test_fully_shard_without_placement_fn_is_refused_at_construction(gloo_world_of_one):
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(worker.build_model())  # FSDP2's default: every parameter along dim 0, A along r
    with pytest.raises(ValueError, match=r"layers\.0\.lora_A\.default\.weight.*Shard\(1\).*lora_shard_placement_fn"):
        SDSAdamW(model.named_parameters())


def test_gradient_must_be_sharded_like_its_parameter(gloo_world_of_one):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    A = torch.nn.Parameter(distribute_tensor(torch.randn(3, 8), mesh, [Shard(1)]))
    B = torch.nn.Parameter(distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)]))
    opt = SDSAdamW([("m.lora_A.weight", A), ("m.lora_B.weight", B)])
    A.grad = distribute_tensor(torch.randn(3, 8), mesh, [Shard(1)])
    B.grad = torch.randn(6, 3)  # a plain tensor: not the parameter's layout
    with pytest.raises(ValueError, match=r"'m\.lora_B\.weight' is a DTensor.*sharded like their parameters"):
        opt.step()
    B.grad = distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)])
    opt.step()
    assert torch.isfinite(A.full_tensor()).all()


def test_placement_fn_shards_a_along_n_and_refuses_uneven():
    model = worker.build_model()
    placement = lora_shard_placement_fn(model, mesh_size=2)
    layer = model.layers[0]
    assert placement(layer.lora_A["default"].weight).dim == 1
    assert placement(layer.lora_B["default"].weight) is None  # FSDP2's default Shard(0)
    assert placement(layer.base.weight) is None
    with pytest.raises(ValueError, match=r"layers\.0\.lora_A\.default\.weight.*divisible by the mesh size 3"):
        lora_shard_placement_fn(model, mesh_size=3)(layer.lora_A["default"].weight)
    # the same pairing rules as SDSAdamW: a regex with a named group "factor"
    custom = lora_shard_placement_fn(model, pairing=r"\.lora_(?P<factor>[AB])\.default\.weight$",
                                     mesh_size=2)
    assert custom(layer.lora_A["default"].weight).dim == 1 and custom(layer.lora_B["default"].weight) is None


def test_deepspeed_zero_parameters_are_refused():
    model = worker.build_model()
    named = list(model.named_parameters())
    named[2][1].ds_id = 7  # what ZeRO-3 attaches to the parameters it partitions
    with pytest.raises(ValueError, match=r"layers\.0\.lora_A\.default\.weight.*DeepSpeed ZeRO.*DDP or FSDP2"):
        SDSAdamW(named)


def test_flattened_param_groups_are_refused():
    """ZeRO-1/2 replace a group's params by flat partitions after construction: the step says so."""
    model = worker.build_model()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2)
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in opt.param_groups[0]["params"]]))
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO flattens"):
        opt.step()
