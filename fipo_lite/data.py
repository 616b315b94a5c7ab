"""Training and evaluation prompts: loaders that return `Example`s, and the one prompt encoder.

Loaders (JSONL, verl-format parquet, `datasets` datasets, synthetic tasks) all produce `Example`s; `encode_prompts`
applies the tokenizer's chat template to `prompt` (trainer, evaluation and the tiny model's warm
start all use it) and the reward gets `ground_truth` (and, if it asks, the prompt, `data_source` and
`extra`: a row's other fields). A bad file raises `DataError`, which the
commands print as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .example import Example
from .tasks import make_examples

__all__ = ["DataError", "Example", "data_specs", "encode_prompt", "encode_prompts", "encode_within", "load_examples", "prompt_template", "set_name"]


class DataError(UserError):
    """A data file (or spec) that cannot be read as prompts; the message names the file and row."""


HUB_PREFIX = "hf:"  # data.train / data.val = "hf:NAME" or "hf:NAME:SPLIT": a dataset of the Hugging Face hub (`datasets`)


def load_examples(spec: Any, *, n: int | None = None, seed: int = 0, split: str = "train", prompt_key: str = "prompt",
                  answer_key: str | None = None) -> list[Example]:
    """`synthetic:NAME` (n problems of that task, `split` and `seed` pick a disjoint, shuffled set), a `.jsonl` /
    verl-format `.parquet` file, or a `datasets` dataset: `hf:NAME[:SPLIT]` or a mapping of `load_dataset` arguments
    (files and datasets: their first `n` rows in order; None = all). `prompt_key` / `answer_key` (data.prompt_key,
    data.answer_key) name the columns of the prompt and the ground truth (answer_key None: reward_model.ground_truth,
    ground_truth or answer)."""
    if n is not None and n < 1:
        raise DataError(f"n must be >= 1 (or None for all rows), got {n}")
    keys = dict(prompt_key=prompt_key, answer_key=answer_key)
    if not isinstance(spec, str) or spec.startswith(HUB_PREFIX):
        where, rows = _dataset_rows(spec, n, split)
        return [_example(row, i, where, **keys) for i, row in enumerate(rows)]
    if spec.startswith("synthetic:"):
        return make_examples(spec.split(":", 1)[1], n, seed, split)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data file not found: {spec!r} (expected synthetic:NAME, a .jsonl or a .parquet file, or hf:NAME)")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)[:n]
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read as parquet: {e}") from None
        if prompt_key not in table.column_names:
            raise DataError(f"{path}: no {prompt_key!r} column (columns: {', '.join(table.column_names)}); expected verl's "
                            "schema (prompt, reward_model.ground_truth, data_source) or prompt + answer (or set data.prompt_key)")
        rows = (table if n is None else table.slice(0, n)).to_pylist()
    else:
        raise DataError(f"unsupported data file {spec!r}: use .jsonl or verl-format .parquet")
    return [_example(row, i, path, **keys) for i, row in enumerate(rows)]


def _dataset_rows(spec: Any, n: int | None, split: str) -> tuple[str, list[dict]]:
    """(a name for messages, the first n rows) of a `datasets` dataset: `hf:NAME[:SPLIT]` (SPLIT defaults to `split`:
    train / val -> the dataset's train / validation or test split) or `load_dataset` keyword arguments."""
    try:  # the optional extra (checks.require_extra's message; checks imports this module, so not through it)
        import datasets
    except ImportError:
        raise DataError("a datasets dataset in data.train / data.val needs the 'datasets' package, which is not installed: "
                        "pip install -e '.[datasets]' (in the fipo_lite checkout)") from None

    if isinstance(spec, str):
        name, _, want = spec[len(HUB_PREFIX):].partition(":")
        kwargs: dict[str, Any] = {"path": name, "split": want or None}
    else:
        kwargs = {k: v for k, v in spec.items()}
        if not isinstance(kwargs.get("path"), str):
            raise DataError(f"a datasets spec needs 'path' (load_dataset's first argument), got {kwargs!r:.120}")
    where = f"dataset {kwargs['path']}"
    try:
        ds = datasets.load_dataset(**kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError, TypeError) as e:  # DatasetNotFoundError is a FileNotFoundError
        raise DataError(f"{where}: load_dataset({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if isinstance(ds, datasets.DatasetDict):  # no split named: the one there is, else the one this set is for
        wanted = [s for s in (("train",) if split == "train" else ("validation", "test", "val")) if s in ds]
        if len(ds) != 1 and not wanted:
            raise DataError(f"{where} has splits {list(ds)}: name one (hf:NAME:SPLIT, or split: in the load_dataset arguments)")
        ds = ds[next(iter(ds))] if len(ds) == 1 else ds[wanted[0]]
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    return where, ds.to_list()


def data_specs(value: Any) -> list[Any]:
    """data.val (or data.train) as a list of specs: one spec (a string or a mapping of load_dataset arguments),
    or a list of them (several validation sets)."""
    return list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else [value]


def set_name(spec: Any, examples: list[Example]) -> str:
    """A validation set's name in its metrics (val/<name>/avg_at_k): its rows' one data_source, else the file
    stem (synthetic:NAME: NAME); '/' becomes '_' so the name stays one part of the metric's path."""
    sources = {e.data_source for e in examples}
    if len(sources) == 1 and "unknown" not in sources:
        name = sources.pop()
    elif not isinstance(spec, str):  # load_dataset("json", data_files="x.jsonl"): x; a hub dataset: path_name_split
        files = spec.get("data_files")
        name = Path(files).stem if isinstance(files, str) else "_".join(str(spec[k]) for k in ("path", "name", "split") if spec.get(k))
    elif spec.startswith(HUB_PREFIX):
        name = spec[len(HUB_PREFIX):].replace(":", "_")
    else:
        name = spec.split(":", 1)[1] if spec.startswith("synthetic:") else Path(spec).stem
    return name.replace("/", "_")


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {len(rows)} (line {i + 1}) is not valid JSON: {e.msg}") from None
            rows.append(row)
    return rows


_ROW_KEYS = frozenset({"prompt", "reward_model", "ground_truth", "answer", "data_source", "extra_info"})  # read by _example


def _example(row: Any, i: int, path: Path | str, prompt_key: str = "prompt", answer_key: str | None = None) -> Example:
    """verl schema (prompt = chat list, reward_model.ground_truth, data_source) or flat {prompt, answer}; other
    column names through prompt_key / answer_key."""
    where = f"{path}: row {i}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if prompt_key not in row:
        raise DataError(f"{where}: no {prompt_key!r} field (data.prompt_key; fields: {', '.join(map(str, row))})")
    prompt = row.get(prompt_key)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a non-empty list of chat messages or a string, got {prompt!r:.80}")
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each prompt message needs string 'role' and 'content', got {m!r:.80}")
    rm = row.get("reward_model")
    truth = rm.get("ground_truth") if isinstance(rm, dict) else None
    if answer_key is not None:
        truth = row.get(answer_key)
    elif truth is None:
        truth = row.get("ground_truth", row.get("answer"))
    if truth is None or isinstance(truth, (dict, list)):
        need = f"{answer_key!r} (data.answer_key)" if answer_key is not None else "reward_model.ground_truth, ground_truth or answer"
        raise DataError(f"{where}: no ground truth (need {need})")
    source = row.get("data_source") or "unknown"
    if not isinstance(source, str):
        raise DataError(f"{where}: 'data_source' must be a string, got {source!r:.80}")
    # the row's other fields, verl's extra_info merged in: what a reward function gets as `extra`
    extra = {k: v for k, v in row.items() if k not in _ROW_KEYS and k not in (prompt_key, answer_key)}
    if isinstance(row.get("extra_info"), dict):
        extra.update(row["extra_info"])
    return Example(prompt=[{"role": m["role"], "content": m["content"]} for m in prompt], ground_truth=str(truth),
                   data_source=source, index=i, extra=extra)


def encode_prompt(tokenizer, messages: list[dict[str, str]], *, system_prompt: str | None = None,
                  chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat template applied to `messages`, generation prompt included.
    `system_prompt` (data.system_prompt) goes first as a system message unless the prompt brings its own;
    `chat_template_kwargs` (data.chat_template_kwargs, e.g. Qwen3's enable_thinking) reach the template.
    transformers 4.x returns a list of ids, 5.x a BatchEncoding unless return_dict=False; both become a plain list."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        **dict(chat_template_kwargs or {}))
    if hasattr(ids, "keys"):  # a BatchEncoding all the same (a tokenizer that ignores return_dict)
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def encode_prompts(tokenizer, examples: list[Example], max_prompt_length: int | None = None, **template) -> list[list[int]]:
    """`encode_prompt` of every example (`template`: its system_prompt / chat_template_kwargs); a prompt
    longer than `max_prompt_length` is a DataError."""
    ids = []
    for ex in examples:
        p = encode_prompt(tokenizer, ex.prompt, **template)
        if max_prompt_length is not None and len(p) > max_prompt_length:
            raise DataError(f"prompt of example {ex.index} ({ex.data_source}) has {len(p)} tokens > "
                            f"data.max_prompt_length={max_prompt_length}; raise it, or set data.filter_overlong_prompts=true "
                            "to leave such prompts out")
        ids.append(p)
    return ids


def encode_within(tokenizer, examples: list[Example], max_prompt_length: int, *, drop_overlong: bool = True, what: str = "data.train",
                  **template) -> tuple[list[Example], list[list[int]], int]:
    """(examples, their prompt ids, how many were left out): with `drop_overlong` (data.filter_overlong_prompts, as
    verl's filter_overlong_prompts) the prompts longer than `max_prompt_length` are left out, and only a set with
    none left is a DataError; without, the first overlong prompt is."""
    ids = encode_prompts(tokenizer, examples, None if drop_overlong else max_prompt_length, **template)
    keep = [i for i, p in enumerate(ids) if len(p) <= max_prompt_length]
    if examples and not keep:
        raise DataError(f"{what}: all {len(ids)} prompts are longer than data.max_prompt_length={max_prompt_length} "
                        f"(the shortest has {min(map(len, ids))} tokens); raise data.max_prompt_length")
    return [examples[i] for i in keep], [ids[i] for i in keep], len(ids) - len(keep)


def prompt_template(data_cfg) -> dict:
    """encode_prompt's keywords from the data section (system_prompt, chat_template_kwargs)."""
    kwargs = data_cfg.chat_template_kwargs
    if kwargs is not None and hasattr(kwargs, "items"):
        kwargs = {k: v for k, v in kwargs.items()}
    return {"system_prompt": data_cfg.system_prompt or None, "chat_template_kwargs": kwargs or None}
