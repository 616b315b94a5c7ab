"""TRL plug-in: a few real GRPOTrainer steps on the tiny model (CPU, trl 0.24), FIPO diagnostics logged,
and the loss equal to fipo_lite.policy_loss on the same tensors."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")


def _reward(completions, ground_truth, **kwargs):
    """Closeness of the last integer to the answer: graded, so every group has a learning signal."""
    out = []
    for c, gt in zip(completions, ground_truth):
        text = c[0]["content"] if isinstance(c, list) else c
        nums = re.findall(r"-?\d+", text)
        out.append(-min(abs(int(nums[-1][:6]) - int(gt)), 200) / 100 if nums else -2.0)
    return out


def test_fipo_grpo_trainer_runs_and_matches_policy_loss(tiny_warm_model_dir, tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fipo_lite
    from fipo_lite.integrations import trl as plugin
    from fipo_lite.tasks import make_examples

    calls = []
    real = plugin.policy_loss

    def recording(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append((tuple(a.detach().clone() for a in args), dict(kwargs), loss.detach().clone()))
        return loss, metrics

    monkeypatch.setattr(plugin, "policy_loss", recording)
    ex = make_examples("addition", 8, seed=0)
    data = Dataset.from_list([{"prompt": e.prompt, "ground_truth": e.ground_truth} for e in ex])
    tok = AutoTokenizer.from_pretrained(tiny_warm_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_warm_model_dir)
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=24,
                          steps_per_generation=2, max_steps=4, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, beta=0.0,
                          temperature=1.0, save_strategy="no", num_iterations=2, seed=0, gradient_checkpointing=False)
    trainer = plugin.FIPOGRPOTrainer(model=model, processing_class=tok, reward_funcs=[_reward], args=args, train_dataset=data,
                                     fipo=dict(tau=16.0, fkl_clip_low=0.8, fkl_clip_high=1.2, safety_thresh=3.0))
    trainer.train()

    assert len(calls) >= 2
    for args_, kwargs, loss in calls:
        old, logp, adv, mask = args_
        assert kwargs["mode"] == "fipo" and kwargs["tau"] == 16.0 and kwargs["clip_low"] == pytest.approx(0.2)
        again, _ = fipo_lite.policy_loss(old, logp, adv, mask, **kwargs)
        assert torch.equal(again, loss)
        assert math.isfinite(loss.item())
    # one generation batch (8 completions) feeds 2 micro-batches, each its own optimizer step: each step's
    # token-mean is over its own tokens, i.e. denominator = the generation batch's tokens / steps_per_generation
    masks = [c[0][3].sum().item() for c in calls[:2]]
    for _, kwargs, _ in calls[:2]:
        assert kwargs["denominator"] == pytest.approx(sum(masks) / 2)
    # with num_iterations=2 the second pass over a batch sees real old log-probs, so the ratio moves
    assert any(not torch.equal(c[0][0], c[0][1]) for c in calls)
    logged = [h for h in trainer.state.log_history if "fipo/influence_mean" in h]
    assert logged, trainer.state.log_history
    for h in logged:
        assert 0.8 <= h["fipo/influence_mean"] <= 1.2 and "fipo/clip_frac" in h and "fipo/policy_kl" in h


def test_refuses_knobs_that_trl_owns(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_lite.integrations.trl import FIPOGRPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1"}], "ground_truth": "2"}] * 4)
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                          max_steps=1, report_to=[], use_cpu=True, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="clip_low"):
        FIPOGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), reward_funcs=[_reward], args=args,
                        train_dataset=data, fipo=dict(clip_low=0.1))


def _addition_data(n=8):
    from datasets import Dataset

    from fipo_lite.tasks import make_examples

    return Dataset.from_list([{"prompt": e.prompt, "ground_truth": e.ground_truth} for e in make_examples("addition", n, seed=0)])


def test_readme_configuration_moves_the_influence_weights(tiny_warm_model_dir, tmp_path):
    """The README's example (FIPOGRPOConfig defaults), scaled to the tiny model: one generation batch feeds
    8 optimizer steps, TRL passes old log-probs, and after the first step the influence weights leave 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_lite.integrations.trl import FIPOGRPOConfig, FIPOGRPOTrainer

    args = FIPOGRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, max_completion_length=24,
                          beta=0.0, max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                          save_strategy="no", seed=0, gradient_checkpointing=False)
    assert args.steps_per_generation == 8 and args.epsilon_high == 0.28
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an off-policy configuration: no "FIPO runs as DAPO" warning
        trainer = FIPOGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_warm_model_dir), reward_funcs=[_reward],
                                  processing_class=AutoTokenizer.from_pretrained(tiny_warm_model_dir), args=args,
                                  train_dataset=_addition_data())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "fipo/influence_max" in h]
    assert len(logged) == 3, trainer.state.log_history
    assert logged[0]["fipo/influence_max"] == pytest.approx(1.0, abs=1e-4)  # first step after generation: on-policy
    assert all(h["fipo/influence_max"] > 1.01 for h in logged[1:]), logged  # later steps: off-policy, FIPO acts
    assert all(h["fipo/influence_mean"] > 1.0 for h in logged[1:]), logged


def test_warns_when_fipo_would_run_as_dapo(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fipo_lite.config import AlgorithmConfig
    from fipo_lite.integrations.trl import FIPOGRPOConfig, FIPOGRPOTrainer

    def make(args, **fipo):
        return FIPOGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[_reward],
                               processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), args=args,
                               train_dataset=_addition_data(4), fipo=fipo)

    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                  max_steps=1, report_to=[], use_cpu=True, gradient_checkpointing=False)
    with pytest.warns(UserWarning, match="FIPO runs as DAPO.*Set steps_per_generation"):
        trainer = make(trl.GRPOConfig(**common))  # TRL's defaults: steps_per_generation == gradient_accumulation_steps
    assert trainer.fipo_kwargs["tau"] == AlgorithmConfig().tau and trainer.fipo_kwargs["fkl_clip_high"] == AlgorithmConfig().fkl_clip_high
    with pytest.warns(UserWarning, match="steps_per_generation=16"):
        make(FIPOGRPOConfig(**common, steps_per_generation=2, gradient_accumulation_steps=2))  # explicit choice kept, still DAPO
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make(trl.GRPOConfig(**common, num_iterations=2))  # a second pass over each batch is off-policy
        make(trl.GRPOConfig(**common), mode="dapo")  # asked for DAPO: nothing to warn about
    assert FIPOGRPOConfig(**common, generation_batch_size=8).steps_per_generation == 2  # explicit size respected
    with pytest.raises(ValueError, match="not a FIPO knob"):
        make(FIPOGRPOConfig(**common), decay=8)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_same_step_as_one(tiny_model_dir, tmp_path):
    """FIPOGRPOTrainer under `accelerate launch --multi_gpu --num_processes 2` (gloo on a CPU) takes the
    optimizer steps of one process on the same completions: same loss, same all-reduced gradient, both
    on-policy (step 1) and with live influence weights (step 2); so does one process with gradient
    accumulation over two micro-batches. The token-mean is over the global batch, not each process's.
    (`accelerate launch --cpu --num_processes 2` would start one process: accelerate's simple launcher.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = str(Path(__file__).with_name("trl_step_script.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    runs = {"one": [sys.executable, script, str(tiny_model_dir), str(tmp_path / "one"), "--per-device", "8"],
            "two": [*launch, script, str(tiny_model_dir), str(tmp_path / "two"), "--per-device", "4"],
            "accum": [sys.executable, script, str(tiny_model_dir), str(tmp_path / "accum"), "--per-device", "4", "--grad-accum", "2"]}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    assert json.loads((tmp_path / "two" / "log.json").read_text())["num_processes"] == 2
    logs = json.loads((tmp_path / "one" / "log.json").read_text())["logs"]
    assert logs[0]["fipo/influence_max"] == pytest.approx(1.0) and logs[1]["fipo/influence_max"] > 1.01  # FIPO live in step 2
    for step in (1, 2):
        ref = load_file(str(tmp_path / "one" / f"grads_step{step}.safetensors"))
        ref_loss = json.loads((tmp_path / "one" / f"loss_step{step}.json").read_text())
        ref_norm = sum(g.norm() ** 2 for g in ref.values()) ** 0.5
        assert ref_norm > 0
        for name in ("two", "accum"):
            got = load_file(str(tmp_path / name / f"grads_step{step}.safetensors"))
            assert set(got) == set(ref)
            diff = sum((got[k] - ref[k]).norm() ** 2 for k in ref) ** 0.5
            assert diff / ref_norm < 1e-9, (name, step, float(diff / ref_norm))
            loss = json.loads((tmp_path / name / f"loss_step{step}.json").read_text())
            assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12), (name, step)
