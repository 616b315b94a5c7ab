"""The built-in tiny model: a small Qwen2 and a character tokenizer, built here because no hub is needed.

`build_tiny` makes a random Qwen2ForCausalLM, warm-starts it by supervised training on the
synthetic addition task (a mix of short direct answers and long digit-by-digit ones), and saves it
as an ordinary Hugging Face directory, so the rest of the kit loads it with `from_pretrained(path)`
exactly like a hub model. The result is cached under `model.cache_dir/<hash of the settings>/`.

The model of the default settings ships in the package (`fipo_lite/assets/tiny/`, a few MB, with the
command, versions and file hashes that made it), so the demo starts training at once and its results
reproduce on any machine; other settings (the tests', `model.tiny.*` overrides) are built here.

    python -m fipo_lite build-tiny [--config FILE] [model.tiny.warm_start_steps=300 ...]  (the command: tiny_cli.py)
    python -m fipo_lite build-tiny --rebuild    # build here even where the shipped model applies
    python -m fipo_lite build-tiny --ship       # rebuild and replace the shipped model (maintainers)

`TinyModelConfig` (the `model.tiny` config section) lives here with the code it configures.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import atomic_dir, file_sha256
from .errors import UserError

BUILD_VERSION = 2  # bump when the tokenizer, task format or training recipe changes
SHIPPED_DIR = Path(__file__).parent / "assets" / "tiny"
BUILD_INFO = "fipo_lite_tiny.json"  # settings and build record, in the cached and the shipped directory
PAD, BOS, EOS, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
CHARS = "0123456789+-*/=()[]{}<>,.:;!?'\"\\_^| \n" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# transformers' Qwen2 pre-tokenizer split (tokenization_qwen2.PRETOKENIZE_REGEX)
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TinyModelConfig:
    """The built-in tiny Qwen2 model and its supervised warm start (used when model.path == "tiny")."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    warm_start_steps: int = 600  # ~100 s on 2 cores: the demo's whole command stays under 3 minutes
    warm_start_batch_size: int = 64
    warm_start_lr: float = 3e-3
    direct_fraction: float = 0.2  # share of direct answers while both forms are learned
    prior_steps: int = 100  # final warm-start steps that set the form prior ...
    prior_direct_fraction: float = 0.9  # ... towards the short direct answer, so RL has room to learn "think longer"
    task: str = "addition3"  # synthetic task of fipo_lite.tasks used for the warm start
    seed: int = 0


def build_tokenizer():
    """A character-level fast tokenizer with a Qwen-style ChatML chat template (vocab < 128).

    It is a byte-level BPE without merges, built with the very pipeline of transformers' Qwen2
    tokenizer (NFC, Qwen's split regex, byte-level mapping), so the saved directory encodes the same
    ids whichever class loads it: transformers 4.x reads tokenizer.json as it is, while 5.x (and
    vLLM through it) rebuilds a `Qwen2Tokenizer` from the vocab because config.json says qwen2. Every
    character of CHARS is one byte, so its id is its position in the list, as in BUILD_VERSION 1.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_char = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *(byte_char[ch] for ch in CHARS)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, continuing_subword_prefix="", end_of_word_suffix="",
                                fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[BOS], padding_side="left", clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: Qwen2 takes none
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _bytes_to_unicode() -> dict[str, str]:
    """GPT-2's byte -> printable character table (what the byte-level pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(b): chr(c) for b, c in zip(bs, cs)}


def new_model(tok, *, seed: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.convert_tokens_to_ids(BOS), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def save_random_tiny(path, *, seed: int = 0, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 384) -> Path:
    """A randomly initialised tiny Qwen2 + tokenizer saved with save_pretrained (for tests)."""
    path = Path(path)
    tok = build_tokenizer()
    model = new_model(tok, seed=seed, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- warm start
def _sft_batch(tok, examples, forms, device):
    """Right-padded prompt+response ids with labels only on the response (and its EOS)."""
    from .data import encode_prompt
    from .tasks import format_response, task_of

    seqs, labels = [], []
    for ex, form in zip(examples, forms):
        task = task_of(ex)
        p = encode_prompt(tok, ex.prompt)
        r = tok(format_response(task, task.problem_of(ex.extra), form), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(l)], att[i, : len(s)] = torch.tensor(s), torch.tensor(l), 1
    return ids.to(device), att.to(device), lab.to(device)


def warm_start(model, tok, tiny_cfg, log=print) -> None:
    """Supervised training on a direct/steps mix: first mostly step-by-step (so that form is learned
    well), then mostly direct for `prior_steps` (so the model prefers the short, unreliable form and
    RL has something to discover)."""
    from .tasks import make_examples

    pool = make_examples(tiny_cfg.task, None, seed=tiny_cfg.seed, split="train")
    rng = random.Random(tiny_cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tiny_cfg.warm_start_lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps = tiny_cfg.warm_start_steps
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(pool, tiny_cfg.warm_start_batch_size)
        frac = tiny_cfg.prior_direct_fraction if step >= steps - tiny_cfg.prior_steps else tiny_cfg.direct_fraction
        forms = ["direct" if rng.random() < frac else "steps" for _ in batch]
        ids, att, lab = _sft_batch(tok, batch, forms, model.device)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"[tiny] warm start step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()


@torch.no_grad()
def measure_forms(model, tok, task: str = "addition", n: int = 256, seed: int = 0, temperature: float = 1.0,
                  max_new_tokens: int = 64) -> dict[str, float]:
    """Sample once per val problem; accuracy overall and by answer form, and the share of each form."""
    from .data import encode_prompt
    from .engines.base import SamplingParams
    from .engines.hf import HFEngine
    from .rewards import exact_reward  # the synthetic task's training reward
    from .tasks import classify_form, get_task, make_examples

    examples = make_examples(task, n, seed=seed, split="val")
    prompts = [encode_prompt(tok, e.prompt) for e in examples]
    torch.manual_seed(seed)
    ro = HFEngine(model, tok).generate(prompts, SamplingParams(n=1, temperature=temperature, max_new_tokens=max_new_tokens))
    texts = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
    stats = {"n": float(len(texts))}
    right_all = []
    for form in ("direct", "steps", "other"):
        idx = [i for i, t in enumerate(texts) if classify_form(t, get_task(task)) == form]
        right = [exact_reward(texts[i], examples[ro.prompt_index[i]].ground_truth)[1] for i in idx]
        right_all += right
        stats[f"share/{form}"] = len(idx) / len(texts)
        stats[f"acc/{form}"] = sum(right) / len(right) if right else float("nan")
    stats["acc/overall"] = sum(right_all) / len(texts)
    stats["mean_length"] = sum(ro.response_lengths) / len(texts)
    return stats


# ----------------------------------------------------------------------------- cached build
def settings_hash(tiny_cfg) -> str:
    from transformers import __version__ as tf_version

    # The transformers major is in the key: the directory loads under either (tests/test_tiny.py), but
    # a warm start trained under another major need not be bit-identical, and a run must not depend
    # on which lane happened to build the cache first.
    blob = json.dumps({"v": BUILD_VERSION, "tf": tf_version.split(".")[0], **asdict(tiny_cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def shipped_tiny(tiny_cfg, root: Path | None = None) -> Path | None:
    """The shipped tiny model's directory when it was built with exactly these settings, else None.

    Its files are checked against the sha256 recorded when it was shipped: a damaged install stops
    with an error rather than training a different model than the one the results came from."""
    root = Path(root or SHIPPED_DIR)
    info_path = root / BUILD_INFO
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("build_version") != BUILD_VERSION or info.get("settings") != asdict(_settings(tiny_cfg)):
        return None
    for name, digest in info.get("sha256", {}).items():
        f = root / name
        if Path(name).name != name or not f.is_file() or file_sha256(f) != digest:
            raise UserError(f"the shipped tiny model in {root} is damaged: {name} does not match the sha256 recorded "
                            "when it was shipped; reinstall fipo_lite, or build it here: python -m fipo_lite build-tiny --rebuild")
    return root


def _settings(tiny_cfg) -> TinyModelConfig:
    """The model.tiny section as a TinyModelConfig (it comes as one, or as the run config's OmegaConf node)."""
    from omegaconf import OmegaConf

    return TinyModelConfig(**OmegaConf.to_container(tiny_cfg)) if OmegaConf.is_config(tiny_cfg) else tiny_cfg


def build_tiny(model_cfg, log=None, rebuild: bool = False) -> Path:
    """The warm-started tiny model's directory: the shipped one where its settings match (unless
    `rebuild`), else built here once and cached. Atomic: temp dir + rename."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tiny_cfg = _settings(model_cfg.tiny)
    if not rebuild and (shipped := shipped_tiny(tiny_cfg)) is not None:
        return shipped
    root = Path(model_cfg.cache_dir)
    out = root / f"tiny-{settings_hash(tiny_cfg)}"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    log(f"[tiny] building the tiny model in {out} (once; cached afterwards)")
    t0 = time.time()
    tok = build_tokenizer()
    # The build seeds and draws from torch's global RNG; keep the caller's RNG untouched, so a run
    # that builds the model and a run that finds it cached continue identically.
    with torch.random.fork_rng(devices=[]):
        model = new_model(tok, seed=tiny_cfg.seed, hidden_size=tiny_cfg.hidden_size, num_layers=tiny_cfg.num_layers,
                          num_heads=tiny_cfg.num_heads, num_kv_heads=tiny_cfg.num_kv_heads,
                          intermediate_size=tiny_cfg.intermediate_size)
        if tiny_cfg.warm_start_steps > 0:
            warm_start(model, tok, tiny_cfg, log=log)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / BUILD_INFO).write_text(json.dumps({"settings": asdict(tiny_cfg), "build_version": BUILD_VERSION,
                                                            "build_seconds": round(time.time() - t0, 1)}, indent=2))
    log(f"[tiny] built in {time.time() - t0:.0f}s")
    return out


def ship_tiny(built: Path, dest: Path = SHIPPED_DIR, command: str = "python -m fipo_lite build-tiny --ship") -> Path:
    """Copy a built tiny model into `dest` (the package's shipped model) with its build record: the
    settings, the command, the versions that built it and each file's sha256. Replaces `dest` whole."""
    import transformers

    built, dest = Path(built), Path(dest)
    record = json.loads((built / BUILD_INFO).read_text())
    files = sorted(p.name for p in built.iterdir() if p.is_file() and p.name != BUILD_INFO)
    record.update(command=command, built_with={"torch": torch.__version__, "transformers": transformers.__version__,
                                               "python": platform.python_version(), "machine": platform.machine()},
                  sha256={name: file_sha256(built / name) for name in files})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ship-", dir=dest.parent))
    for name in files:
        shutil.copyfile(built / name, tmp / name)
    (tmp / BUILD_INFO).write_text(json.dumps(record, indent=2) + "\n")
    old = dest.with_name(f".old-{dest.name}")
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
