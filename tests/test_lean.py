"""lean.py: the sampler's decode step and the trainer's packed LoRA forward give what transformers +
peft give (logits, log-probs, LoRA gradients, up to float rounding) on the architectures they know,
and name what they do not re-express instead of computing it differently."""

from __future__ import annotations

import pytest
import torch

from fipo_lite import lean
from fipo_lite.engines.base import SamplingParams
from fipo_lite.engines.hf import HFEngine, sample_tokens
from fipo_lite.policy import Policy, SeqBatch, use_lean_forward

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = ("qwen2", "qwen3", "llama")
# prompts of different lengths (left padding), two groups sharing a prompt, responses of 1 to 9 tokens
PROMPTS = [[3, 17, 9, 40, 22], [3, 17, 9, 40, 22], [5, 31, 8], [5, 31, 8], [7, 7, 12, 50, 33, 21, 4]]
RESPONSES = [[11, 12, 13, 2], [14], [15, 16, 17, 18, 19, 20, 21, 22, 2], [23, 24], [25, 26, 27, 28, 29, 30]]




@pytest.fixture(autouse=True)
def _both_matmuls(packed_matmul):
    """Every check here holds with packed (packed.py) and plain matmuls alike."""


class _Tok:
    pad_token_id = 0


def _model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=128, pad_token_id=0, eos_token_id=2, **overrides)
    cfg = {"qwen2": lambda: Qwen2Config(**common), "qwen3": lambda: Qwen3Config(head_dim=8, **common),
           "llama": lambda: LlamaConfig(attention_bias=False, **common)}[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    if arch == "qwen3":  # non-trivial q/k norms, so the per-head normalisation matters
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.3)
    return model


def _lora(model, targets=TARGETS, **kw):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so its gradients and its forward both matter
            torch.nn.init.normal_(p, std=0.1)
    return model


def _logp_and_grads(policy, batch, weights):
    for p in policy.trainable_parameters():
        p.grad = None
    logp, ent = policy.logprobs(batch, with_entropy=True)
    (logp * weights).sum().backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def _assert_same_as_peft(model, prompts=PROMPTS, responses=RESPONSES):
    batch = SeqBatch.from_lists(prompts, responses, pad_id=0)
    weights = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1))
    ref = _logp_and_grads(Policy(model, _Tok(), share_prompts=False), batch, weights)
    got = _logp_and_grads(Policy(model, _Tok(), lean_forward=True), batch, weights)
    assert (got[0] - ref[0]).abs().max() < 1e-5
    assert (got[1] - ref[1]).abs().max() < 1e-4
    assert ref[2].keys() == got[2].keys() and ref[2]
    for name, g in ref[2].items():
        assert (got[2][name] - g).norm() <= 1e-4 * g.norm() + 1e-7, name


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_forward_matches_peft(arch):
    """Log-probs, entropy and every LoRA gradient of the packed forward equal transformers + peft's."""
    model = _lora(_model(arch))
    assert lean.train_unsupported(model) is None
    _assert_same_as_peft(model)


def test_lora_forward_with_adapters_on_some_projections_and_one_token_responses():
    model = _lora(_model("qwen2"), targets=["q_proj", "v_proj", "down_proj"])
    _assert_same_as_peft(model)
    _assert_same_as_peft(model, responses=[[11], [12], [13], [14], [2]])  # nothing to run past the prompts


def test_reference_logprobs_take_the_transformers_path():
    """Inside disable_adapter() (the reference policy) the lean forward must not add the adapter."""
    model = _lora(_model("qwen2"))
    batch = SeqBatch.from_lists(PROMPTS, RESPONSES, pad_id=0)
    policy = Policy(model, _Tok(), lean_forward=True)
    with torch.no_grad():
        with policy.reference():
            ref, _ = policy.logprobs(batch)
            base, _ = Policy(model.get_base_model(), _Tok()).logprobs(batch)  # peft's forward, adapter off
        live, _ = Policy(model, _Tok(), lean_forward=False).logprobs(batch)
        assert torch.allclose(ref, base, atol=1e-6) and (ref - live).abs().max() > 1e-3
        assert (policy.logprobs(batch)[0] - live).abs().max() < 1e-5  # the adapter is back on


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_decode_steps_match_the_forward(arch, monkeypatch):
    """Prefill + decode steps (rows dropped on the way, the cache grown twice) give the logits of a full
    forward over each row."""
    monkeypatch.setattr(lean, "CACHE_START", 2)
    model = _model(arch)
    decoder = lean.LeanDecoder(model)
    prompts = [p for p in PROMPTS[::2]] + [[9, 10]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    rows = list(range(len(prompts)))
    seqs = [list(ids[r]) for r in rows]
    masks = [list(attn[r]) for r in rows]
    logits = decoder.prefill(ids, attn, pos, max_new_tokens=8)
    nxt = pos[:, -1] + 1
    gen = torch.Generator().manual_seed(0)
    for t in range(8):
        full = model(input_ids=torch.tensor([seqs[r] for r in rows]), attention_mask=torch.tensor([masks[r] for r in rows]),
                     position_ids=(torch.tensor([masks[r] for r in rows]).cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        assert (logits - full).abs().max() < 1e-5, t
        if t == 3:  # a row finished: drop it, as the engine does
            keep = torch.tensor([0, 2, 3])
            decoder.select(keep)
            rows, nxt, logits = [rows[i] for i in keep.tolist()], nxt[keep], logits[keep]
        tok = torch.randint(3, 64, (len(rows),), generator=gen)
        for i, r in enumerate(rows):
            seqs[r].append(int(tok[i]))
            masks[r].append(1)
        logits = decoder.step(tok, nxt)
        nxt = nxt + 1


@torch.no_grad()
def test_decode_steps_with_mlp_biases():
    """Llama with mlp_bias=True: the gate and up biases enter every decode step, not only the prefill."""
    model = _model("llama", mlp_bias=True)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.normal_(p, std=0.5)
    assert model.model.layers[0].mlp.gate_proj.bias is not None
    decoder = lean.LeanDecoder(model)
    seq = [5, 6, 7]
    logits = decoder.prefill(torch.tensor([seq]), torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None], 4)
    for t in range(4):
        want = model(input_ids=torch.tensor([seq])).logits[:, -1]
        assert (logits - want).abs().max() < 1e-5, t
        seq.append(8 + t)
        logits = decoder.step(torch.tensor([8 + t]), torch.tensor([len(seq) - 1]))


@torch.no_grad()
def test_lean_decoder_follows_weight_changes():
    """Its fused q|k|v and gate|up weights are rebuilt when a source weight changes in place."""
    model = _model("qwen2")
    decoder = lean.LeanDecoder(model)
    ids, attn = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    pos = torch.arange(3)[None]
    decoder.prefill(ids, attn, pos, 2)
    before = decoder.step(torch.tensor([8]), torch.tensor([3]))
    model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    decoder.prefill(ids, attn, pos, 2)
    after = decoder.step(torch.tensor([8]), torch.tensor([3]))
    want = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[:, -1]
    assert (after - want).abs().max() < 1e-5 and (before - want).abs().max() > 1e-4


def test_what_the_lean_paths_do_not_compute_is_named():
    from transformers import AutoModelForCausalLM, GPT2Config

    assert "dropout" in lean.train_unsupported(_lora(_model("qwen2"), lora_dropout=0.1))
    assert "DoRA" in lean.train_unsupported(_lora(_model("qwen2"), use_dora=True))
    assert "trainable base" in lean.train_unsupported(_lora(_model("qwen2"), bias="all"))
    assert "no peft" in lean.train_unsupported(_model("qwen2"))
    assert "attention dropout" in lean.train_unsupported(_lora(_model("qwen2", attention_dropout=0.1)))
    assert "adapters in torch.float32" in lean.train_unsupported(_lora(_model("qwen2").to(torch.bfloat16)))
    assert "peft" in lean.decode_unsupported(_lora(_model("qwen2")))
    assert "sliding" in lean.decode_unsupported(_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0))
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert "model_type 'gpt2'" in lean.decode_unsupported(gpt2)
    dropout_model = _lora(_model("qwen2"), lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"trainer.lean_forward=true cannot run on this model \(LoRA dropout"):
        use_lean_forward("true", dropout_model, "hf")
    assert use_lean_forward("auto", dropout_model, "hf") is False
    assert use_lean_forward("auto", _lora(_model("qwen2")), "hf") is True
    assert use_lean_forward("auto", _lora(_model("qwen2")), "unsloth") is False
    with pytest.raises(ValueError, match="unsloth"):
        use_lean_forward("true", _lora(_model("qwen2")), "unsloth")


def test_engine_lean_decode_setting(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    peft_model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert HFEngine(peft_model, tok, merge_lora="auto").lean is not None  # CPU: merged copy + lean steps
    assert HFEngine(peft_model, tok, merge_lora="auto", lean_decode="false").lean is None
    with pytest.raises(ValueError, match="lean_decode=true cannot run.*peft.*merge_lora"):
        HFEngine(peft_model, tok, merge_lora="false", lean_decode="true")
    with pytest.raises(ValueError, match="lean_decode must be one of"):
        HFEngine(peft_model, tok, lean_decode="yes")


def test_sample_tokens_draws_from_the_softmax_and_never_a_removed_token():
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 1.0, -float("inf"), 2.0, -float("inf")], [-float("inf"), 0.5, 0.5, -float("inf"), -float("inf")]])
    draws = sample_tokens(scores.repeat_interleave(100_000, 0)).view(2, -1)
    for row, s in zip(draws, scores):
        freq = torch.bincount(row, minlength=5).float() / len(row)
        assert (freq - s.softmax(-1)).abs().max() < 0.005
        assert freq[torch.isinf(s)].sum() == 0


@torch.no_grad()
def test_lean_sampler_logprobs_are_the_trainers(tiny_model_dir):
    """End to end through the engine (merged copy + lean steps, rows stopping at their own EOS): each
    sampled token's log-prob is the trainer's, on both of the trainer's paths."""
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    engine = HFEngine(model, tok, merge_lora="true", lean_decode="true")
    prompts = [[1, 61, 59, 45, 58, 40, 5, 6, 14, 7, 2, 40, 1, 41], [1, 61, 59, 45, 58, 40, 9, 14, 3, 2, 40, 1, 41]]
    torch.manual_seed(0)
    ro = engine.generate(prompts * 4, SamplingParams(n=4, max_new_tokens=40, logprobs=True))
    assert min(ro.response_lengths) < max(ro.response_lengths) == 40
    for resp, trunc in zip(ro.response_ids, ro.truncated):
        assert resp.count(tok.eos_token_id) == (0 if trunc else 1)
    batch = SeqBatch.from_lists(ro.prompt_ids, ro.response_ids, tok.pad_token_id)
    for lean_forward in (True, False):
        logp, _ = Policy(model, tok, lean_forward=lean_forward).logprobs(batch)
        gap = max(abs(logp[i, j].item() - ro.sampler_logprobs[i][j]) for i in range(len(ro)) for j in range(len(ro.response_ids[i])))
        assert gap < 1e-5
