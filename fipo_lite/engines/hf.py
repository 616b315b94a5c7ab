"""Hugging Face `generate` as a rollout engine: batched, n samples per prompt, stop at EOS.

The sampler and the trainer share one model object, so `sync` has nothing to do. Every call passes
a complete `GenerationConfig`, so nothing a checkpoint's generation_config.json holds (a
repetition penalty, a default top-k, ...) changes what is sampled: samples come from the policy
under the run's temperature/top-p/top-k only. Sampler log-probs are those of the distribution each
token was drawn from (the processed scores: logits / temperature, then top-k/top-p, renormalised),
as vLLM's `processed_logprobs`.
"""

from __future__ import annotations

import torch

from .base import Rollout, SamplingParams


class HFEngine:
    def __init__(self, model, tokenizer, generation_batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(generation_batch_size))
        self.eos_ids = self._eos_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def _eos_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        if not ids:
            raise ValueError("the tokenizer has no eos_token_id: generation could never stop")
        return sorted(ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        rows = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(params.n)]
        out = Rollout(prompt_index=[], prompt_ids=[], response_ids=[], truncated=[], sampler_logprobs=[] if params.logprobs else None)
        was_training = self.model.training
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        saved = base.generation_config
        # generate() fills whatever our config leaves unset from the model's own generation config
        # (a repetition penalty, min_p, ...): make ours the model's while we sample.
        config = base.generation_config = self.generation_config(params)
        self.model.eval()
        try:
            for s in range(0, len(rows), self.batch_size):
                self._generate_chunk(rows[s : s + self.batch_size], params, config, out)
        finally:
            self.model.train(was_training)
            base.generation_config = saved
        return out

    def _generate_chunk(self, rows, params: SamplingParams, config, out: Rollout) -> None:
        width = max(len(p) for _, p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, p) in enumerate(rows):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[r, width - len(p) :] = 1
        gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                  generation_config=config)
        new = gen.sequences[:, width:].cpu()
        if params.logprobs:  # scores are after temperature and top-k/top-p (-inf outside): renormalise
            steps = torch.stack(gen.scores, dim=1).float().cpu()
            lp = steps.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        for r, (i, p) in enumerate(rows):
            toks = new[r].tolist()
            stop = next((t for t, tok in enumerate(toks) if tok in self.eos_ids), None)
            resp = toks if stop is None else toks[: stop + 1]
            out.prompt_index.append(i)
            out.prompt_ids.append(list(p))
            out.response_ids.append(resp)
            out.truncated.append(stop is None)
            if params.logprobs:
                out.sampler_logprobs.append(lp[r, : len(resp)].tolist())

    def generation_config(self, params: SamplingParams):
        """Everything generate needs, from the run's sampling settings alone."""
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else 0,
            max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            bos_token_id=getattr(self.model.config, "bos_token_id", None), use_cache=True,
            return_dict_in_generate=True, output_scores=params.logprobs,
        )

    def sync(self, policy) -> None:
        """Nothing to do: generation uses the training model's live weights."""

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass
