"""The HF engine's decode loop and merged-LoRA sampler, and the on-policy update without a separate
old-log-prob pass: faster, and the same distributions and gradients (scripts/bench_loop.py times them)."""

from __future__ import annotations

import pytest
import torch

from fipo_lite.engines.base import SamplingParams
from fipo_lite.engines.hf import HFEngine, process_logits
from fipo_lite.policy import Policy, SeqBatch

PROMPTS = [[1, 61, 59, 45, 58, 40, 5, 6, 14, 7, 2, 40, 1, 41], [1, 61, 59, 45, 58, 40, 9, 14, 3, 2, 40, 1, 41]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import load_tokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so merging matters
            torch.nn.init.normal_(p, std=0.05)
    return model, load_tokenizer(str(model_dir))


def _gap(policy, ro) -> float:
    logp, _ = policy.logprobs(SeqBatch.from_lists(ro.prompt_ids, ro.response_ids, policy.tokenizer.pad_token_id))
    return max(abs(logp[i, j].item() - ro.sampler_logprobs[i][j]) for i in range(len(ro)) for j in range(len(ro.response_ids[i])))


@torch.no_grad()
def test_merged_sampler_samples_the_live_policy_and_follows_sync(tiny_model_dir):
    model, tok = _lora(tiny_model_dir)
    policy = Policy(model, tok)
    engine = HFEngine(model, tok, merge_lora="true")
    assert engine.sampler is not None and not any(hasattr(m, "lora_A") for m in engine.sampler.modules())
    params = SamplingParams(n=4, max_new_tokens=24, logprobs=True)
    assert _gap(policy, engine.generate(PROMPTS, params)) < 1e-5  # W + s*B@A == the LoRA forward, up to rounding
    for name, p in model.named_parameters():  # an "update" of the adapter
        if "lora_A" in name:
            p.add_(torch.randn_like(p) * 0.2)
    stale = _gap(policy, engine.generate(PROMPTS, params))
    engine.sync(policy)
    assert stale > 1e-2 and _gap(policy, engine.generate(PROMPTS, params)) < 1e-5
    base_w = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(base_w, engine.sampler.model.layers[0].self_attn.q_proj.weight)  # the training weights stay unmerged


@torch.no_grad()
def test_merged_sampler_with_lora_on_a_tied_lm_head(tiny_model_dir):
    """The tiny model (like SmolLM2) ties lm_head to embed_tokens: merging W + BA into the copy's head
    must not change its input embeddings too (the gap was 0.6 nats when it did)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import load_tokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # tied
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=[*TARGETS, "lm_head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    tok = load_tokenizer(str(tiny_model_dir))
    engine = HFEngine(model, tok, merge_lora="true")
    emb = engine.sampler.get_input_embeddings().weight
    assert torch.equal(emb, model.get_base_model().get_input_embeddings().weight)  # the embeddings are not merged into
    assert _gap(Policy(model, tok), engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=24, logprobs=True))) < 1e-5


def test_lean_decoder_follows_an_in_place_update_of_plain_weights(tiny_model_dir):
    """Full fine-tuning (no adapter): torch's fused AdamW on CPU updates the weights in place without
    moving their version counter, so the lean decoder's fused q|k|v and gate|up must be rebuilt at sync."""
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import load_tokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(str(tiny_model_dir))
    engine, policy = HFEngine(model, tok, lean_decode="true"), Policy(model, tok)
    params = SamplingParams(n=4, max_new_tokens=16, logprobs=True)
    with torch.no_grad():
        assert _gap(policy, engine.generate(PROMPTS, params)) < 1e-5
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in model.parameters()]
    opt.step()
    engine.sync(policy)
    with torch.no_grad():
        gap = _gap(policy, engine.generate(PROMPTS, params))
    assert gap < 1e-5, f"the sampler kept the weights from before the update (gap {gap:.3g}; versions moved: {versions != [p._version for p in model.parameters()]})"


def test_auto_merges_only_cpu_float_lora_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tok = _lora(tiny_model_dir)
    assert HFEngine(model, tok, merge_lora="auto").sampler is not None
    assert HFEngine(model, tok, merge_lora="false").sampler is None
    assert HFEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, merge_lora="auto").sampler is None  # no adapter


def test_merging_into_quantized_weights_is_refused_with_the_way_out(tiny_model_dir):
    model, tok = _lora(tiny_model_dir)
    layer = model.get_base_model().model.layers[0].mlp.up_proj.base_layer
    layer.weight = torch.nn.Parameter(layer.weight.data.to(torch.uint8), requires_grad=False)  # as a 4-bit layer stores it
    with pytest.raises(ValueError, match="quantized.*merge_lora=auto or false"):
        HFEngine(model, tok, merge_lora="true")
    assert HFEngine(model, tok, merge_lora="auto").sampler is None  # auto samples through the live model instead


@torch.no_grad()
def test_rows_stop_at_their_own_eos_while_others_continue(tiny_model_dir):
    """Finished rows leave the batch (cache included); the rows still decoding are unaffected: each
    row's log-probs match a teacher-forced pass over that row alone."""
    model, tok = _lora(tiny_model_dir)
    eos = tok.eos_token_id
    engine = HFEngine(model, tok, merge_lora="false")
    policy = Policy(model, tok)
    torch.manual_seed(0)
    ro = engine.generate(PROMPTS * 8, SamplingParams(n=4, max_new_tokens=40, logprobs=True))
    lengths = ro.response_lengths
    assert min(lengths) < max(lengths) == 40  # some rows stopped early while others ran to the limit
    for resp, trunc in zip(ro.response_ids, ro.truncated):
        assert resp.count(eos) == (0 if trunc else 1) and (trunc or resp[-1] == eos)
    assert _gap(policy, ro) < 1e-5


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for t, k, p in ((0.7, -1, 0.6), (1.3, 5, 1.0), (1.0, 10, 0.9), (1.0, -1, 1.0)):
        want = TemperatureLogitsWarper(t)(None, logits.clone())
        if k > 0:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1:
            want = TopPLogitsWarper(p)(None, want)
        got = process_logits(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_on_policy_update_skips_the_old_logprob_pass_with_the_same_result(tiny_model_dir):
    """One epoch over one mini-batch: the update's own forward as the old policy gives the same
    weights as a separate old-log-prob pass (LoRA dropout 0), and reports the entropy."""
    from fipo_lite.config import load_config
    from fipo_lite.trainer import Sample, is_on_policy, make_optimizer, ppo_update, recompute_old_logp

    cfg = load_config(None, ["trainer.ppo_mini_batch_size=2", "trainer.micro_batch_size=3", "trainer.lr=1e-2"])
    results = []
    for on_policy in (False, True):
        model, tok = _lora(tiny_model_dir, seed=1)
        policy = Policy(model, tok)
        samples = [Sample(PROMPTS[i % 2], [5 + i, 9, 14, 2], adv) for i, adv in enumerate([1.0, -1.0, 0.5, -0.5])]
        assert is_on_policy(len(samples), 2, cfg)
        if not on_policy:
            recompute_old_logp(policy, samples, cfg)
        out = ppo_update(policy, make_optimizer(policy.trainable_parameters(), cfg), samples, 2, cfg, on_policy=on_policy)
        assert out["actor/num_updates"] == 1 and ("actor/entropy" in out) == on_policy
        results.append([p.detach().clone() for p in policy.trainable_parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))
    assert not is_on_policy(4, 2, load_config(None, ["trainer.ppo_mini_batch_size=1"]))
    assert not is_on_policy(4, 2, load_config(None, ["trainer.ppo_mini_batch_size=2", "trainer.ppo_epochs=2"]))


def test_shared_prompt_forward_gives_the_same_logprobs_and_gradients(tiny_model_dir):
    """Rows of a group run their common prompt once (keys/values gathered to every row): the same
    log-probs, entropies and LoRA gradients as the plain pass, with left padding and several groups."""
    model, tok = _lora(tiny_model_dir)
    torch.manual_seed(0)
    prompts = [PROMPTS[(i // 4) % 2][: len(PROMPTS[(i // 4) % 2]) - i // 8] for i in range(16)]  # 4 distinct, 3 lengths
    responses = [torch.randint(4, 90, (int(torch.randint(3, 30, ())),)).tolist() for _ in range(16)]
    batch = SeqBatch.from_lists(prompts, responses, tok.pad_token_id)
    assert batch.distinct_rows.tolist() == [0, 4, 8, 12] and batch.prompt_index.tolist() == [g for g in range(4) for _ in range(4)]
    weights = torch.rand(batch.response_mask.shape)
    got = []
    for share in (False, True):
        model.zero_grad()
        logp, ent = Policy(model, tok, share_prompts=share).logprobs(batch, with_entropy=True)
        (logp * weights).sum().backward()
        got.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (lp0, ent0, g0), (lp1, ent1, g1) = got
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(ent0, ent1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g0, g1))
    assert any(a.abs().max() > 0 for a in g0)


def test_prompt_sharing_is_off_under_gradient_checkpointing(tiny_model_dir):
    model, tok = _lora(tiny_model_dir)
    batch = SeqBatch.from_lists([PROMPTS[0]] * 4, [[5, 6], [7], [8, 9, 10], [11]], tok.pad_token_id)
    policy = Policy(model, tok)
    assert policy._can_share(batch)
    model.gradient_checkpointing_enable()
    assert not policy._can_share(batch)  # transformers turns the KV cache off under checkpointing
    assert not Policy(model, tok, share_prompts=False)._can_share(batch)


@pytest.mark.parametrize("temperature,chunk,dtype", [(1.0, 7, torch.float32), (0.7, 1024, torch.float32), (1.3, 5, torch.float64)])
def test_frozen_head_takes_the_logprob_gradient_in_its_forward(temperature, chunk, dtype, packed_matmul):
    """policy._FrozenHeadLogp (a frozen LM head: LoRA's case) gives autograd's log-probs, entropies and
    gradient with respect to the hidden states, at any temperature and chunking, with a head bias."""
    from fipo_lite.policy import _FrozenHeadLogp, head_is_frozen

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).to(dtype).requires_grad_(False)
    h = (torch.randn(23, 16, dtype=dtype) * 2).requires_grad_(True)
    targets = torch.randint(0, 50, (23,))
    weights = torch.randn(23, dtype=torch.float32)
    assert head_is_frozen(head)

    logp, ent = _FrozenHeadLogp.apply(h, targets, head, temperature, chunk)
    (logp * weights).sum().backward()
    got_grad, h.grad = h.grad.clone(), None

    logp_all = (head(h).float() / temperature).log_softmax(-1)  # the plain autograd path
    want = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    (want * weights).sum().backward()
    tol = 1e-5  # the logits are float32 in both paths (a float64 head too), only the rounding order differs
    assert torch.allclose(logp, want, atol=tol) and torch.allclose(ent, -(logp_all.exp() * logp_all).sum(-1).detach(), atol=tol)
    assert torch.allclose(got_grad, h.grad, atol=tol) and got_grad.abs().max() > 1e-2 and got_grad.dtype == dtype


def test_a_head_that_trains_keeps_autograd(tiny_model_dir):
    """With the LM head trainable (e.g. peft's modules_to_save), the head gets its gradient through
    autograd, and log-probs and entropies are those of the frozen-head path."""
    from fipo_lite.policy import head_is_frozen

    model, tok = _lora(tiny_model_dir)
    batch = SeqBatch.from_lists([PROMPTS[0]] * 2, [[5, 6, 7], [8]], tok.pad_token_id)
    policy = Policy(model, tok, chunk_size=2)
    assert head_is_frozen(policy.lm_head)
    frozen_logp, frozen_ent = policy.logprobs(batch, with_entropy=True)
    policy.lm_head.weight.requires_grad_(True)
    try:
        assert not head_is_frozen(policy.lm_head)
        logp, ent = policy.logprobs(batch, with_entropy=True)
        logp.sum().backward()
        assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().max() > 0
        assert torch.allclose(logp, frozen_logp, atol=1e-6) and torch.allclose(ent, frozen_ent, atol=1e-6)
    finally:
        policy.lm_head.weight.requires_grad_(False)
        policy.lm_head.weight.grad = None
