"""trainer.packed_matmul on and off, alternating in one process: a rollout and an update of the loop.

The loop's sizes (bench_loop.py: 8 prompts x 8 samples x <= 64 tokens, T = 1, LoRA r16 on all seven
projections) on one model, built once. Each round times, for "auto" (oneDNN-packed weights) and then
"false" (F.linear / MKL): one rollout of the HF engine (LoRA-merged sampler, lean decode), in
generated tokens per second, and one update pass (log-probs, entropy and backward of the lean
forward) over the round's first rollout, so both settings differentiate the same tokens. The first
round warms up and is not counted. Alternating within one process keeps a shared machine's drifts
out of the ratio, which a comparison of separate runs does not.

    python scripts/bench_packed.py [--model smollm2-135m-instruct] [--rounds 5] [--threads 2] [--out results/bench_packed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench_loop import NEW_TOKENS, PROMPTS, SAMPLES

SETTINGS = ("auto", "false")


def _has_avx512() -> bool | None:
    """Whether the CPU has AVX-512 (Linux; None elsewhere): oneDNN's and MKL's speeds depend on it."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF dir, .gguf file or smollm2-135m-instruct")
    p.add_argument("--task", default="mul2x1")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args(argv)

    import torch

    from fipo_lite import packed
    from fipo_lite.allocator import keep_freed_memory
    from fipo_lite.backends import load_model
    from fipo_lite.checks import resolve_model_path
    from fipo_lite.config import ModelConfig, load_config
    from fipo_lite.data import encode_prompts
    from fipo_lite.engines import SamplingParams, build_engine
    from fipo_lite.policy import Policy, SeqBatch, use_lean_forward
    from fipo_lite.tasks import make_examples

    torch.set_num_threads(a.threads)
    path = resolve_model_path(ModelConfig(path=a.model))
    cfg = load_config(None, [f"model.path={path}", "model.device=cpu", "lora.r=16", "lora.alpha=32",
                             f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.generation_batch_size=64"])
    model, tok = load_model(cfg)
    keep_freed_memory("auto", "cpu")  # as the trainer
    policy = Policy(model, tok, cfg.trainer.logprob_chunk_size, lean_forward=use_lean_forward("auto", model, "hf"))
    engine = build_engine(cfg, model, tok)
    prompts = encode_prompts(tok, make_examples(a.task, PROMPTS, seed=0))
    params = SamplingParams(n=SAMPLES, temperature=1.0, max_new_tokens=NEW_TOKENS, logprobs=True)
    rates: dict[str, list[float]] = {s: [] for s in SETTINGS}
    updates: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for r in range(a.rounds):
        batch = None
        for setting in SETTINGS:
            packed.set_packed_matmul(setting)
            engine.sync(policy)  # the decode step re-packs (or unpacks) its weights
            torch.manual_seed(r)
            t0 = time.perf_counter()
            ro = engine.generate(prompts, params)
            rate = sum(ro.response_lengths) / (time.perf_counter() - t0)
            if batch is None:
                batch = SeqBatch.from_lists(ro.prompt_ids, ro.response_ids, pad_id=tok.pad_token_id)
            for q in policy.trainable_parameters():
                q.grad = None
            t0 = time.perf_counter()
            logp, _ = policy.logprobs(batch, with_entropy=True)
            logp.sum().backward()
            update = time.perf_counter() - t0
            print(f"[bench_packed] round {r}: packed_matmul={setting}: sampling {rate:.0f} tokens/s, update {update:.2f} s"
                  + ("  (warm-up)" if r == 0 else ""), file=sys.stderr, flush=True)
            if r:
                rates[setting].append(rate)
                updates[setting].append(update)
    med_rate = {s: statistics.median(v) for s, v in rates.items()}
    med_update = {s: statistics.median(v) for s, v in updates.items()}
    print(f"\npacked_matmul auto vs false, medians of {a.rounds - 1} alternating rounds in one process:\n"
          f"  sampling: {med_rate['auto']:.0f} vs {med_rate['false']:.0f} tokens/s ({med_rate['auto'] / med_rate['false']:.2f}x)\n"
          f"  update:   {med_update['auto']:.2f} vs {med_update['false']:.2f} s ({med_update['auto'] / med_update['false']:.2f} of the time)")
    if a.out:
        result = {"model": a.model, "task": a.task, "threads": a.threads,
                  "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "avx512": _has_avx512(),
                              "python": platform.python_version(), "torch": torch.__version__},
                  "sampling_tokens_per_s": med_rate, "update_s": med_update, "all": {"sampling": rates, "update": updates}}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
