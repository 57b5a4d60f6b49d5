"""A user's data set for the lab's causal-LM A/B: records in the formats TRL documents, read, split and tokenised.

Formats (each record one JSON object; the first record decides, every record must have the same fields):

* ``{"text": ...}``: language modelling, loss on every token;
* ``{"prompt": ..., "completion": ...}``: loss on the completion only; both strings, or both lists of chat
  messages (TRL's conversational prompt-completion: the loss is then on the completion's messages);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered by the tokenizer's chat template, loss on the
  assistant turns.  The template needs no ``{% generation %}`` markers: each assistant turn's span is found by
  rendering the conversation prefix by prefix (the turns before it with the generation prompt, then through it).

Sources: a JSON Lines file, or a folder written by ``datasets``' ``save_to_disk`` (read with ``datasets``).
:func:`split` holds out the last share of the records after a shuffle fixed by :data:`SPLIT_SEED`, which does
not change with the run's seed.  Every problem is an :class:`InputError` that names the option and the fix.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "SPLIT_SEED", "InputError", "detect_format", "encode", "encode_all", "load_records", "split"]

FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
SPLIT_SEED = 1234  # the held-out split's shuffle: the same for every run seed
IGNORE = -100  # the label of a token without loss (PyTorch's cross-entropy ignore_index)


class InputError(ValueError):
    """A bad input of the lab (a model folder, a data file, an option): found before anything trains."""


def load_records(path: str | Path, option: str = "--data") -> list[dict[str, Any]]:
    """The records of a JSON Lines file or of a ``datasets`` ``save_to_disk`` folder (``option`` names the
    command-line option in the messages)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{option} {path}: no such file or folder")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise InputError(f"{option} {path}: a folder, but not one written by datasets' save_to_disk (no "
                             "dataset_info.json or dataset_dict.json); pass a .jsonl file or such a folder")
        from .extras import require

        datasets = require("datasets", f"{option} {path} (a save_to_disk folder)")
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            name = "train" if "train" in data else next(iter(data))
            data = data[name]
        return [dict(row) for row in data]
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                where = f"{err.msg.removesuffix(' at')} at column {err.colno}"  # (json's "…character at" ends there)
                raise InputError(f"{option} {path}: line {number} is not JSON ({where}); the file must be "
                                 "JSON Lines, one object per line") from None
            if not isinstance(record, dict):
                raise InputError(f"{option} {path}: line {number} is a JSON {type(record).__name__}, not an "
                                 "object; write one object per line, e.g. {\"text\": \"...\"}")
            records.append(record)
    if not records:
        raise InputError(f"{option} {path}: the file holds no record")
    return records


def detect_format(records: list[dict[str, Any]], option: str = "--data") -> str:
    """The format of :data:`FORMATS` that the records are in; an :class:`InputError` that names the fields
    found when they fit none, or when a record lacks the first one's fields."""
    fields = set(records[0])
    for name, needed in (("messages", FORMATS["messages"]), ("prompt_completion", FORMATS["prompt_completion"]),
                         ("text", FORMATS["text"])):
        if set(needed) <= fields:
            break
    else:
        raise InputError(f"{option}: the records have the fields {sorted(fields)}, none of the known formats: "
                         "\"text\" (language modelling), \"prompt\" + \"completion\" (loss on the completion) or "
                         "\"messages\" (chat); rename the fields")
    for i, record in enumerate(records):
        lacking = [k for k in needed if k not in record]
        if lacking:
            raise InputError(f"{option}: record {i + 1} lacks {lacking} (it has {sorted(record)}); the first "
                             f"record is in the {name} format, so every record needs {list(needed)}")
    return name


def split(records: list[dict[str, Any]], fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out): the last ``fraction`` of the records after a shuffle by :data:`SPLIT_SEED`."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"--eval-fraction {fraction}: must lie strictly between 0 and 1 (e.g. 0.1)")
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    held = int(len(records) * fraction)
    if held == 0:
        raise InputError(f"--eval-fraction {fraction} of {len(records)} records holds out no record: the held-out "
                         "split is empty; raise --eval-fraction or pass --eval-data FILE")
    cut = len(records) - held
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


def _bos(tokenizer: Any) -> list[int]:
    """The begin-of-sequence token, where the tokenizer puts one in front of a text by itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _plain(tokenizer: Any, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels of text segments ``(text, trained)`` tokenised one after the other, then the eos token."""
    ids, labels = _bos(tokenizer), []
    labels = [IGNORE] * len(ids)
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat(tokenizer: Any, messages: list[dict[str, Any]], trained_turns: set[int]) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation rendered by the chat template, loss on the turns ``trained_turns``:
    each turn's characters are where the rendering of the turns before it (with the generation prompt) ends and
    where the rendering through it ends; a token is trained when it starts inside such a span."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("--data: chat records (\"messages\", or prompt/completion as message lists) need the "
                         "tokenizer's chat template, and the model's tokenizer has none; set "
                         "tokenizer.chat_template and save it, or write the data as \"text\" or prompt/completion "
                         "strings")
    full = _render(tokenizer, messages, False)
    spans = []
    for i in sorted(trained_turns):
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(through) and len(through) >= len(before)):
            raise InputError("--data: the chat template renders a conversation's start differently once later "
                             "turns follow it, so the assistant turns cannot be told apart; write the data as "
                             "prompt/completion strings instead")
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [t if any(lo <= start < hi for lo, hi in spans) else IGNORE
              for t, (start, _) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def encode(record: dict[str, Any], fmt: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels (:data:`IGNORE` where there is no loss) of one record in format ``fmt``."""
    if fmt == "text":
        return _plain(tokenizer, [(str(record["text"]), True)])
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = [*prompt, *completion]
            return _chat(tokenizer, messages, set(range(len(prompt), len(messages))))
        return _plain(tokenizer, [(str(prompt), False), (str(completion), True)])
    messages = record["messages"]
    return _chat(tokenizer, messages, {i for i, m in enumerate(messages) if m.get("role") == "assistant"})


def encode_all(records: Iterable[dict[str, Any]], fmt: str, tokenizer: Any, max_len: int,
               what: str) -> list[tuple[list[int], list[int]]]:
    """Every record encoded and cut to its first ``max_len`` tokens; records left with no trained token are
    dropped, and none left is an :class:`InputError` (``what``: the split, for the message)."""
    rows = []
    for record in records:
        ids, labels = encode(record, fmt, tokenizer)
        ids, labels = ids[:max_len], labels[:max_len]
        if any(t != IGNORE for t in labels[1:]):  # (the first token is never predicted)
            rows.append((ids, labels))
    if not rows:
        raise InputError(f"{what}: no record has a token to train on within --max-len {max_len} (an empty "
                         "completion or assistant turn, or a prompt longer than that); raise --max-len or fix "
                         "the data")
    return rows
