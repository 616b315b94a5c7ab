"""A plain PyTorch rollout engine over a Hugging Face causal LM: batched, n samples per prompt,
stop at EOS. Runs wherever the model runs (CPU and GPU).

It is a lean decode loop over the model's own forward with its KV cache, not `generate`: on a small
model `generate`'s per-token bookkeeping costs more than the model. The n samples of a prompt share
one prefill, and rows that have stopped leave the batch (with their cache) once they are an eighth of
it, instead of decoding padding until the longest row ends (short and long answers share batches).
What is sampled is exactly what the run's settings say and nothing a checkpoint's
generation_config.json holds: logits / temperature, then top-k, then top-p (transformers' warper
order and semantics), renormalised, drawn by inverting the CDF with one uniform number per row. The
sampler log-probs are those of that distribution, as vLLM's `processed_logprobs`.

With `merge_lora` the engine samples from its own copy of the model with the LoRA update merged
into the weights (W + s * B @ A, rebuilt from the live adapter at every `sync`): the same
distribution up to float rounding, without peft's per-layer detour at every decoded token. The
copy costs one more set of weights, so "auto" uses it only on CPU with unquantized weights.
With `lean_decode` the prefill and the decode steps of such plain weights run through lean.py
(Qwen2/Qwen3/Llama arithmetic without transformers' per-call overhead; "auto": on CPU).
"""

from __future__ import annotations

import copy

import torch

from .base import Rollout, SamplingParams
from ..lean import LeanDecoder, decode_unsupported

MERGE_LORA = ("auto", "true", "false")  # rollout.merge_lora
LEAN_DECODE = ("auto", "true", "false")  # rollout.lean_decode
COMPACT_AT = 8  # drop finished rows from the batch once they are 1/COMPACT_AT of it


class HFEngine:
    def __init__(self, model, tokenizer, generation_batch_size: int = 64, merge_lora: str = "false", lean_decode: str = "auto"):
        if merge_lora not in MERGE_LORA:
            raise ValueError(f"merge_lora must be one of {MERGE_LORA}, got {merge_lora!r}")
        if lean_decode not in LEAN_DECODE:
            raise ValueError(f"lean_decode must be one of {LEAN_DECODE}, got {lean_decode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(generation_batch_size))
        self.eos_ids = self._eos_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.sampler = None  # the merged copy, when used
        self.lean = None  # the lean decode step, set below once the sampling model is known
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
                # its own tensor: a tied weight (lm_head and embed_tokens) would carry W + BA into the other module too
                plain.weight = torch.nn.Parameter(plain.weight.detach().clone(), requires_grad=False)
                setattr(parent, child, plain)
                self._merged.append((layer, plain))
            self.sync(None)
        # the lean decode step (lean.py) over the model that samples: the merged copy, or a plain model
        target = self.sampler if self.sampler is not None else model
        why_not = decode_unsupported(target)
        if lean_decode == "true" and why_not:
            raise ValueError(f"rollout.lean_decode=true cannot run on this sampling model ({why_not}): use rollout.lean_decode=auto "
                             "or false" + (" (with a LoRA adapter it also needs rollout.merge_lora)" if lora and self.sampler is None else ""))
        use = lean_decode == "true" or (lean_decode == "auto" and not why_not and _mergeable_on_cpu(target))
        self.lean = LeanDecoder(target) if use else None

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
        distinct: dict[tuple, int] = {}  # the n rows of a prompt share one prefill
        index = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=self.device)
        firsts = [list(p) for p in distinct]
        ids = torch.full((len(firsts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(firsts), width), dtype=torch.long)
        for r, p in enumerate(firsts):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[r, width - len(p) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        position = (attn.cumsum(-1) - 1).clamp(min=0)  # as the trainer's Policy.logprobs, under left padding
        lean, cache = self.lean, None
        if lean is not None:
            logits = lean.prefill(ids, attn, position, params.max_new_tokens)[index]
            lean.select(index)
        else:
            out = model(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            cache.batch_select_indices(index)
            logits = out.logits[index, -1]
        attn, next_pos = attn[index], position[index, -1] + 1
        eos = torch.tensor(self.eos_ids, device=self.device)
        tokens = torch.zeros((B, params.max_new_tokens), dtype=torch.long)
        logps = torch.zeros((B, params.max_new_tokens))
        lengths = torch.full((B,), params.max_new_tokens)
        rows = torch.arange(B)  # the original row of each row of the batch
        alive = torch.ones(B, dtype=torch.bool, device=self.device)  # has not emitted EOS yet
        for t in range(params.max_new_tokens):
            scores = process_logits(logits if logits.dtype == torch.float32 else logits.float(), params)
            tok = sample_tokens(scores)
            tokens[rows, t] = tok.cpu()  # a finished row's later tokens are cut off by its length
            if params.logprobs:
                logps[rows, t] = scores.log_softmax(-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1).cpu()
            ended = alive & torch.isin(tok, eos)
            if t == params.max_new_tokens - 1:
                break
            if bool(ended.any()):
                lengths[rows[ended.cpu()]] = t + 1
                alive &= ~ended
                finished = len(alive) - int(alive.sum())
                if finished == len(alive):
                    break
                # Drop finished rows (and their cache) once they are an eighth of the batch: a copy of the
                # whole cache costs about as much as decoding a few finished rows for a few steps.
                if finished * COMPACT_AT >= len(alive):
                    keep = alive.nonzero().squeeze(-1)
                    lean.select(keep) if lean is not None else cache.batch_select_indices(keep)
                    rows, alive, tok, attn, next_pos = rows[keep.cpu()], alive[keep], tok[keep], attn[keep], next_pos[keep]
            if lean is not None:
                logits = lean.step(tok, next_pos)
            else:
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
                logits = model(input_ids=tok.unsqueeze(-1), attention_mask=attn, position_ids=next_pos.unsqueeze(-1),
                               past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        lengths = lengths.tolist()
        return ([row[:n] for row, n in zip(tokens.tolist(), lengths)],
                [row[:n] for row, n in zip(logps.tolist(), lengths)] if params.logprobs else [[] for _ in range(B)])

    @torch.no_grad()
    def sync(self, policy) -> None:
        """Without a merged copy, nothing: sampling uses the training model's live weights. With
        one, rebuild each merged weight from the base weight and the current adapter. Either way the
        lean decode step re-fuses its weights (full fine-tuning updates them in place)."""
        if self.lean is not None:
            self.lean.invalidate()
        if self.sampler is None:
            return
        for layer, plain in self._merged:
            w = layer.base_layer.weight
            plain.weight.copy_(w + _lora_delta(layer).to(w.dtype))

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def sample_tokens(scores: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores) [B, V], by inverting the CDF with one uniform number per
    row: the distribution of torch.multinomial, which draws V exponential numbers per row instead."""
    cdf = scores.softmax(-1).cumsum(-1)
    cdf = cdf / cdf[:, -1:]  # ends at exactly 1 > u, so the pick is a token of positive probability
    return torch.searchsorted(cdf, torch.rand((scores.shape[0], 1), device=scores.device), right=True).squeeze(-1)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits / temperature, then top-k, then top-p (the smallest set whose probability reaches
    top_p, at least one token), as transformers' sampling warpers; removed tokens get -inf."""
    scores = logits / params.temperature if params.temperature != 1.0 else logits
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
