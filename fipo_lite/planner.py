"""Will this run fit on one GPU? Pure arithmetic over the run config, before any GPU is touched.

    python -m fipo_lite plan --config configs/qwen2.5-7b-math.yaml --gpu-gb 80

Predicts the peak GPU memory of the sampler (vLLM: its `gpu_memory_utilization` share, holding
weights + KV cache; or HF generate's KV cache) and of the trainer (base weights by backend, LoRA
parameters + gradients + optimizer states, activations with or without checkpointing for one
micro-batch, one chunk of float32 logits), how the two share the card (vLLM sleep mode, Unsloth's
shared weights, or side by side), whether that fits and what to change if not.

The activation constants are estimates (bf16, SDPA/flash attention without an L^2 score matrix);
`scripts/gpu_measure.py` measures the real peaks on a GPU and prints them next to these predictions.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from .errors import UserError

GIB = 1024**3

# Published Hugging Face configs (config.json) of the Qwen2.5 family, as `transformers.Qwen2Config` fields.
QWEN25 = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False),
}
QWEN25["qwen2.5-math-7b"] = QWEN25["qwen2.5-7b"]
QWEN25["qwen2.5-math-1.5b"] = QWEN25["qwen2.5-1.5b"]

NF4_BITS_DQ = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax (double quant)
NF4_BITS = 4 + 32 / 64  # without double quantisation
CUDA_CONTEXT_GB = 1.0  # CUDA context + cuBLAS workspaces, per process
VLLM_RUNTIME_GB = 1.5  # vLLM's activation peak, CUDA graphs, sampler buffers (outside weights and KV)
VLLM_ASLEEP_GB = 0.5  # what a sleeping vLLM keeps on the GPU
FRAGMENTATION = 1.10  # caching-allocator slack on the trainer's transient tensors


@dataclass
class Arch:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one decoder layer."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        i = self.intermediate_size
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def small_params(self) -> int:
        """Biases (q, k, v) and RMSNorm weights, all layers plus the final norm: never quantised."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        return self.num_hidden_layers * (h + 2 * kv + 2 * h) + h

    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is not tied to it."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def num_params(self) -> int:
        return self.num_hidden_layers * self.layer_linear_params() + self.small_params() + self.embedding_params()

    def lora_params(self, r: int, targets) -> int:
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"lora.target_modules {unknown} are not Qwen2 projections {sorted(shapes)}")
        return self.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def kv_bytes_per_token(self, dtype_bytes: float = 2) -> float:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def act_bytes_per_token_layer(self, lora_targets=(), r: int = 0, dtype_bytes: float = 2) -> float:
        """Bytes autograd keeps per token in one decoder layer without checkpointing.

        Counted with saved-tensor hooks on a bf16 Qwen2 + peft LoRA (tests/test_planner.py re-checks it):
        fp32 copies of the two RMSNorm inputs; q, attention output, k, v; gate, up and SiLU outputs;
        and peft's fp32 copy of the input of every adapted projection (adapters run in fp32).
        """
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        shapes = self.linear_shapes()
        lora = sum(4 * (shapes[t][0] + r) for t in lora_targets)
        return 2 * 4 * h + dtype_bytes * (2 * h + 2 * kv + 3 * i) + lora


def arch_from(model_path: str, tiny=None) -> Arch:
    """A local model dir's config.json, the tiny model's settings, or the table above by model name."""
    p = Path(model_path)
    if (p / "config.json").is_file():
        c = json.loads((p / "config.json").read_text())
        return Arch(**{k: c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")},
                    tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))
    from .gguf_models import architecture, gguf_file_of

    gguf = gguf_file_of(model_path)
    if gguf is not None:  # a .gguf file or a packaged model: its metadata has the shape
        return Arch(**architecture(gguf))
    if model_path == "tiny" and tiny is not None:
        return Arch(tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.intermediate_size, vocab_size=128, tie_word_embeddings=True)
    key = p.name.lower().removesuffix("-instruct").removesuffix("-bnb-4bit").removesuffix("-unsloth")
    if key not in QWEN25:
        raise UserError(f"model.path {model_path!r}: no local config.json, not a GGUF model and not a known Qwen2.5 size "
                        f"{sorted(QWEN25)}; the planner needs the model's shape")
    return Arch(**QWEN25[key])


@dataclass
class Plan:
    gpu_gb: float
    params_b: float  # billions
    mode: str  # how sampler and trainer share the card
    sampler: dict = field(default_factory=dict)  # GiB parts
    trainer: dict = field(default_factory=dict)  # GiB parts
    peak_gb: float = 0.0
    fits: bool = False
    kv_concurrency: float = 0.0  # full-length sequences the KV cache holds at once
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return format_plan(self)


def _trainer_parts(cfg, arch: Arch) -> dict:
    m, t, lora = cfg.model, cfg.trainer, cfg.lora
    linear = arch.num_hidden_layers * arch.layer_linear_params()
    rest = arch.small_params() + arch.embedding_params()
    if m.backend == "hf":
        act_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[m.dtype]
        weights = (linear + rest) * act_bytes
    else:  # NF4 + double quant; bnb4 (prepare_model_for_kbit_training) upcasts the rest to fp32, unsloth keeps bf16
        weights = linear * NF4_BITS_DQ / 8 + rest * (4 if m.backend == "bnb4" else 2)
        act_bytes = 2  # 16-bit compute dtype
    n_lora = arch.lora_params(lora.r, lora.target_modules) if lora.enable else linear + rest
    state = 2 if t.optimizer == "paged_adamw_8bit" else 8  # Adam moments: 8-bit or fp32
    lora_bytes = n_lora * (4 + 4 + state)  # fp32 adapter weights + grads + moments
    tokens = t.max_tokens_per_micro_batch or t.micro_batch_size * (cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
    tokens = max(tokens, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)  # one sequence is never split
    per_layer = arch.act_bytes_per_token_layer(lora.target_modules if lora.enable else (), lora.r, act_bytes)
    gc = m.gradient_checkpointing or m.backend == "unsloth"  # unsloth always checkpoints
    if gc:
        kept = 0 if (m.backend == "unsloth" and m.offload_gradients) else tokens * arch.hidden_size * 2 * arch.num_hidden_layers
        acts = kept + 2 * tokens * per_layer  # + one layer recomputed, and its gradients
    else:
        acts = tokens * per_layer * arch.num_hidden_layers
    acts += 4 * tokens * arch.hidden_size * 4  # final hidden states, their gradient and d logp / dh (policy._FrozenHeadLogp)
    chunk = min(t.logprob_chunk_size, tokens)
    logits = 3 * chunk * arch.vocab_size * 4  # fp32 logits, log-softmax and softmax of one chunk (at most)
    G = 1 / GIB
    return {"weights": weights * G, "lora+optimizer": lora_bytes * G, "activations": acts * FRAGMENTATION * G,
            "logits": logits * G, "cuda_context": CUDA_CONTEXT_GB, "micro_batch_tokens": tokens}


def plan(cfg, gpu_gb: float) -> Plan:
    """Predict peak memory for `cfg` on a card with `gpu_gb` GiB."""
    if gpu_gb <= 0:
        raise ValueError(f"--gpu-gb must be > 0, got {gpu_gb}")
    arch = arch_from(cfg.model.path, cfg.model.tiny)
    r, v = cfg.rollout, cfg.rollout.vllm
    tr = _trainer_parts(cfg, arch)
    out = Plan(gpu_gb=gpu_gb, params_b=arch.num_params() / 1e9, mode="", trainer=tr)
    seq = cfg.data.max_prompt_length + r.max_new_tokens
    static = tr["weights"] + tr["lora+optimizer"] + tr["cuda_context"]
    dynamic = tr["activations"] + tr["logits"]
    kv_tok = arch.kv_bytes_per_token(2) / GIB
    if r.engine == "hf":
        seqs = min(r.generation_batch_size, r.n * cfg.trainer.train_batch_size)
        kv = seqs * seq * kv_tok
        out.mode = "hf: sampler is the trainer's model"
        out.sampler = {"kv_cache": kv}
        out.kv_concurrency = seqs
        out.peak_gb = static + max(kv, dynamic)
    else:
        share = v.gpu_memory_utilization * gpu_gb
        shared = cfg.model.backend == "unsloth"
        if shared:  # fast_inference: vLLM holds the 4-bit base weights the trainer also uses
            weights = tr["weights"]
        else:
            quant = cfg.model.backend == "bnb4" and v.quantization == "bitsandbytes"
            n_lin = arch.num_hidden_layers * arch.layer_linear_params()
            weights = ((n_lin * NF4_BITS_DQ / 8 + (arch.small_params() + arch.embedding_params()) * 2) if quant else arch.num_params() * 2) / GIB
        lora_slots = (arch.lora_params(v.max_lora_rank, cfg.lora.target_modules) * 2 / GIB) if cfg.lora.enable else 0.0
        kv = share - weights - lora_slots - VLLM_RUNTIME_GB
        out.kv_concurrency = max(kv, 0) / (seq * kv_tok)
        out.sampler = {"share": share, "weights": weights, "lora_slots": lora_slots, "kv_cache": max(kv, 0.0)}
        if kv <= 0:
            out.problems.append(f"vLLM's share ({share:.1f} GiB) does not hold its weights ({weights:.1f} GiB): no room for a KV cache")
        elif out.kv_concurrency < 1:
            out.problems.append(f"the KV cache ({kv:.1f} GiB) holds {out.kv_concurrency:.2f} of one {seq}-token sequence")
        if shared:
            out.mode = "vllm+unsloth: shared 4-bit weights, sampler stays resident"
            out.peak_gb = share + (static - tr["weights"]) + dynamic
        elif v.enable_sleep_mode:
            out.mode = "vllm sleep mode: sampler offloads weights and drops its KV cache while training"
            out.peak_gb = max(static + share, static + dynamic + VLLM_ASLEEP_GB)
        else:
            out.mode = "vllm side by side: sampler and trainer both resident"
            out.peak_gb = static + share + dynamic
    out.fits = out.peak_gb <= gpu_gb and not out.problems
    if out.peak_gb > gpu_gb:
        out.problems.append(f"predicted peak {out.peak_gb:.1f} GiB > {gpu_gb:.0f} GiB")
    if not out.fits:
        out.advice = advise(cfg, out)
    return out


def advise(cfg, p: Plan) -> list[str]:
    """What to change, cheapest first."""
    m, t, r = cfg.model, cfg.trainer, cfg.rollout
    tips = []
    tr = p.trainer
    if tr["activations"] > 0.2 * p.gpu_gb and not m.gradient_checkpointing and m.backend != "unsloth":
        tips.append("model.gradient_checkpointing=true")
    if tr["micro_batch_tokens"] > cfg.data.max_prompt_length + r.max_new_tokens:
        tips.append(f"a smaller trainer.max_tokens_per_micro_batch (now {tr['micro_batch_tokens']} tokens)")
    if m.backend == "hf" and tr["weights"] > 0.25 * p.gpu_gb:
        tips.append("model.backend=bnb4 or unsloth (4-bit base weights)")
    if m.backend == "bnb4" and r.engine == "vllm":
        tips.append("model.backend=unsloth with rollout.engine=vllm shares one copy of the 4-bit weights")
    if m.backend == "hf" and m.gradient_checkpointing:
        tips.append("model.backend=unsloth offloads checkpointed activations to CPU")
    if t.optimizer == "adamw" and tr["lora+optimizer"] > 0.05 * p.gpu_gb:
        tips.append("trainer.optimizer=paged_adamw_8bit")
    if r.engine == "vllm":
        if p.sampler.get("kv_cache", 0) <= 0 or p.kv_concurrency < 1:
            tips.append("a higher rollout.vllm.gpu_memory_utilization (the sampler's share)")
        else:
            tips.append("a lower rollout.vllm.gpu_memory_utilization (the KV cache shrinks; fewer sequences decode at once)")
        if not r.vllm.enable_sleep_mode and m.backend != "unsloth":
            tips.append("rollout.vllm.enable_sleep_mode=true")
    tips.append(f"shorter responses (rollout.max_new_tokens, now {r.max_new_tokens})")
    tips.append("a larger GPU, or a smaller model")
    return tips


def format_plan(p: Plan) -> str:
    lines = [f"model: {p.params_b:.2f}B parameters   GPU: {p.gpu_gb:.0f} GiB   {p.mode}", "sampler (GiB):"]
    lines += [f"  {k:<16}{v:8.2f}" for k, v in p.sampler.items()]
    if p.kv_concurrency:
        lines.append(f"  {'full-length seqs at once':<16} {p.kv_concurrency:.1f}")
    lines.append("trainer (GiB):")
    lines += [f"  {k:<16}{v:8.2f}" if k != "micro_batch_tokens" else f"  {k:<16}{v:8d} tokens" for k, v in p.trainer.items()]
    lines.append(f"predicted peak: {p.peak_gb:.1f} GiB -> {'fits' if p.fits else 'DOES NOT FIT'}")
    lines += [f"  problem: {x}" for x in p.problems]
    lines += [f"  try: {x}" for x in p.advice]
    return "\n".join(lines)


def main(argv=None) -> int:
    from .config import load_config

    ap = argparse.ArgumentParser(prog="fipo_lite plan", description="Predict peak GPU memory of a run config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpu-gb", type=float, required=True, help="GPU memory in GiB (e.g. 80, 24)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)
    p = plan(load_config(args.config, args.overrides), args.gpu_gb)
    print(json.dumps(asdict(p), indent=2) if args.json else format_plan(p))
    return 0 if p.fits else 1
