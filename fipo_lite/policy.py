"""The trainable policy: token log-probs (and entropy) of responses, computed in chunks.

The LM head runs on `chunk_size` response tokens at a time, so the float32 logits of the whole batch
([tokens, vocab]) never exist at once: at 20k-token responses and a 152k vocabulary that alone would
be 12 GB per sequence. A frozen head (LoRA's case) takes the log-probs' gradient in the same pass
(_FrozenHeadLogp); a head that trains goes through autograd under activation checkpointing.

The hidden states come from transformers + peft, or, with `lean_forward` (trainer.lean_forward; "auto":
CPU, a LoRA model lean.py supports), from lean.response_states: the same sums with only the real
tokens run and each group's prompt once (tests/test_lean.py checks log-probs and LoRA gradients).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from . import lean
from .packed import Packed

LEAN_FORWARD = ("auto", "true", "false")  # trainer.lean_forward


@dataclass
class SeqBatch:
    """Prompts left-padded to P columns, responses right-padded to R columns: [B, P + R]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # [B, R], 1 on real response tokens
    prompt_width: int
    prompt_index: torch.Tensor | None = None  # [B]: which distinct prompt each row has (rows of a group share one)
    distinct_rows: torch.Tensor | None = None  # [G]: one row holding each distinct prompt

    @classmethod
    def from_lists(cls, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> "SeqBatch":
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(f"need as many prompts as responses (>0), got {len(prompts)} and {len(responses)}")
        P = max(len(p) for p in prompts)
        R = max(1, max(len(r) for r in responses))
        B = len(prompts)
        group_of: dict[tuple, int] = {}  # a distinct prompt -> its number; distinct[g]: the first row with prompt g
        index, distinct = [], []
        for b, p in enumerate(prompts):
            if tuple(p) not in group_of:
                group_of[tuple(p)] = len(distinct)
                distinct.append(b)
            index.append(group_of[tuple(p)])
        ids = torch.full((B, P + R), pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + R), dtype=torch.long)
        rmask = torch.zeros((B, R), dtype=torch.float32)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ids[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
            attn[b, P - len(p) : P + len(r)] = 1
            if r:
                ids[b, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
            rmask[b, : len(r)] = 1.0
        return cls(ids, attn, rmask, P, torch.tensor(index, dtype=torch.long), torch.tensor(distinct, dtype=torch.long))

    def to(self, device) -> "SeqBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SeqBatch(move(self.input_ids), move(self.attention_mask), move(self.response_mask), self.prompt_width,
                        move(self.prompt_index), move(self.distinct_rows))


def _token_logp(lm_head, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log-softmax(lm_head(h) / T)[target] through autograd: the path of an LM head that trains."""
    logits = lm_head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _writes_logits_in_place(lm_head) -> bool:
    return type(lm_head) is torch.nn.Linear and lm_head.weight.dtype == torch.float32


def _logits(lm_head, h: torch.Tensor, out: torch.Tensor | None, packed: Packed | None = None) -> torch.Tensor:
    """lm_head(h) in float32: through `packed` (its weight packed for oneDNN) when active, else written
    into `out` when given (a float32 nn.Linear head): a reused buffer, because on CPU every fresh
    [chunk, vocab] tensor (200 MB at a 49k vocabulary) costs page faults again."""
    if packed is not None and packed.active:
        return packed(h, lm_head.bias)
    if out is None:
        return lm_head(h).float()
    out = out[: h.shape[0]]
    w, b = lm_head.weight, lm_head.bias
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


def _head_chunk(lm_head, h: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool = True,
                jacobian: bool = False, buffers: tuple | None = None, packed: tuple | None = None):
    """One chunk's log-prob of each target (and entropy) at temperature T, from one head matmul; with
    `jacobian`, also d logp / dh = (W[target] - softmax @ W) / T, [tokens, hidden] (a second matmul).
    The log-softmax is done in place: two [tokens, vocab] float32 buffers (`buffers`, reused across chunks).
    `packed`: W and W^T packed once for all chunks (_packed_head)."""
    z = _logits(lm_head, h, buffers[0] if buffers else None, packed[0] if packed else None)
    if temperature != 1.0:
        z.div_(temperature)
    z.sub_(z.amax(-1, keepdim=True))
    probs = torch.exp(z, out=buffers[1][: z.shape[0]]) if buffers else z.exp()
    total = probs.sum(-1, keepdim=True)
    z.sub_(total.log())  # z is now log-softmax(logits / T)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs.div_(total)
    ent = -torch.bmm(probs.unsqueeze(1), z.unsqueeze(2)).view(-1) if entropy else None
    jac = None
    if jacobian:
        w = lm_head.weight
        mean_w = packed[1](probs) if packed and packed[1].active else probs.to(w.dtype) @ w  # softmax @ W
        jac = ((w[targets].float() - mean_w.float()) / temperature).to(h.dtype)
    return logp, ent, jac


def _packed_head(lm_head, h: torch.Tensor, chunk_size: int, jacobian: bool = False) -> tuple | None:
    """(W, W^T) of a float32 nn.Linear head packed for oneDNN (W^T only with `jacobian`), or None."""
    if not _writes_logits_in_place(lm_head):
        return None
    rows = min(chunk_size, h.shape[0])
    w = lm_head.weight.detach()
    return Packed(w, rows), Packed(w.t(), rows) if jacobian else None


def _head_buffers(h: torch.Tensor, lm_head, chunk_size: int, packed: tuple | None) -> tuple:
    """(logits buffer or None, softmax buffer), [min(chunk, tokens), vocab] float32, for _head_chunk
    (no logits buffer when the packed head writes the logits)."""
    rows = min(chunk_size, h.shape[0])
    new = lambda: torch.empty((rows, lm_head.weight.shape[0]), dtype=torch.float32, device=h.device)  # noqa: E731
    in_place = _writes_logits_in_place(lm_head) and not (packed and packed[0].active)
    return new() if in_place else None, new()


class _FrozenHeadLogp(torch.autograd.Function):
    """Log-probs (and entropy, not differentiated) of targets under a frozen LM head, chunk by chunk.

    The gradient of logp with respect to h is taken in the forward, where the softmax is at hand, and
    kept as one [tokens, hidden] tensor; backward is then g * J. That is two head matmuls per token
    (logits, softmax @ W) instead of four (forward, checkpoint recompute, backward, entropy) and no
    [tokens, vocab] gradient, which is a third of the update on a 49k-vocabulary model on CPU."""

    @staticmethod
    def forward(ctx, h, targets, lm_head, temperature, chunk_size):
        packed = _packed_head(lm_head, h, chunk_size, jacobian=True)
        buffers = _head_buffers(h, lm_head, chunk_size, packed)
        parts = [_head_chunk(lm_head, h[s : s + chunk_size], targets[s : s + chunk_size], temperature, jacobian=True,
                             buffers=buffers, packed=packed)
                 for s in range(0, h.shape[0], chunk_size)]
        logp, entropy, jac = (torch.cat(x) for x in zip(*parts))
        ctx.save_for_backward(jac)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, _g_entropy):
        (jac,) = ctx.saved_tensors
        return g_logp.unsqueeze(-1).to(jac.dtype) * jac, None, None, None, None


def head_is_frozen(lm_head) -> bool:
    """A plain nn.Linear head that gets no gradient (LoRA leaves it alone): its log-prob gradient can
    be taken in the forward (_FrozenHeadLogp). A head that trains (modules_to_save, LoRA on lm_head)
    goes through autograd."""
    return type(lm_head) is torch.nn.Linear and not any(p.requires_grad for p in lm_head.parameters())


class Policy:
    """A causal LM (usually a peft LoRA model) seen as a policy over response tokens.

    `temperature` is the rollout's: log-probs and entropy are those of softmax(logits / T), the
    distribution the responses were sampled from (as verl's actor), so the ratio, the Future-KL and
    the sampler/trainer gap all speak of the policy that produced the tokens. (Top-k/top-p are not
    applied here, as in verl: with them the sampler's renormalised log-probs differ on purpose.)
    """

    def __init__(self, model, tokenizer, chunk_size: int = 1024, share_prompts: bool = True, lean_forward: bool = False,
                 temperature: float = 1.0):
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.model = model
        self.temperature = float(temperature)
        self.tokenizer = tokenizer
        self.chunk_size = max(1, int(chunk_size))
        self.share_prompts = share_prompts
        self.lean_forward = lean_forward  # lean.response_states when the adapter is on (see use_lean_forward)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        self.lm_head = base.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def logprobs(self, batch: SeqBatch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(y_t | x, y_<t) at the policy's temperature for every response column, [B, R] (0 on padding), and entropy."""
        batch = batch.to(self.device)
        P, R = batch.prompt_width, batch.response_mask.shape[1]
        # Positions as the samplers assign them under left padding, so trainer and sampler agree.
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        sel = batch.response_mask.bool()
        if self._can_go_lean():
            h_sel = lean.response_states(self.model, batch, position_ids)
        else:
            if self._can_share(batch):
                h = self._shared_prompt_states(batch, position_ids)
            else:
                hidden = self.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
                h = hidden[:, P - 1 : P + R - 1]  # the state that predicts each response token
            h_sel = h[sel]
        t_sel = batch.input_ids[:, P : P + R][sel]
        logp = torch.zeros(sel.shape, dtype=torch.float32, device=self.device)
        ent = torch.zeros(sel.shape, dtype=torch.float32, device=self.device) if with_entropy else None
        if h_sel.shape[0]:
            tok_logp, tok_ent = self._head_logprobs(h_sel, t_sel, with_entropy)
            logp = logp.masked_scatter(sel, tok_logp)
            if with_entropy:
                ent = ent.masked_scatter(sel, tok_ent)
        return logp, ent

    def _head_logprobs(self, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        """Per-token log-probs (and entropy) through the LM head, `chunk_size` tokens at a time."""
        T, n = self.temperature, self.chunk_size
        if not (torch.is_grad_enabled() and h.requires_grad):
            with torch.no_grad():
                packed = _packed_head(self.lm_head, h, n)
                buffers = _head_buffers(h, self.lm_head, n, packed)
                parts = [_head_chunk(self.lm_head, h[s : s + n], targets[s : s + n], T, entropy=with_entropy, buffers=buffers,
                                     packed=packed)
                         for s in range(0, h.shape[0], n)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]) if with_entropy else None
        if head_is_frozen(self.lm_head):
            logp, ent = _FrozenHeadLogp.apply(h, targets, self.lm_head, T, n)
            return logp, ent if with_entropy else None
        # a head that trains: autograd, each chunk's logits recomputed in backward (activation checkpointing)
        logp = torch.cat([checkpoint(_token_logp, self.lm_head, h[s : s + n], targets[s : s + n], T, use_reentrant=False)
                          for s in range(0, h.shape[0], n)])
        return logp, self._head_logprobs(h.detach(), targets, True)[1] if with_entropy else None

    def _can_go_lean(self) -> bool:
        # not under gradient checkpointing (the lean forward keeps its activations), nor with the adapter
        # switched off (reference log-probs): the transformers path serves those
        return (self.lean_forward and not getattr(self.model, "is_gradient_checkpointing", False)
                and lean.adapters_active(self.model))

    def _can_share(self, batch: SeqBatch) -> bool:
        # Activation checkpointing turns the KV cache off inside transformers, so it runs unshared.
        return (self.share_prompts and batch.distinct_rows is not None and len(batch.distinct_rows) < len(batch.prompt_index)
                and not getattr(self.model, "is_gradient_checkpointing", False))

    def _shared_prompt_states(self, batch: SeqBatch, position_ids: torch.Tensor) -> torch.Tensor:
        """The states that predict each response token, with each distinct prompt run once: the n
        samples of a GRPO group share their prompt, so its forward (and backward) is done for one row
        and its keys/values are handed to every row of the group by an index (a gather, whose
        gradient sums the group's contributions). The same sums as the unshared pass, in another order."""
        P = batch.prompt_width
        rows, index = batch.distinct_rows, batch.prompt_index
        out = self.body(input_ids=batch.input_ids[rows, :P], attention_mask=batch.attention_mask[rows, :P],
                        position_ids=position_ids[rows, :P], use_cache=True)
        cache = out.past_key_values
        cache.batch_select_indices(index)
        last = out.last_hidden_state[:, -1][index]  # predicts the first response token
        rest = self.body(input_ids=batch.input_ids[:, P:], attention_mask=batch.attention_mask, position_ids=position_ids[:, P:],
                         past_key_values=cache, use_cache=True).last_hidden_state
        return torch.cat([last.unsqueeze(1), rest[:, :-1]], dim=1)

    @contextmanager
    def reference(self):
        """The frozen reference policy: the base model with the adapter switched off."""
        ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        with ctx:
            yield self

    def save_adapter(self, path) -> None:
        self.model.save_pretrained(str(path))


def use_lean_forward(setting: str, model, backend: str) -> bool:
    """trainer.lean_forward: "auto" takes lean.response_states for a LoRA model on CPU that it supports
    (transformers backend: Unsloth brings its own forward); "true" insists and says why it cannot."""
    if setting not in LEAN_FORWARD:
        raise ValueError(f"trainer.lean_forward must be one of {LEAN_FORWARD}, got {setting!r}")
    if setting == "false":
        return False
    why_not = "the unsloth backend (it brings its own forward)" if backend == "unsloth" else lean.train_unsupported(model)
    if setting == "true" and why_not:
        raise ValueError(f"trainer.lean_forward=true cannot run on this model ({why_not}): use trainer.lean_forward=auto or false")
    return not why_not and (setting == "true" or all(p.device.type == "cpu" for p in model.parameters()))
