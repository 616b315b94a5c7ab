"""Evaluation (spec section 11): k samples per problem at temperature 1.0, top-p 0.7.

avg@k = mean accuracy; cons@k = accuracy of the majority extracted answer; pass@k = the unbiased
estimator 1 - C(n-c, k) / C(n, k). Used by the loop for periodic evaluation and by the command

    python -m fipo_lite evaluate --model PATH_OR_CHECKPOINT --data FILE -k 32
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from . import metrics as M
from .engines.base import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a stable product
        miss *= 1.0 - k / i
    return 1.0 - miss


def cons_at_k(preds: list, accs: list[float]) -> float:
    """Accuracy of the most frequent extracted answer (None never votes); a tie goes to the answer
    seen first. 0 when no sample produced an answer."""
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(p for p in preds if p is not None and votes[p] == best)
    return float(next(a for p, a in zip(preds, accs) if p == winner))


def summarize(rows: list[dict], k: int) -> dict[str, float]:
    """Mean of the per-problem metrics plus response-length statistics, under fipo_lite.metrics names."""
    if not rows:
        raise ValueError("no problems to summarize")
    lengths = [L for r in rows for L in r["lengths"]]
    out = {
        M.VAL_AVG: sum(r["avg_at_k"] for r in rows) / len(rows),
        M.VAL_PASS: sum(r["pass_at_k"] for r in rows) / len(rows),
        M.VAL_CONS: sum(r["cons_at_k"] for r in rows) / len(rows),
        M.VAL_LENGTH: sum(lengths) / len(lengths),
        "val/k": float(k),
        "val/num_problems": float(len(rows)),
    }
    out.update({f"val/{key.split('/', 1)[1]}": v for key, v in M.length_stats(lengths).items() if key != M.LENGTH["mean"]})
    return out


def evaluate_rollouts(engine, tokenizer, examples, k: int, params: SamplingParams, reward_fn, prompt_ids=None,
                      ) -> tuple[dict[str, float], list[dict]]:
    """Sample `params.n` (>= k) responses per example with any RolloutEngine, score, and summarize."""
    if params.n < k:
        raise ValueError(f"need at least k={k} samples per problem, got params.n={params.n}")
    if prompt_ids is None:
        prompt_ids = [tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=True) for e in examples]
    ro = engine.generate(prompt_ids, params)
    texts = tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
    ex = [examples[i] for i in ro.prompt_index]
    rew = reward_fn(texts, [e.ground_truth for e in ex], [e.data_source for e in ex], ro.response_lengths)
    rows = []
    for p, example in enumerate(examples):
        idx = [i for i, q in enumerate(ro.prompt_index) if q == p]
        accs = [rew.accs[i] for i in idx]
        preds = [rew.preds[i] for i in idx]
        rows.append({
            "index": example.index, "data_source": example.data_source, "ground_truth": example.ground_truth,
            "preds": preds, "accs": accs, "lengths": [ro.response_lengths[i] for i in idx],
            "truncated": [ro.truncated[i] for i in idx],
            "avg_at_k": sum(accs) / len(accs), "pass_at_k": pass_at_k(len(accs), int(sum(a > 0 for a in accs)), k),
            "cons_at_k": cons_at_k(preds, accs), "responses": [texts[i] for i in idx],
        })
    summary = summarize(rows, k)
    if rew.failures:
        summary["val/reward_failures"] = float(rew.failures)
    return summary, rows


# ----------------------------------------------------------------------------- command
def load_for_eval(model_path: str, device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False):
    """A model dir, or a training checkpoint (its `adapter/` names the base model), plus tokenizer."""
    from transformers import AutoModelForCausalLM

    from .backends.hf import DTYPES, load_tokenizer, resolve_device

    p = Path(model_path)
    if (p / "checkpoints").is_dir():  # a run directory: take its latest checkpoint
        from .checkpoint import find_latest

        latest = find_latest(p / "checkpoints")
        if latest is None:
            raise ValueError(f"{p} is a run directory without checkpoints")
        p = latest
    adapter = p / "adapter" if (p / "adapter" / "adapter_config.json").exists() else p if (p / "adapter_config.json").exists() else None
    dev = resolve_device(device)
    if adapter is not None:
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        tok = load_tokenizer(base, trust_remote_code)
    else:
        from .backends.hf import check_model_path

        check_model_path(model_path, "--model")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        tok = load_tokenizer(model_path, trust_remote_code)
    return model.to(dev).eval(), tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fipo_lite evaluate", description="avg@k, pass@k and cons@k of a model on a dataset.")
    ap.add_argument("--model", required=True, help="HF model dir or hub name, a checkpoint dir, or a run dir (latest checkpoint)")
    ap.add_argument("--data", required=True, help="synthetic:NAME, a .jsonl file or a verl-format .parquet file")
    ap.add_argument("-k", type=int, default=32, help="samples per problem (default 32, as in the paper)")
    ap.add_argument("--n-samples", type=int, default=None, help="samples drawn per problem for pass@k (default k)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--n-problems", type=int, default=None, help="evaluate only the first N problems")
    ap.add_argument("--reward", default="auto", help="auto | exact | dapo_math | boxed")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=64, help="HF engine generation batch (sequences)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for per_problem.jsonl and summary.json")
    args = ap.parse_args(argv)

    import torch

    from .config import RewardConfig
    from .data import load_examples
    from .rewards import RewardRunner

    try:
        examples = load_examples(args.data, n=args.n_problems, seed=args.seed, split="val")
        if not examples:
            raise ValueError(f"{args.data} has no problems")
        reward_fn = RewardRunner(RewardConfig(name=args.reward), max_response_length=args.max_new_tokens)
        n = args.n_samples or args.k
        params = SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
        if args.engine == "vllm":
            from .engines.vllm import VLLMEngine

            from .config import load_config

            cfg = load_config(None, [f"model.path={args.model}", "rollout.engine=vllm", f"seed={args.seed}"])
            from .backends.hf import load_tokenizer

            tok = load_tokenizer(args.model)
            engine = VLLMEngine(cfg, tok)
        else:
            from .engines.hf import HFEngine

            model, tok = load_for_eval(args.model, args.device, args.dtype)
            engine = HFEngine(model, tok, args.batch_size)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    summary, rows = evaluate_rollouts(engine, tok, examples, args.k, params, reward_fn)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "per_problem.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0
