"""Measure peak GPU memory and speed of fipo_lite's training step and HF sampling, next to the planner.

Builds randomly initialised Qwen2.5 architectures from their published configs (no hub download),
saves them locally, loads them through fipo_lite's own backends (hf bf16, bnb4 NF4), and measures
one LoRA training step (gradient checkpointing, chunked log-probs) on micro-batches of long
responses, plus `HFEngine` sampling throughput. Every case is written to JSON with the planner's
prediction beside the measurement.

    python scripts/gpu_measure.py --out gpu_measure.json                 # on a GPU: 0.5B, 1.5B bf16, 7B 4-bit
    python scripts/gpu_measure.py --dry-run --out /tmp/m.json            # CPU, tiny model: exercises the code path
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

CASES = {  # name -> (planner arch key, backend, dtype)
    "0.5b-bf16": ("qwen2.5-0.5b", "hf", "bfloat16"),
    "1.5b-bf16": ("qwen2.5-1.5b", "hf", "bfloat16"),
    "7b-nf4": ("qwen2.5-7b", "bnb4", "bfloat16"),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=1024, tie_word_embeddings=True)


def save_random_model(arch: dict, path: Path, dtype: torch.dtype) -> Path:
    """Random weights in the published architecture + the kit's char tokenizer (ids only matter here)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fipo_lite.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(**arch, max_position_embeddings=32768, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model in fp32 would need 30 GB of RAM
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def run_config(model_dir: Path, backend: str, dtype: str, device: str, a):
    from fipo_lite.config import load_config

    return load_config(None, [
        f"model.path={model_dir}", f"model.backend={backend}", f"model.dtype={dtype}", f"model.device={device}",
        "model.gradient_checkpointing=true", f"lora.r={a.lora_r}", f"lora.alpha={2 * a.lora_r}",
        f"data.max_prompt_length={a.prompt_len}", f"rollout.max_new_tokens={a.response_len}", "rollout.engine=hf",
        f"rollout.generation_batch_size={a.sample_batch}", f"trainer.micro_batch_size={a.micro_batch}",
        f"trainer.max_tokens_per_micro_batch={a.micro_batch * (a.prompt_len + a.response_len)}",
        f"trainer.logprob_chunk_size={a.chunk}", f"trainer.optimizer={'paged_adamw_8bit' if backend == 'bnb4' else 'adamw'}",
    ])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_case(name: str, arch: dict, backend: str, dtype: str, device: str, a, workdir: Path) -> dict:
    from fipo_lite import planner
    from fipo_lite.backends import load_model
    from fipo_lite.engines.base import SamplingParams
    from fipo_lite.engines.hf import HFEngine
    from fipo_lite.policy import Policy, SeqBatch
    from fipo_lite.trainer import make_optimizer

    model_dir = save_random_model(arch, workdir / name, getattr(torch, dtype))
    cfg = run_config(model_dir, backend, dtype, device, a)
    pred = planner.plan(cfg, a.gpu_gb)
    gpu = device == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, tok = load_model(cfg)
    policy = Policy(model, tok, cfg.trainer.logprob_chunk_size)
    opt = make_optimizer(policy.trainable_parameters(), cfg)
    g = torch.Generator().manual_seed(0)
    V = arch["vocab_size"]
    prompts = [torch.randint(3, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.micro_batch)]
    responses = [torch.randint(3, V, (a.response_len,), generator=g).tolist() for _ in range(a.micro_batch)]
    batch = SeqBatch.from_lists(prompts, responses, tok.pad_token_id)
    static = torch.cuda.memory_allocated() / planner.GIB if gpu else 0.0
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.warmup + a.iters):
        sync(device)
        t0 = time.perf_counter()
        logp, _ = policy.logprobs(batch)
        loss = -(logp * batch.response_mask.to(logp.device)).sum() / batch.response_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = sum(times[a.warmup:]) / a.iters
    train = dict(step_s=step_s, tokens_per_s=a.micro_batch * (a.prompt_len + a.response_len) / step_s,
                 loss_finite=bool(torch.isfinite(loss).item()))
    if gpu:
        train.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / planner.GIB,
                     peak_reserved_gb=torch.cuda.max_memory_reserved() / planner.GIB, static_allocated_gb=static)
    t = pred.trainer
    train["predicted_static_gb"] = t["weights"] + t["lora+optimizer"]
    train["predicted_peak_gb"] = t["weights"] + t["lora+optimizer"] + t["activations"] + t["logits"]  # no CUDA context: not in allocated
    if gpu:
        train["peak_over_predicted"] = train["peak_allocated_gb"] / train["predicted_peak_gb"]

    engine = HFEngine(model, tok, a.sample_batch)
    sp = SamplingParams(n=a.sample_n, max_new_tokens=a.sample_tokens, temperature=1.0)
    # sample_batch sequences in all: sample_batch / sample_n prompts of their own (not the training micro-batch's)
    sample_prompts = [torch.randint(3, V, (a.sample_prompt_len,), generator=g).tolist() for _ in range(max(1, a.sample_batch // a.sample_n))]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    ro = engine.generate(sample_prompts, sp)
    sync(device)
    dt = time.perf_counter() - t0
    sample = dict(seconds=dt, sequences=len(ro), new_tokens=sum(ro.response_lengths), tokens_per_s=sum(ro.response_lengths) / dt)
    if gpu:
        sample["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / planner.GIB
    kv_pred = len(ro) * (a.sample_prompt_len + a.sample_tokens) * planner.arch_from(str(model_dir)).kv_bytes_per_token(2 if dtype != "float32" else 4) / planner.GIB
    sample["predicted_kv_gb"] = kv_pred
    del model, policy, opt, engine
    if gpu:
        torch.cuda.empty_cache()
    return dict(case=name, backend=backend, dtype=dtype, params_b=pred.params_b, micro_batch=a.micro_batch,
                prompt_len=a.prompt_len, response_len=a.response_len, lora_r=a.lora_r, train=train, sample=sample)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny random Qwen2, short sequences: checks the code path")
    ap.add_argument("--gpu-gb", type=float, default=None, help="card size for the planner (default: this GPU's)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--response-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--sample-batch", type=int, default=64, help="sequences per HF generate call")
    ap.add_argument("--sample-n", type=int, default=8)
    ap.add_argument("--sample-prompt-len", type=int, default=256)
    ap.add_argument("--sample-tokens", type=int, default=512)
    a = ap.parse_args(argv)
    results = dict(torch=torch.__version__, device="cpu", cases=[])
    if a.dry_run:
        a.prompt_len, a.response_len, a.micro_batch, a.chunk, a.warmup, a.iters = 8, 24, 2, 16, 0, 1
        a.sample_batch, a.sample_n, a.sample_prompt_len, a.sample_tokens = 8, 2, 8, 8
        a.gpu_gb = a.gpu_gb or 80.0
        cases = {"tiny-fp32": (TINY, "hf", "float32")}
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or use --dry-run to check the code path on CPU")
        from fipo_lite import planner

        device = "cuda"
        results["device"] = torch.cuda.get_device_name()
        a.gpu_gb = a.gpu_gb or torch.cuda.get_device_properties(0).total_memory / planner.GIB
        wanted = [c for c in a.cases.split(",") if c]
        unknown = [c for c in wanted if c not in CASES]
        if unknown:
            raise ValueError(f"unknown --cases {unknown}; choose from {list(CASES)}")
        cases = {c: (planner.QWEN25[CASES[c][0]], *CASES[c][1:]) for c in wanted}
    results["gpu_gb"] = a.gpu_gb
    out = Path(a.out)
    with tempfile.TemporaryDirectory(prefix="fipo_measure_") as tmp:
        for name, (arch, backend, dtype) in cases.items():
            try:
                r = measure_case(name, arch, backend, dtype, device, a, Path(tmp))
            except Exception as e:  # one failing backend should not lose the other measurements
                r = dict(case=name, backend=backend, error=f"{type(e).__name__}: {e}")
            results["cases"].append(r)
            print(json.dumps(r), flush=True)
            out.write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in c for c in results["cases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
