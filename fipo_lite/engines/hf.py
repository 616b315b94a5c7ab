"""A plain PyTorch rollout engine over a Hugging Face causal LM: batched, n samples per prompt,
stop at EOS. Runs wherever the model runs (CPU and GPU).

It is a lean decode loop over the model's own forward with its KV cache, not `generate`: on a small
model `generate`'s per-token bookkeeping costs more than the model, and a row that has stopped is
dropped from the batch (with its cache) instead of decoding padding until the longest row ends,
which matters when short and long answers share a batch. What is sampled is exactly what the run's
settings say and nothing a checkpoint's generation_config.json holds: logits / temperature, then
top-k, then top-p (transformers' warper order and semantics), renormalised. The sampler log-probs
are those of that distribution, as vLLM's `processed_logprobs`.

With `merge_lora` the engine samples from its own copy of the model with the LoRA update merged
into the weights (W + s * B @ A, rebuilt from the live adapter at every `sync`): the same
distribution up to float rounding, without peft's per-layer detour at every decoded token. The
copy costs one more set of weights, so "auto" uses it only on CPU with unquantized weights.
"""

from __future__ import annotations

import copy

import torch

from .base import Rollout, SamplingParams

MERGE_LORA = ("auto", "true", "false")  # rollout.merge_lora


class HFEngine:
    def __init__(self, model, tokenizer, generation_batch_size: int = 64, merge_lora: str = "false"):
        if merge_lora not in MERGE_LORA:
            raise ValueError(f"merge_lora must be one of {MERGE_LORA}, got {merge_lora!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(generation_batch_size))
        self.eos_ids = self._eos_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.sampler = None  # the merged copy, when used
        lora = _lora_layers(model.get_base_model()) if hasattr(model, "get_base_model") else []
        if lora and merge_lora == "true" and not _float_weights(model):
            raise ValueError("rollout.merge_lora=true needs float weights to merge the adapter into, but this model is "
                             "quantized (e.g. model.backend=bnb4 or unsloth): use rollout.merge_lora=auto or false")
        if lora and (merge_lora == "true" or (merge_lora == "auto" and _mergeable_on_cpu(model))):
            self.sampler = copy.deepcopy(model.get_base_model()).eval().requires_grad_(False)
            self._merged = []  # (live LoRA layer, the copy's plain layer that holds W + s * B @ A)
            for name, layer in lora:
                parent_name, _, child = name.rpartition(".")
                parent = self.sampler.get_submodule(parent_name)
                plain = getattr(parent, child).base_layer
                setattr(parent, child, plain)
                self._merged.append((layer, plain))
            self.sync(None)

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

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        rows = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(params.n)]
        out = Rollout(prompt_index=[], prompt_ids=[], response_ids=[], truncated=[], sampler_logprobs=[] if params.logprobs else None)
        model = self.sampler if self.sampler is not None else self.model
        was_training = model.training
        model.eval()
        try:
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s : s + self.batch_size]
                tokens, logps = self._decode(model, [p for _, p in chunk], params)
                for (i, p), toks, lps in zip(chunk, tokens, logps):
                    out.prompt_index.append(i)
                    out.prompt_ids.append(list(p))
                    out.response_ids.append(toks)
                    out.truncated.append(toks[-1] not in self.eos_ids)
                    if params.logprobs:
                        out.sampler_logprobs.append(lps)
        finally:
            model.train(was_training)
        return out

    def _decode(self, model, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], list[list[float]]]:
        """Sample up to max_new_tokens per prompt; each row stops after its first EOS."""
        B, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[r, width - len(p) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        position = (attn.cumsum(-1) - 1).clamp(min=0)  # as the trainer's Policy.logprobs, under left padding
        eos = torch.tensor(self.eos_ids, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        live = torch.arange(B, device=self.device)  # the original row of each row still decoding
        out = model(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=True, logits_to_keep=1)
        cache, next_pos = out.past_key_values, position[:, -1] + 1
        for t in range(params.max_new_tokens):
            scores = process_logits(out.logits[:, -1].float(), params)
            tok = torch.multinomial(scores.softmax(-1), 1)  # [live, 1]
            lp = scores.log_softmax(-1).gather(-1, tok).squeeze(-1) if params.logprobs else None
            for r, v in zip(live.tolist(), tok.squeeze(-1).tolist()):
                tokens[r].append(v)
            if lp is not None:
                for r, v in zip(live.tolist(), lp.tolist()):
                    logps[r].append(v)
            going = ~torch.isin(tok.squeeze(-1), eos)
            if t == params.max_new_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):  # drop the rows that stopped, cache included
                keep = going.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, tok, attn, next_pos = live[keep], tok[keep], attn[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
            out = model(input_ids=tok, attention_mask=attn, position_ids=next_pos.unsqueeze(-1), past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
        return tokens, logps

    @torch.no_grad()
    def sync(self, policy) -> None:
        """Without a merged copy, nothing: sampling uses the training model's live weights. With
        one, rebuild each merged weight from the base weight and the current adapter."""
        if self.sampler is None:
            return
        for layer, plain in self._merged:
            w = layer.base_layer.weight
            plain.weight.copy_(w + _lora_delta(layer).to(w.dtype))

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits / temperature, then top-k, then top-p (the smallest set whose probability reaches
    top_p, at least one token), as transformers' sampling warpers; removed tokens get -inf."""
    scores = logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - params.top_p
        drop_sorted[..., -1:] = False  # keep at least the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -float("inf"))
    return scores


def _lora_layers(module) -> list:
    """(name, layer) of every peft LoRA layer inside `module`."""
    return [(n, m) for n, m in module.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")]


def _lora_delta(layer) -> torch.Tensor:
    """s * B @ A of a LoRA layer, summed over its active adapters (zero when none is active)."""
    own = {**layer.lora_A, **getattr(layer, "lora_embedding_A", {})}
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in own]
    return sum(deltas) if deltas else torch.zeros_like(layer.base_layer.weight)


def _float_weights(model) -> bool:
    """No quantized (integer-stored) weights: the adapter can be merged into every one."""
    return all(p.dtype.is_floating_point for p in model.parameters())


def _mergeable_on_cpu(model) -> bool:
    """CPU weights in a float dtype: a merged copy is cheap there and exact up to rounding."""
    return _float_weights(model) and all(p.device.type == "cpu" for p in model.parameters())
