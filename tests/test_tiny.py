"""The tiny model, its tokenizer and the synthetic addition task."""

from __future__ import annotations

import time

import pytest
import torch

from fipo_lite import tasks
from fipo_lite.config import load_config
from fipo_lite.tiny import build_tiny, build_tokenizer


def test_tokenizer_round_trips_and_chat_template():
    tok = build_tokenizer()
    text = "47+85\n7+5=12\nanswer 132 \\boxed{x}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert len(tok) < 128
    ids = tok.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids) == "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    unknown = tok("€", add_special_tokens=False)["input_ids"]  # unknown chars do not crash: one <unk> per UTF-8 byte
    assert unknown and set(unknown) == {tok.unk_token_id}


def test_random_tiny_loads_through_from_pretrained(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    out = model(torch.tensor([tok("12+3", add_special_tokens=False)["input_ids"]]))
    assert out.logits.shape[-1] == model.config.vocab_size
    # transformers 5.x (and vLLM through it) rebuild a Qwen2Tokenizer from the saved vocab: it must
    # encode and decode exactly as the tokenizer the model was trained with (spaces and newlines too).
    built = build_tokenizer()
    text = "47+85\n7 + 5=12\n\nanswer  132"
    assert tok(text, add_special_tokens=False)["input_ids"] == built(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": "12 + 3\nx"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == built.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids) == built.decode(ids)


def _cfg(cache, **kw):
    base = {"model.cache_dir": str(cache), "model.tiny.hidden_size": 32, "model.tiny.num_layers": 1,
            "model.tiny.intermediate_size": 64, "model.tiny.warm_start_steps": 3, "model.tiny.warm_start_batch_size": 4}
    base.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in base.items()]).model


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_build_tiny_caches_and_is_deterministic(tmp_path):
    quiet = lambda msg: None  # noqa: E731
    a = build_tiny(_cfg(tmp_path / "a"), log=quiet)
    t0 = time.time()
    assert build_tiny(_cfg(tmp_path / "a"), log=quiet) == a  # cached
    assert time.time() - t0 < 1.0
    b = build_tiny(_cfg(tmp_path / "b"), log=quiet)
    c = build_tiny(_cfg(tmp_path / "c", **{"model.tiny.seed": 1}), log=quiet)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert not list(tmp_path.glob("a/.tmp-*"))  # no temp dirs left behind


def test_warm_start_learns_the_answer_format(tiny_warm_model_dir):
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import load_tokenizer
    from fipo_lite.tiny import measure_forms

    model = AutoModelForCausalLM.from_pretrained(tiny_warm_model_dir)
    stats = measure_forms(model, load_tokenizer(str(tiny_warm_model_dir)), n=32, max_new_tokens=32)
    assert stats["share/direct"] + stats["share/steps"] > 0.5  # mostly well-formed answers of either form


def test_addition_splits_are_disjoint_and_deterministic():
    train = {(e.extra["a"], e.extra["b"]) for e in tasks.make_examples("addition", None, seed=0, split="train")}
    val = {(e.extra["a"], e.extra["b"]) for e in tasks.make_examples("addition", None, seed=0, split="val")}
    assert train and val and not train & val
    assert len(train) + len(val) == 90 * 90
    a = tasks.make_examples("addition", 10, seed=3)
    assert [e.ground_truth for e in a] == [e.ground_truth for e in tasks.make_examples("addition", 10, seed=3)]
    assert [e.ground_truth for e in a] != [e.ground_truth for e in tasks.make_examples("addition", 10, seed=4)]
    assert a[0].prompt[0]["role"] == "user" and a[0].data_source == "synthetic/addition"


@pytest.mark.parametrize("a,b", [(47, 85), (10, 10), (99, 99), (123, 989)])
def test_both_forms_end_with_the_answer(a, b):
    import re

    task = tasks.get_task("addition")
    for form in tasks.FORMS:
        text = tasks.format_response(task, (a, b), form)
        assert int(re.findall(r"-?\d+", text)[-1]) == a + b
        assert tasks.classify_form(text, task) == form
    steps = tasks.format_response(task, (a, b), "steps")
    assert len(steps) > len(tasks.format_response(task, (a, b), "direct"))
    assert steps.split("\n")[0] == f"{a % 10}+{b % 10}={a % 10 + b % 10}"


def test_classify_form_rejects_malformed_and_bad_names():
    assert tasks.classify_form("7+5=12\nanswer") == "other"
    assert tasks.classify_form("hello\nanswer 12") == "other"
    assert tasks.classify_form("") == "other"
    with pytest.raises(ValueError, match="unknown synthetic task"):
        tasks.make_examples("subtraction", 3, seed=0)
    with pytest.raises(ValueError, match="form"):
        tasks.format_response(tasks.get_task("addition"), (1, 2), "long")


def test_building_does_not_disturb_the_callers_rng(tmp_path):
    """A run that builds the tiny model must continue exactly like a run that finds it cached."""
    torch.manual_seed(123)
    build_tiny(_cfg(tmp_path / "fresh"), log=lambda msg: None)
    after_build = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(_cfg(tmp_path / "fresh"), log=lambda msg: None)  # cached now
    after_cache = torch.rand(3)
    assert torch.equal(after_build, after_cache)


def test_the_default_tiny_model_ships_with_the_package():
    """The demo's model (default settings) is the shipped one: no build, the same weights on every
    machine. Fails when the defaults change and nobody re-ran `build-tiny --ship`."""
    from fipo_lite.config import ModelConfig
    from fipo_lite.tiny import SHIPPED_DIR, TinyModelConfig, shipped_tiny

    assert shipped_tiny(TinyModelConfig()) == SHIPPED_DIR
    t0 = time.time()
    assert build_tiny(ModelConfig(cache_dir="/nonexistent/never/written"), log=None) == SHIPPED_DIR
    assert time.time() - t0 < 5.0
    assert shipped_tiny(TinyModelConfig(seed=1)) is None  # other settings are built, not taken from the package


def test_the_shipped_model_loads_in_this_lane():
    """Shipped from one transformers major, loaded under either: same tokenizer ids as the builder's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_lite.tiny import SHIPPED_DIR

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_DIR)
    tok = AutoTokenizer.from_pretrained(SHIPPED_DIR)
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    built = build_tokenizer()
    chat = [{"role": "user", "content": "123 + 456\nx"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == built.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_build_tiny_ship_records_and_verifies(tmp_path, monkeypatch):
    """`build-tiny --ship` copies a build with its command, versions and hashes; a damaged file is refused
    by name; --rebuild builds here even where a shipped model applies."""
    import json

    from fipo_lite.errors import UserError
    from fipo_lite.tiny import BUILD_INFO, ship_tiny, shipped_tiny

    cfg = _cfg(tmp_path / "cache")
    built = build_tiny(cfg, log=lambda msg: None)
    dest = ship_tiny(built, tmp_path / "assets" / "tiny", command="python -m fipo_lite build-tiny --ship x=1")
    info = json.loads((dest / BUILD_INFO).read_text())
    assert info["command"].endswith("x=1") and info["built_with"]["torch"] == torch.__version__
    assert set(info["sha256"]) == {p.name for p in built.iterdir() if p.name != BUILD_INFO}
    assert shipped_tiny(cfg.tiny, root=dest) == dest
    assert torch.equal(_weights(dest)["model.embed_tokens.weight"], _weights(built)["model.embed_tokens.weight"])
    ship_tiny(built, dest)  # shipping again replaces the directory whole
    assert not list((tmp_path / "assets").glob(".*"))
    monkeypatch.setattr("fipo_lite.tiny.SHIPPED_DIR", dest)
    assert build_tiny(cfg, log=lambda msg: None) == dest
    assert build_tiny(cfg, log=lambda msg: None, rebuild=True) == built
    data = bytearray((dest / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (dest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged: model.safetensors"):
        shipped_tiny(cfg.tiny, root=dest)
