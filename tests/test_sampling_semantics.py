"""What the sampler samples from and what its log-probs mean; the mode the model trains in.

Defects these would have caught: the HF engine inherited a checkpoint's generation_config.json
(so it sampled from something other than the policy), its log-probs ignored top-p, and updates ran
in eval mode (no gradient checkpointing, no LoRA dropout).
"""

from __future__ import annotations

import json

import torch

from fipo_lite.config import load_config
from fipo_lite.engines.base import SamplingParams
from fipo_lite.engines.hf import HFEngine
from fipo_lite.policy import Policy, SeqBatch

PROMPTS = [[1, 61, 59, 45, 58, 40, 5, 6, 14, 7, 2, 40, 1, 41], [1, 61, 59, 45, 58, 40, 9, 14, 3, 2, 40, 1, 41]]


def _load(model_dir, generation_overrides=None):
    from transformers import AutoModelForCausalLM

    from fipo_lite.backends.hf import load_tokenizer

    if generation_overrides:
        path = model_dir / "generation_config.json"
        gc = json.loads(path.read_text())
        gc.update(generation_overrides)
        path.write_text(json.dumps(gc))
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(str(model_dir))


def _processed_logprobs(model, ro, temperature, top_p):
    """log-prob of each sampled token under softmax(logits / T) restricted to the top-p set, renormalised."""
    out = []
    for prompt, resp in zip(ro.prompt_ids, ro.response_ids):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1 : -1] / temperature
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) > top_p  # keep the smallest set with mass >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        lp = logits.masked_fill(drop, float("-inf")).log_softmax(-1)
        out.append(lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1).tolist())
    return out


def test_hf_engine_ignores_the_checkpoints_generation_config(tiny_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    model, tok = _load(model_dir, dict(repetition_penalty=3.0, top_k=2, min_p=0.3, no_repeat_ngram_size=1, suppress_tokens=[5, 6]))
    assert model.generation_config.repetition_penalty == 3.0
    torch.manual_seed(0)
    ro = HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=4, max_new_tokens=20, logprobs=True))
    # At T=1, top-p=1 the sampler's log-probs are the policy's own: none of the file's processors acted.
    logp, _ = Policy(model, tok).logprobs(SeqBatch.from_lists(ro.prompt_ids, ro.response_ids, tok.pad_token_id))
    gaps = [abs(logp[i, j].item() - ro.sampler_logprobs[i][j]) for i in range(len(ro)) for j in range(len(ro.response_ids[i]))]
    assert max(gaps) < 1e-5
    assert any(len(set(r)) < len(r) for r in ro.response_ids)  # repeats happen: no_repeat_ngram_size did not act
    assert model.generation_config.repetition_penalty == 3.0  # the model's own config is left as it was


def test_hf_engine_logprobs_are_the_sampled_distributions(tiny_model_dir):
    """Temperature and top-p applied and renormalised: the definition vLLM's processed_logprobs uses."""
    model, tok = _load(tiny_model_dir)
    torch.manual_seed(1)
    ro = HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=3, max_new_tokens=12, temperature=0.7, top_p=0.6, logprobs=True))
    want = _processed_logprobs(model, ro, 0.7, 0.6)
    flat = lambda xs: [x for row in xs for x in row]  # noqa: E731
    assert max(abs(a - b) for a, b in zip(flat(ro.sampler_logprobs), flat(want))) < 1e-4
    raw = _processed_logprobs(model, ro, 1.0, 1.0)
    assert max(abs(a - b) for a, b in zip(flat(ro.sampler_logprobs), flat(raw))) > 1e-2  # and not the raw ones


def _update_once(model_dir, out, gradient_checkpointing):
    """One ppo_update on a fresh LoRA model; returns (training flags seen by forward, saved tensors, mode after)."""
    from fipo_lite.backends.hf import load_model
    from fipo_lite.trainer import Sample, make_optimizer, ppo_update, recompute_old_logp

    cfg = load_config(None, [f"model.path={model_dir}", f"output_dir={out}", f"model.gradient_checkpointing={gradient_checkpointing}",
                             "trainer.ppo_mini_batch_size=2", "trainer.train_batch_size=2", "trainer.micro_batch_size=8", "lora.dropout=0.1"])
    torch.manual_seed(0)
    model, tok = load_model(cfg)
    policy = Policy(model, tok)
    samples = [Sample(p, [5, 6, 7, 8, 9, 10, 2], adv) for p in PROMPTS for adv in (1.0, -1.0)]
    recompute_old_logp(policy, samples, cfg)
    modes, saved = [], [0]
    policy.body.register_forward_pre_hook(lambda module, args: modes.append(module.training))

    def pack(t):
        saved[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ppo_update(policy, make_optimizer(policy.trainable_parameters(), cfg), samples, 2, cfg)
    return modes, saved[0], model.training


def test_update_runs_in_training_mode_and_checkpoints_activations(tiny_model_dir, tmp_path):
    modes, saved_plain, after = _update_once(tiny_model_dir, tmp_path / "plain", False)
    assert modes and all(modes)  # every update forward in training mode: LoRA dropout and checkpointing act
    assert after is False  # back in eval mode for sampling and old log-probs
    modes_gc, saved_gc, _ = _update_once(tiny_model_dir, tmp_path / "gc", True)
    assert all(modes_gc)
    assert saved_gc < saved_plain / 2, f"gradient checkpointing saved {saved_gc} tensors vs {saved_plain} without"


def test_trainer_logprobs_are_at_the_rollout_temperature(tiny_model_dir):
    """At T = 0.7 the trainer's log-probs are those of softmax(logits / T), the distribution sampled
    from (verl's actor divides by the rollout temperature): the gap is float noise, not the T = 1 one."""
    model, tok = _load(tiny_model_dir)
    torch.manual_seed(2)
    ro = HFEngine(model, tok).generate(PROMPTS, SamplingParams(n=3, max_new_tokens=12, temperature=0.7, logprobs=True))
    batch = SeqBatch.from_lists(ro.prompt_ids, ro.response_ids, tok.pad_token_id)

    def gap(policy):
        logp, ent = policy.logprobs(batch, with_entropy=True)
        return max(abs(logp[i, j].item() - ro.sampler_logprobs[i][j]) for i in range(len(ro)) for j in range(len(ro.response_ids[i]))), ent

    at_t, ent_t = gap(Policy(model, tok, temperature=0.7))
    raw, ent_1 = gap(Policy(model, tok))
    assert at_t < 1e-5
    assert raw > 1e-2
    assert (ent_t < ent_1).float().mean() > 0.9  # sharper at T < 1: the entropy is the sampled distribution's too


def test_policy_refuses_a_bad_temperature(tiny_model_dir):
    import pytest

    model, tok = _load(tiny_model_dir)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            Policy(model, tok, temperature=bad)
