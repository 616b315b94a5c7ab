"""Data loaders: the real verl parquet files, JSONL in both schemas, and malformed input."""

from __future__ import annotations

import json

import pytest

from fipo_lite.data import load_examples


def test_verl_parquet_files_load(shared_data_dir):
    aime = load_examples(str(shared_data_dir / "aime-2024.parquet"))
    assert len(aime) == 30 and {e.data_source for e in aime} == {"aime24"}
    assert aime[0].prompt[0]["role"] == "user" and "\\boxed{}" in aime[0].prompt[0]["content"]
    assert aime[0].ground_truth == "204" and "025" in [e.ground_truth for e in aime]  # zero-padded truths are kept as text
    assert aime[0].extra["split"] == "val" and [e.index for e in aime] == list(range(30))
    dapo = load_examples(str(shared_data_dir / "dapo-math-sample16.parquet"), n=5)
    assert [e.ground_truth for e in dapo] == ["34", "113", "-3", "3", "37"]
    assert dapo[0].data_source == "math_dapo_cispo_cold_start_model"


def test_jsonl_flat_and_verl_rows_and_n(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+1", "answer": 2, "level": 3, "tags": ["easy"]},
            {"prompt": [{"role": "user", "content": "2+2"}], "reward_model": {"ground_truth": "4"}, "data_source": "x",
             "extra_info": {"id": 7}},
            {"prompt": "3+3", "ground_truth": "6"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = load_examples(str(f))
    assert [e.ground_truth for e in ex] == ["2", "4", "6"]
    assert ex[0].prompt == [{"role": "user", "content": "1+1"}] and ex[0].data_source == "unknown"
    assert ex[1].data_source == "x" and ex[1].extra == {"id": 7}
    assert ex[0].extra == {"level": 3, "tags": ["easy"]} and ex[2].extra == {}  # a row's other fields reach the reward
    assert [e.ground_truth for e in load_examples(str(f), n=2)] == ["2", "4"]


def test_synthetic_spec_delegates_to_tasks():
    train = load_examples("synthetic:addition", n=4, seed=0, split="train")
    val = load_examples("synthetic:addition", n=4, seed=0, split="val")
    assert len(train) == 4 and all(e.data_source == "synthetic/addition" for e in train)
    assert {e.prompt[0]["content"] for e in train}.isdisjoint(e.prompt[0]["content"] for e in val)


@pytest.mark.parametrize("row,msg", [
    ({"prompt": 5, "answer": 1}, "'prompt' must be"),
    ({"prompt": [], "answer": 1}, "'prompt' must be"),
    ({"prompt": [{"role": "user"}], "answer": 1}, "'role' and 'content'"),
    ({"prompt": "hi"}, "no ground truth"),
    ({"prompt": "hi", "reward_model": {"ground_truth": ["a"]}}, "no ground truth"),
    ({"prompt": "hi", "answer": 1, "data_source": 3}, "'data_source' must be a string"),
    ([1, 2], "expected an object"),
])
def test_malformed_rows_name_file_and_row(tmp_path, row, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "answer": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: row 1: .*{msg}"):
        load_examples(str(f))


def test_malformed_parquet_row_names_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "a"}], "answer": "1"},
                                         {"prompt": [{"role": "user", "content": "b"}], "answer": None}]), f)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: no ground truth"):
        load_examples(str(f))
    assert len(load_examples(str(f), n=1)) == 1  # n limits the rows read


def test_bad_files_and_specs(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "a", "answer": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 1 \(line 2\) is not valid JSON"):
        load_examples(str(f))
    with pytest.raises(ValueError, match="not found"):
        load_examples(str(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: cannot read as parquet"):
        load_examples(str(tmp_path / "junk.parquet"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_examples(str(tmp_path / "d.csv"))
    with pytest.raises(ValueError, match="n must be >= 1"):
        load_examples(str(f), n=0)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        load_examples("synthetic:nope", n=2)


def test_mul2x1_task_for_pretrained_models():
    from fipo_lite.rewards import exact_reward
    from fipo_lite.tasks import classify_form, get_task, make_examples

    train, val = make_examples("mul2x1", None, seed=0), make_examples("mul2x1", None, seed=0, split="val")
    assert len(train) + len(val) == 90 * 8 and len(val) >= 64  # the whole space, a held-out set of >= 64
    assert not {e.prompt[0]["content"] for e in train} & {e.prompt[0]["content"] for e in val}
    ex = val[0]
    a, b = ex.extra["a"], ex.extra["b"]
    assert ex.prompt[0]["content"] == f"What is {a} * {b}?" and ex.ground_truth == str(a * b)
    assert exact_reward(f"Sure! {a} * {b} = {a * b}.", ex.ground_truth)[1]
    assert not exact_reward(f"{a} * {b} = {a * b + 1}", ex.ground_truth)[1]
    assert classify_form(f"answer {a * b}", get_task("mul2x1")) == "other"  # no answer forms to count


def test_system_prompt_and_chat_template_kwargs_reach_the_template(tiny_model_dir):
    from fipo_lite.backends.hf import load_tokenizer
    from fipo_lite.config import load_config
    from fipo_lite.data import encode_prompt, prompt_template

    tok = load_tokenizer(str(tiny_model_dir))
    user = [{"role": "user", "content": "1+1"}]
    text = lambda ids: tok.decode(ids)  # noqa: E731
    assert "system" not in text(encode_prompt(tok, user))
    with_sys = text(encode_prompt(tok, user, system_prompt="Be brief."))
    assert with_sys.index("system\nBe brief.") < with_sys.index("user\n1+1")
    own = [{"role": "system", "content": "Mine."}, *user]  # a prompt with its own system message keeps it
    assert encode_prompt(tok, own, system_prompt="Be brief.") == encode_prompt(tok, own)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}")
    cfg = load_config(None, ["data.system_prompt=S", "data.chat_template_kwargs={enable_thinking: false}"])
    template = prompt_template(cfg.data)
    assert template == {"system_prompt": "S", "chat_template_kwargs": {"enable_thinking": False}}
    assert text(encode_prompt(tok, user, **template)) == "S1+1<no_think>"
    assert text(encode_prompt(tok, user)) == "1+1"
    assert prompt_template(load_config(None, []).data) == {"system_prompt": None, "chat_template_kwargs": None}


def test_a_datasets_dataset_without_the_extra_is_one_line(monkeypatch):
    import sys

    from fipo_lite.data import DataError

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs the 'datasets' package.*pip install -e '\.\[datasets\]'"):
        load_examples("hf:someone/some-set")


def test_a_datasets_dataset_with_prompt_and_answer_keys(tmp_path, monkeypatch):
    pytest.importorskip("datasets")  # the datasets extra (the main lane has it)
    from fipo_lite.data import DataError, set_name

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local files only: no network
    folder = tmp_path / "qa"
    folder.mkdir()
    rows = [{"question": f"{i}+1=", "solution": i + 1, "level": i} for i in range(4)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = dict(prompt_key="question", answer_key="solution")
    spec = {"path": "json", "data_files": str(folder / "train.jsonl"), "split": "train", "cache_dir": str(tmp_path / "cache")}
    ex = load_examples(spec, n=3, **keys)
    assert [e.ground_truth for e in ex] == ["1", "2", "3"] and ex[1].prompt == [{"role": "user", "content": "1+1="}]
    assert ex[1].extra == {"level": 1} and set_name(spec, ex) == "train"
    # hf:NAME[:SPLIT] (here a local folder of data files; a hub name the same way); no split named: the only one
    assert [e.ground_truth for e in load_examples(f"hf:{folder}", **keys)] == ["1", "2", "3", "4"]
    assert len(load_examples(f"hf:{folder}:train", n=2, **keys)) == 2
    with pytest.raises(DataError, match=r"row 0: no 'prompt' field \(data\.prompt_key"):
        load_examples(spec)
    with pytest.raises(DataError, match=r"row 0: no ground truth \(need 'answer' \(data\.answer_key\)\)"):
        load_examples(spec, prompt_key="question", answer_key="answer")
    with pytest.raises(DataError, match=r"dataset json: load_dataset\(.*\) failed"):
        load_examples({"path": "json", "data_files": str(tmp_path / "none.jsonl"), "split": "train"})
