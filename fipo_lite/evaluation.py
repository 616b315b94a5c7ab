"""The `evaluate` command (spec section 11): k samples per problem at temperature 1.0, top-p 0.7,

    python -m fipo_lite evaluate --model PATH_OR_CHECKPOINT --data FILE -k 32

This module is the command: argument parsing, model resolution (model dir, checkpoint or run dir) and
loading. The metrics (avg@k, pass@k, cons@k) and `evaluate_rollouts`, which the loop's periodic
evaluation shares, live in `rollout.py`.

In a notebook, `fipo_lite.evaluate(run, k=8)` runs the same command and returns its results
(`fipo_lite.api.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import encode_prompts
from .engines.base import SamplingParams
from .rollout import evaluate_rollouts


def resolve_model(model_path: str) -> tuple[str, Path | None]:
    """(base model path, adapter dir or None) for a model dir/hub name, a training checkpoint (its
    `adapter/` names the base model) or a run dir (its latest checkpoint)."""
    p = Path(model_path)
    if (p / "checkpoints").is_dir():
        from .checkpoint import of_run

        p = of_run(p)
    for adapter in (p / "adapter", p):
        if (adapter / "adapter_config.json").is_file():
            from peft import PeftConfig

            return PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path, adapter
    from .checks import check_model_path, resolve_model_path
    from .config import ModelConfig
    from .gguf_models import gguf_file_of

    if gguf_file_of(model_path) is not None:  # a .gguf file or packaged model: its cached conversion
        return resolve_model_path(ModelConfig(path=model_path)), None
    check_model_path(model_path, "--model")
    return model_path, None


def load_for_eval(model_path: str, device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False):
    """HF model (adapter merged in, if any) and tokenizer for the HF engine."""
    from transformers import AutoModelForCausalLM

    from .backends.hf import DTYPES, load_tokenizer, resolve_device

    base, adapter = resolve_model(model_path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(resolve_device(device)).eval(), load_tokenizer(base, trust_remote_code)


def vllm_engine_for_eval(base: str, adapter: Path | None, tokenizer, max_prompt_len: int, args):
    """An in-process vLLM engine for evaluation: no sleep mode, the adapter (if any) as a LoRARequest."""
    import tempfile

    from .config import load_config
    from .engines.vllm import VLLM_LORA_RANKS, VLLMEngine

    over = [f"model.path={base}", "rollout.engine=vllm", f"seed={args.seed}", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"data.max_prompt_length={max_prompt_len}",  # rollout.vllm.max_model_len is derived: prompt + response
            "rollout.vllm.enable_sleep_mode=false", f"rollout.vllm.dtype={args.dtype or 'bfloat16'}",
            f"rollout.vllm.gpu_memory_utilization={args.gpu_memory_utilization}",
            "lora.enable=true",  # the run config requires it with vLLM; a base model simply gets no LoRARequest
            f"output_dir={tempfile.mkdtemp(prefix='fipo_eval_')}"]
    if adapter is not None:
        r = int(json.loads((adapter / "adapter_config.json").read_text())["r"])
        rank = min((x for x in VLLM_LORA_RANKS if x >= r), default=None)
        if rank is None:
            raise ValueError(f"adapter rank {r} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
        over += [f"lora.r={r}", f"rollout.vllm.max_lora_rank={rank}"]
    engine = VLLMEngine(load_config(None, over), tokenizer)
    if adapter is not None:
        from vllm.lora.request import LoRARequest

        engine.lora_request = LoRARequest(lora_name="eval", lora_int_id=1, lora_path=str(adapter))
    return engine


def main(argv: list[str] | None = None) -> int:
    from .backends.hf import DTYPES
    from .engines import ENGINES
    from .rewards import reward_names

    ap = argparse.ArgumentParser(prog="fipo_lite evaluate", description="avg@k, pass@k and cons@k of a model on a dataset.")
    ap.add_argument("--model", required=True, help="HF model dir or hub name, a checkpoint dir, or a run dir (latest checkpoint)")
    ap.add_argument("--data", required=True, help="synthetic:NAME, a .jsonl file, a verl-format .parquet file or hf:NAME[:SPLIT] (datasets)")
    ap.add_argument("-k", type=int, default=32, help="samples per problem (default 32, as in the paper)")
    ap.add_argument("--n-samples", type=int, default=None, help="samples drawn per problem, >= k (default k)")
    ap.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (paper)")
    ap.add_argument("--top-p", type=float, default=0.7, help="default 0.7 (paper)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--n-problems", type=int, default=None, help="evaluate only the first N problems")
    ap.add_argument("--reward", default="auto", help=f"a built-in reward {list(reward_names())} or PATH.py:NAME, your own "
                    "function (its `correct` is the accuracy); default auto")
    ap.add_argument("--reward-timeout", type=float, default=5.0, help="seconds per reward call before it scores 0")
    ap.add_argument("--engine", default="hf", choices=ENGINES)
    ap.add_argument("--device", default="auto", help="hf engine: auto | cpu | cuda")
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: float32 (hf), bfloat16 (vllm)")
    ap.add_argument("--batch-size", type=int, default=64, help="hf engine: sequences per generate call")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm engine")
    ap.add_argument("--system-prompt", default=None, help="a system message before every prompt that has none (data.system_prompt)")
    ap.add_argument("--chat-template-kwargs", default=None, help="a JSON object of chat template variables "
                    "(data.chat_template_kwargs), e.g. '{\"enable_thinking\": false}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for per_problem.jsonl and summary.json")
    args = ap.parse_args(argv)

    import torch

    from .allocator import keep_freed_memory
    from .config import OverlongConfig, RewardConfig
    from .data import load_examples
    from .rewards import RewardRunner, absolute_spec, spec_kind

    try:
        n = args.k if args.n_samples is None else args.n_samples
        for ok, msg in [(args.k >= 1, f"-k must be >= 1, got {args.k}"), (n >= args.k, f"--n-samples ({n}) must be >= k ({args.k})"),
                        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
                        (args.n_problems is None or args.n_problems >= 1, f"--n-problems must be >= 1, got {args.n_problems}")]:
            if not ok:
                raise ValueError(msg)
        # No per-request seed: --seed seeds the engine (torch for HF, LLM(seed=...) for vLLM), and vLLM's CPU
        # build cannot rewind a per-request generator ("CPU Generator does not use offset").
        template_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else None
        if template_kwargs is not None and not isinstance(template_kwargs, dict):
            raise ValueError(f"--chat-template-kwargs must be a JSON object, got {args.chat_template_kwargs!r}")
        template = {"system_prompt": args.system_prompt, "chat_template_kwargs": template_kwargs}
        params = SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
        examples = load_examples(args.data, n=args.n_problems, seed=args.seed, split="val")
        if not examples:
            raise ValueError(f"{args.data} has no problems")
        kind = spec_kind(args.reward)
        if kind not in ("builtin", "file"):
            raise ValueError(f"--reward {args.reward!r} must be a built-in reward {list(reward_names())} or PATH.py:NAME")
        spec = {"name": args.reward} if kind == "builtin" else {"function": absolute_spec(args.reward)}
        reward_fn = RewardRunner(RewardConfig(**spec, timeout_s=args.reward_timeout, overlong=OverlongConfig(enable=False)),
                                 max_response_length=args.max_new_tokens)
        if args.engine == "vllm":
            from .backends.hf import load_tokenizer

            base, adapter = resolve_model(args.model)
            tok = load_tokenizer(base)
            prompt_ids = encode_prompts(tok, examples, **template)
            engine = vllm_engine_for_eval(base, adapter, tok, max(len(p) for p in prompt_ids), args)
        else:
            from .engines.hf import HFEngine

            model, tok = load_for_eval(args.model, args.device, args.dtype or "float32")
            prompt_ids = encode_prompts(tok, examples, **template)
            engine = HFEngine(model, tok, args.batch_size)
            keep_freed_memory("auto", engine.device.type)  # as the trainer's default: no page faults per decode step
    except (ValueError, ImportError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    summary, rows = evaluate_rollouts(engine, tok, examples, args.k, params, reward_fn, prompt_ids=prompt_ids)
    reward_fn.close()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "per_problem.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0

