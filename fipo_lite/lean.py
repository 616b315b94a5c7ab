"""Lean arithmetic for Qwen2/Qwen3/Llama-style models on the CPU: the sampler's decode step and the
trainer's LoRA forward, each the same sums as transformers + peft up to float rounding.

On a small model both are mostly per-call overhead rather than arithmetic: transformers builds masks,
position embeddings and cache bookkeeping around every layer, re-concatenates its growing KV cache at
every token, and runs padding positions through every layer; peft adds two full-size elementwise
passes (scale, add) per adapted layer. Here the q/k/v and gate/up projections are each one matmul,
every matmul against a weight packed once for oneDNN (packed.py), the residual adds are done by the
matmuls, LoRA is merged into the frozen weight for the training matmuls (its gradients taken in
factored form), the decode step writes into a KV cache allocated once, and the prefill and the
training forward run only real tokens (packed, each distinct prompt once) through the position-wise
layers, unpacking them just for attention.

Only the model's own weights and modules are used (norms, rotary embedding, activation, peft's
lora_A/lora_B parameters, so optimizers, checkpoints and adapters are untouched). Anything these
functions do not re-express (another architecture, sliding windows, quantized layers, LoRA dropout,
DoRA, several adapters...) is reported by `decode_unsupported` / `train_unsupported` and stays on the
transformers/peft path. tests/test_lean.py checks logits, log-probs and LoRA gradients against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed import Packed

ARCHITECTURES = ("qwen2", "qwen3", "llama")
CACHE_START = 256  # decode-cache columns allocated after the prompt; doubled when full (long limits, short answers)


def _body(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _projections(layer) -> tuple:
    a, m = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


def _architecture_unsupported(model) -> str | None:
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return f"model_type {cfg.model_type!r} (lean paths know {', '.join(ARCHITECTURES)})"
    if any(getattr(layer.self_attn, "sliding_window", None) is not None for layer in _body(model).layers):
        return "sliding-window attention"
    return None


def decode_unsupported(model) -> str | None:
    """Why the sampler `model` cannot take the lean decode step (None when it can)."""
    if hasattr(model, "get_base_model"):
        return "a peft-wrapped model (the lean step runs on plain or LoRA-merged weights)"
    if not all(p.dtype.is_floating_point for p in model.parameters()):
        return "quantized weights"
    reason = _architecture_unsupported(model)
    if reason:
        return reason
    if not all(type(p) is torch.nn.Linear for layer in _body(model).layers for p in _projections(layer)):
        return "projections that are not plain nn.Linear"
    return None


def train_unsupported(model) -> str | None:
    """Why the trainer's peft `model` cannot take the lean LoRA forward (None when it can)."""
    if not hasattr(model, "get_base_model"):
        return "no peft LoRA adapter"
    base = model.get_base_model()
    reason = _architecture_unsupported(base)
    if reason:
        return reason
    if getattr(base.config, "attention_dropout", 0.0):
        return "attention dropout (config.attention_dropout > 0; the lean forward has none)"
    body = _body(base)
    if type(body.embed_tokens) is not torch.nn.Embedding:
        return "an adapted or trainable embedding"
    for layer in body.layers:
        for p in _projections(layer):
            if type(p) is torch.nn.Linear:
                if p.weight.requires_grad:
                    return "a fully trained projection (modules_to_save)"
                continue
            if type(getattr(p, "base_layer", None)) is not torch.nn.Linear or not hasattr(p, "lora_A"):
                return f"a projection of type {type(p).__name__} (quantized, or not a LoRA Linear)"
            if any(t is not None and t.requires_grad for t in (p.base_layer.weight, p.base_layer.bias)):
                return "a trainable base weight or bias (e.g. LoRA bias='all')"
            if len(p.active_adapters) != 1 or p.active_adapters[0] not in p.lora_A:
                return "not exactly one active LoRA adapter"
            name = p.active_adapters[0]
            if type(p.lora_dropout[name]) is not torch.nn.Identity:
                return "LoRA dropout (lora.dropout > 0)"
            if p.lora_variant.get(name) is not None or p.lora_B[name].bias is not None:
                return "a LoRA variant (DoRA) or LoRA bias"
            if p.lora_A[name].weight.dtype != p.base_layer.weight.dtype:
                return (f"base weights in {p.base_layer.weight.dtype} with adapters in {p.lora_A[name].weight.dtype} "
                        "(e.g. model.dtype=bfloat16: peft keeps adapters in float32)")
    return None


# ----------------------------------------------------------------------------- shared pieces
def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """rotate_half(x) * sin == x.roll(d/2) * _signed_sin(sin) (transformers' rotate_half convention)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on x [..., heads, d] with cos/sin broadcast over heads."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def _qk(attn, qkv: torch.Tensor, heads: int, kv_heads: int, d: int) -> torch.Tensor:
    """The q and k heads of a fused q|k|v output [N, (heads + 2 kv_heads) d], as [N, heads + kv_heads, d];
    qwen3 normalises each head (RMSNorm) before the rotary embedding."""
    n, q_end, k_end = qkv.shape[0], heads * d, (heads + kv_heads) * d
    if hasattr(attn, "q_norm"):
        return torch.cat((attn.q_norm(qkv[:, :q_end].view(n, heads, d)), attn.k_norm(qkv[:, q_end:k_end].view(n, kv_heads, d))), 1)
    return qkv[:, :k_end].view(n, heads + kv_heads, d)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module's output: for float32 one F.rms_norm call (the module's sums without its eight
    calls), the module itself otherwise (it upcasts half precision)."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None or x.dtype != torch.float32 or type(module).__name__ not in _RMS_NORMS:
        return module(x)
    return F.rms_norm(x, module.weight.shape, module.weight, eps)


_RMS_NORMS = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm")


def _act(mlp, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if mlp.config.hidden_act == "silu" else mlp.act_fn(x)


def _cat_bias(linears) -> torch.Tensor | None:
    if all(p.bias is None for p in linears):
        return None
    return torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in linears])


# ----------------------------------------------------------------------------- sampler: decode step
class LeanDecoder:
    """Decode steps over a plain model's weights: `prefill` the prompts, then `step` per token."""

    def __init__(self, model):
        reason = decode_unsupported(model)
        if reason:
            raise ValueError(f"lean decoding does not support this model: {reason}")
        self.model, self.body = model, _body(model)
        self.lm_head = model.get_output_embeddings()
        attn = self.body.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self._fused, self._head, self._versions = [], None, None

    def _fused_weights(self) -> list[tuple]:
        """Per layer: q|k|v weight and bias, gate|up weight, concatenated once and rebuilt when an
        optimizer step or an adapter merge has changed a source tensor (its in-place version moved)."""
        sources = [t for layer in self.body.layers for p in _projections(layer) for t in (p.weight, p.bias) if t is not None]
        versions = [t._version for t in (*sources, self.lm_head.weight)]
        if versions != self._versions:
            with torch.no_grad():
                self._fused = [self._fuse(layer) for layer in self.body.layers]
                self._head = Packed(self.lm_head.weight) if type(self.lm_head) is torch.nn.Linear else None
            self._versions = versions
        return self._fused

    def invalidate(self) -> None:
        """Rebuild the fused weights at the next step. An optimizer that updates in place without
        moving `_version` (torch's fused AdamW on CPU) leaves the version check blind, so the engine
        calls this after every update."""
        self._versions = None

    @staticmethod
    def _fuse(layer) -> tuple:
        q, k, v, o, gate, up, down = _projections(layer)
        return (Packed(torch.cat([q.weight, k.weight, v.weight])), _cat_bias((q, k, v)), Packed(torch.cat([gate.weight, up.weight])),
                _cat_bias((gate, up)), Packed(o.weight), o.bias, Packed(down.weight), down.bias)

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run left-padded prompts [B, P], keep their keys/values in a cache with room for more positions
        (it doubles when full, up to max_new_tokens more), and return the logits [B, vocab] of each
        prompt's next token."""
        B, P = attention_mask.shape
        self.max_width = P + max_new_tokens
        width = P + min(max_new_tokens, CACHE_START)
        hp, _, prompt_kv = _packed_forward(self.model, prompt_ids, attention_mask, positions)
        self.fused = self._fused_weights()
        self.T = P  # the next cache column to write
        self.k, self.v = [], []
        for k, v in prompt_kv:
            kbuf = k.new_empty((B, self.kv_heads, self.head_dim, width))  # keys stored transposed: q @ k reads them in place
            vbuf = v.new_empty((B, self.kv_heads, width, self.head_dim))
            kbuf[..., :P], vbuf[:, :, :P] = k.transpose(-1, -2), v
            self.k.append(kbuf)
            self.v.append(vbuf)
        # additive attention bias per cache column (-inf on the prompt's left padding), [B, kv_heads, 1, width]
        # so that it views as [B * kv_heads, 1, width] for baddbmm
        self.bias = torch.zeros((B, self.kv_heads, 1, width), dtype=self.k[0].dtype, device=attention_mask.device)
        self.bias[..., :P].masked_fill_((attention_mask == 0)[:, None, None, :], float("-inf"))
        # cos/sin of every position this decode can reach, unless the rope type rescales with the length
        self.rope_table = None
        if getattr(self.body.rotary_emb, "rope_type", "default") not in ("dynamic", "longrope"):
            positions = torch.arange(self.max_width, device=attention_mask.device)[None]
            cos, sin = self.body.rotary_emb(self.k[0], positions)
            self.rope_table = cos[0], _signed_sin(sin[0])
        return self.lm_head(hp[attention_mask.sum(-1).cumsum(0) - 1])

    def _grow(self) -> None:
        """Twice the cache columns (at most max_width), the filled ones copied."""
        T, width = self.T, min(self.max_width, 2 * self.bias.shape[-1])
        for buffers, column_dim in ((self.k, -1), (self.v, -2)):
            for i, old in enumerate(buffers):
                shape = list(old.shape)
                shape[column_dim] = width
                new = old.new_empty(shape)
                new.narrow(column_dim, 0, T).copy_(old.narrow(column_dim, 0, T))
                buffers[i] = new
        bias = self.bias.new_zeros((*self.bias.shape[:-1], width))
        bias[..., :T] = self.bias[..., :T]
        self.bias = bias

    def select(self, keep: torch.Tensor) -> None:
        """Keep only these rows of the batch (the ones still decoding)."""
        self.k = [k[keep] for k in self.k]
        self.v = [v[keep] for v in self.v]
        self.bias = self.bias[keep]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of the token after `tokens` [B] at `positions` [B], whose keys and values
        are written to the cache."""
        if self.T == self.bias.shape[-1]:
            self._grow()
        B, T, d, heads, kvh = tokens.shape[0], self.T, self.head_dim, self.heads, self.kv_heads
        h = self.body.embed_tokens(tokens)  # [B, hidden]
        if self.rope_table is not None:
            cos, sin = self.rope_table[0][positions].unsqueeze(1), self.rope_table[1][positions].unsqueeze(1)  # [B, 1, d]
        else:
            cos, sin = self.body.rotary_emb(h, positions.unsqueeze(-1))
            sin = _signed_sin(sin)
        bias = self.bias[..., : T + 1].view(B * kvh, 1, T + 1)
        for layer, (w_qkv, b_qkv, w_gu, b_gu, w_o, b_o, w_down, b_down), kc, vc in zip(self.body.layers, self.fused, self.k, self.v):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = w_qkv(_norm(layer.input_layernorm, h), b_qkv)
            qk = _rotate(_qk(attn, qkv, heads, kvh, d), cos, sin)  # q and k heads rotated together
            kc[..., T] = qk[:, heads:]
            vc[:, :, T] = qkv[:, (heads + kvh) * d :].view(B, kvh, d)
            # grouped-query attention of the new position over cache columns 0..T
            q = qk[:, :heads].reshape(B * kvh, heads // kvh, d)
            scores = torch.baddbmm(bias, q, kc[..., : T + 1].view(B * kvh, d, T + 1), alpha=self.scaling)
            probs = scores.softmax(-1) if scores.dtype == torch.float32 else scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            o = torch.bmm(probs, vc[:, :, : T + 1].view(B * kvh, T + 1, d))
            h = w_o(o.view(B, heads * d), b_o, residual=h)
            gate, up = w_gu(_norm(layer.post_attention_layernorm, h), b_gu).chunk(2, dim=-1)  # Llama mlp_bias
            h = w_down(_act(mlp, gate) * up, b_down, residual=h)
        self.T = T + 1
        h = _norm(self.body.norm, h)
        return self._head(h, self.lm_head.bias) if self._head is not None else self.lm_head(h)


# ----------------------------------------------------------------------------- trainer: LoRA forward
def adapters_active(model) -> bool:
    """The adapter is on (not inside `disable_adapter()`, as for reference log-probs) and not merged."""
    return not any(getattr(m, "disable_adapters", False) or getattr(m, "merged", False)
                   for m in model.modules() if hasattr(m, "lora_A"))


class _MergedLoRA(torch.autograd.Function):
    """[residual +] x (W + B A)^T + bias for side-by-side projections that read x (q|k|v, gate|up), with
    LoRA merged into the frozen weight for the matmuls and its gradients taken in factored form.

    peft's x W^T + s (x A^T) B^T costs two thin matmuls (inner size r) and two full-size elementwise
    passes per projection, forward and backward; here the forward is one matmul against W + s B A
    (an [out, in] sum written in one pass, rebuilt in backward rather than kept), dx one matmul against
    it, and dA = (dy B)^T x, dB = dy^T (x A^T) (s folded into B by the caller). W never gets a gradient."""

    @staticmethod
    def forward(ctx, x, bias, residual, weights, adapted, *lora):
        # weights: the frozen [out_i, in] weight of each projection; adapted[i]: whether it has a LoRA pair
        # in lora = A0, sB0, A1, sB1, ... (in order)
        ctx.weights, ctx.adapted = weights, adapted
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, *lora)
        return Packed(_merge(weights, adapted, lora), rows=x.shape[0])(x, bias, residual)

    @staticmethod
    def backward(ctx, dy):
        x, *lora = ctx.saved_tensors
        dx = Packed(_merge(ctx.weights, ctx.adapted, lora).t(), rows=dy.shape[0])(dy) if ctx.needs_input_grad[0] else None
        grads, start, pairs = [], 0, iter(zip(lora[0::2], lora[1::2]))
        for w, has_lora in zip(ctx.weights, ctx.adapted):
            if has_lora:
                a, b = next(pairs)
                dy_i = dy[:, start : start + w.shape[0]]
                grads += [(dy_i @ b).t() @ x, dy_i.t() @ (x @ a.t())]
            start += w.shape[0]
        return dx, None, dy if ctx.has_residual else None, None, None, *grads


def _merge(weights: tuple, adapted: tuple, lora) -> torch.Tensor:
    """The projections' weights side by side, each plus its s B A: one [sum out, in] tensor, written once."""
    if len(weights) == 1 and not adapted[0]:
        return weights[0]
    merged = weights[0].new_empty((sum(w.shape[0] for w in weights), weights[0].shape[1]))
    start, pairs = 0, iter(zip(lora[0::2], lora[1::2]))
    for w, has_lora in zip(weights, adapted):
        rows = merged[start : start + w.shape[0]]
        if has_lora:
            a, b = next(pairs)
            torch.addmm(w, b, a, out=rows)
        else:
            rows.copy_(w)
        start += w.shape[0]
    return merged


def _lora_linear(x: torch.Tensor, linears, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The side-by-side outputs of `linears` (peft LoRA layers or frozen nn.Linear) that read x, as one
    tensor [N, sum of outputs] (plus `residual`)."""
    bases = [getattr(p, "base_layer", p) for p in linears]
    adapted, lora = [], []
    for p in linears:
        adapted.append(hasattr(p, "lora_A"))
        if adapted[-1]:
            name = p.active_adapters[0]
            lora += [p.lora_A[name].weight, p.lora_B[name].weight * p.scaling[name]]
    return _MergedLoRA.apply(x, _cat_bias(bases), residual, tuple(b.weight for b in bases), tuple(adapted), *lora)


class _Take(torch.autograd.Function):
    """x[index] at distinct positions. autograd's own gradient of an index is an accumulating scatter
    (it must allow repeats), several times slower on CPU than the plain one used here."""

    @staticmethod
    def forward(ctx, x, *index):
        ctx.save_for_backward(*index)
        ctx.shape = x.shape
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shape).index_put_(ctx.saved_tensors, grad), *(None for _ in ctx.saved_tensors)


class _Place(torch.autograd.Function):
    """A zero tensor of `shape` with `rows` put at distinct positions `index` (the inverse of _Take)."""

    @staticmethod
    def forward(ctx, rows, shape, *index):
        ctx.save_for_backward(*index)
        return rows.new_zeros(shape).index_put_(index, rows)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.saved_tensors], None, *(None for _ in ctx.saved_tensors)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """Grouped-query attention: q [X, heads, L, d] over keys/values [X, kv_heads, S, d] with an additive
    bias [X * kv_heads, group * L, S]; returns [X, heads, L, d]."""
    X, heads, L, d = q.shape
    kvh, S = keys.shape[1], keys.shape[2]
    scores = torch.baddbmm(bias, q.reshape(X * kvh, heads // kvh * L, d), keys.reshape(X * kvh, S, d).transpose(1, 2), alpha=scaling)
    out = torch.bmm(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values.reshape(X * kvh, S, d))
    return out.view(X, heads, L, d)


def _bias(see: torch.Tensor, kv_heads: int, group: int, dtype) -> torch.Tensor:
    """The additive bias [X * kv_heads, group * L, S] of a boolean [X, L, S] "query sees key"."""
    X, L, S = see.shape
    bias = torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill_(~see, float("-inf"))
    return bias[:, None, None].expand(X, kv_heads, group, L, S).reshape(X * kv_heads, group * L, S)


def _packed_forward(model, prompt_ids, prompt_mask, prompt_pos, responses=None):
    """The model over G left-padded prompts [G, P] and, optionally, response tokens that continue them.

    Only real tokens run through the position-wise layers (packed, [tokens, hidden]); they are
    unpacked to padded [rows, columns] just for attention. `responses` = (ids [B, R], run [B, R] bool,
    positions [B, R], index [B]: the prompt each row continues). Returns the final (normed) hidden
    states of the packed prompt tokens and response tokens, and each layer's prompt keys/values
    [G, kv_heads, P, d] (rotated, zero on padding)."""
    body, cfg = _body(model), model.config
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    attn0 = body.layers[0].self_attn
    d, group, dtype = attn0.head_dim, heads // kvh, body.embed_tokens.weight.dtype
    G, P = prompt_ids.shape
    pmask = prompt_mask.bool()
    pg, pt = pmask.nonzero(as_tuple=True)
    tokens, positions = [prompt_ids[pmask]], [prompt_pos[pmask]]
    # a prompt query sees the real prompt tokens up to itself; a padding query only itself (so no row is empty)
    tril = torch.ones(P, P, dtype=torch.bool, device=pmask.device).tril()
    prompt_bias = _bias(tril & (pmask[:, None, :] | torch.eye(P, dtype=torch.bool, device=pmask.device)), kvh, group, dtype)
    n_prompt = len(pg)
    if responses is not None:
        r_ids, run, r_pos, index = responses
        B, R = run.shape
        rb, rt = run.nonzero(as_tuple=True)
        tokens.append(r_ids[run])
        positions.append(r_pos[run])
        # a response query sees its prompt's real tokens and the response up to itself
        causal = torch.ones(R, R, dtype=torch.bool, device=run.device).tril()[None].expand(B, R, R)
        response_bias = _bias(torch.cat([pmask[index][:, None, :].expand(B, R, P), causal], -1), kvh, group, dtype)
    h = body.embed_tokens(torch.cat(tokens))
    cos, sin = body.rotary_emb(h, torch.cat(positions)[None])  # [1, tokens, d]
    cos, sin = cos[0][:, None], _signed_sin(sin[0][:, None])
    prompt_kv = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o, gate, up, down = _projections(layer)
        qkv = _lora_linear(_norm(layer.input_layernorm, h), (q, k, v))
        heads_all = torch.cat([_rotate(_qk(attn, qkv, heads, kvh, d), cos, sin), qkv[:, (heads + kvh) * d :].view(-1, kvh, d)], 1)
        padded = _Place.apply(heads_all[:n_prompt], (G, P, heads + 2 * kvh, d), pg, pt).transpose(1, 2)
        pk, pv = padded[:, heads : heads + kvh], padded[:, heads + kvh :]
        prompt_kv.append((pk, pv))
        outs = [_Take.apply(_attend(padded[:, :heads], pk, pv, prompt_bias, attn.scaling).transpose(1, 2), pg, pt)]
        if responses is not None:
            rpad = _Place.apply(heads_all[n_prompt:], (B, R, heads + 2 * kvh, d), rb, rt).transpose(1, 2)
            keys = torch.cat([pk[index], rpad[:, heads : heads + kvh]], 2)
            values = torch.cat([pv[index], rpad[:, heads + kvh :]], 2)
            outs.append(_Take.apply(_attend(rpad[:, :heads], keys, values, response_bias, attn.scaling).transpose(1, 2), rb, rt))
        h = _lora_linear(torch.cat(outs).reshape(-1, heads * d), (o,), residual=h)
        g, u = _lora_linear(_norm(layer.post_attention_layernorm, h), (gate, up)).chunk(2, dim=-1)
        h = _lora_linear(_act(mlp, g) * u, (down,), residual=h)
    h = _norm(body.norm, h)
    return h[:n_prompt], h[n_prompt:], prompt_kv


def response_states(model, batch, position_ids: torch.Tensor) -> torch.Tensor:
    """The final hidden state that predicts each real response token, [tokens, hidden], in the order of
    `hidden[:, P - 1 : P + R - 1][response_mask]` (the transformers path's). `batch` is a policy.SeqBatch.

    Each distinct prompt runs once (its keys/values serve every row that continues it); a response's
    last token predicts nothing and is not run."""
    P, (B, R) = batch.prompt_width, batch.response_mask.shape
    rows, index = batch.distinct_rows, batch.prompt_index
    sel = batch.response_mask.bool()
    run = torch.arange(R - 1, device=sel.device)[None, :] < (sel.sum(-1) - 1)[:, None]  # [B, R - 1]: inputs 0 .. length-2
    responses = (batch.input_ids[:, P : P + R - 1], run, position_ids[:, P : P + R - 1], index) if bool(run.any()) else None
    prompt_mask = batch.attention_mask[rows, :P]
    hp, hr, _ = _packed_forward(model.get_base_model(), batch.input_ids[rows, :P], prompt_mask, position_ids[rows, :P], responses)
    last = hp[prompt_mask.sum(-1).cumsum(0) - 1][index]  # [B, hidden]: each prompt's last token predicts response token 0
    if responses is None:
        return last[sel[:, 0]]
    # column 0 is the prompt's last state, column t + 1 the output of response input t
    slot = torch.full((B, R), -1, dtype=torch.long, device=sel.device)
    slot[:, 0] = torch.arange(B, device=sel.device)
    rb, rt = run.nonzero(as_tuple=True)
    slot[rb, rt + 1] = B + torch.arange(len(rb), device=sel.device)
    return _Take.apply(torch.cat([last, hr]), slot[sel])
