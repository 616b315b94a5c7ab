"""Two optimizer steps of FIPOGRPOTrainer on fixed completions; run alone or under `accelerate launch`.

    python tests/trl_step_script.py MODEL_DIR OUT --per-device 8
    accelerate launch --cpu --num_processes 2 tests/trl_step_script.py MODEL_DIR OUT --per-device 4

The completions are fixed (a function of the prompt and of its place in its group), so a run with one
process and a run with two see the same global batch of 2 prompts x 4 completions. Process 0 writes
each optimizer step's gradient (after the data-parallel all-reduce, before the optimizer) and the
logged metrics to OUT, for tests/test_trl_plugin.py to compare. num_iterations=2: the second step
reuses the batch with the old log-probs of generation time, so the Future-KL and the influence weights
are live there. No gradient clipping: it would hide a wrong scale. float64: the advantages of a group
cancel, so float32 rounding differences between batch layouts grow to ~1e-3 of the gradient; in
float64 a correct aggregation agrees to ~1e-14 and a wrong one stands out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig

from fipo_lite.integrations.trl import FIPOGRPOTrainer

PROMPTS = [("12+47", 59), ("30+41", 71)]  # one prompt length: left padding would move the log-probs


def reward(completions, ground_truth, **kwargs):
    out = []
    for c, gt in zip(completions, ground_truth):
        text = c[0]["content"] if isinstance(c, list) else c
        nums = re.findall(r"-?\d+", text)
        out.append(-min(abs(int(nums[-1]) - int(gt)), 50) / 10 if nums else -6.0)
    return out


class FixedCompletions(FIPOGRPOTrainer):
    """Completion j of a prompt's group is the same text whichever process holds the group."""

    def _generate_single_turn(self, prompts, *args, **kwargs):
        prompt_ids, _, logprobs, forward_kwargs = super()._generate_single_turn(prompts, *args, **kwargs)
        seen: dict[str, int] = {}
        completion_ids = []
        for p in prompts:
            key = json.dumps(p)
            j = seen[key] = seen.get(key, -1) + 1
            k = [q for q, _ in PROMPTS].index(p[-1]["content"])
            # lengths differ by group, so the processes hold different token counts: a per-process
            # token-mean would then differ from the global one
            text = f"{'9' * (j + 1 + 2 * k)}={PROMPTS[k][1] + 2 * j - 3}"
            ids = self.processing_class(text, add_special_tokens=False)["input_ids"]
            completion_ids.append(ids + ([self.eos_token_id] if j % 2 == 0 else []))
        return prompt_ids, completion_ids, logprobs, forward_kwargs

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)  # what was back-propagated, as the Trainer sums it for its log
        self.step_loss = getattr(self, "step_loss", 0.0) + loss.item()
        return loss


class RecordStep(TrainerCallback):
    """Before each optimizer step: the all-reduced gradient and the loss summed over micro-batches, averaged over processes."""

    def __init__(self, trainer, out: Path):
        self.trainer, self.out = trainer, out

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        acc = self.trainer.accelerator
        loss = acc.gather(torch.tensor([self.trainer.step_loss])).mean().item()
        self.trainer.step_loss = 0.0
        if acc.is_main_process:
            step = state.global_step + 1
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            save_file(grads, str(self.out / f"grads_step{step}.safetensors"))
            (self.out / f"loss_step{step}.json").write_text(json.dumps(loss))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-device", type=int, required=True)
    ap.add_argument("--grad-accum", type=int, default=1)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "ground_truth": str(gt)} for p, gt in PROMPTS])
    args = GRPOConfig(output_dir=str(a.out / "trainer"), per_device_train_batch_size=a.per_device, num_generations=4,
                      gradient_accumulation_steps=a.grad_accum, steps_per_generation=a.grad_accum, num_iterations=2,
                      max_completion_length=8, max_steps=2, learning_rate=5e-3, max_grad_norm=0.0, beta=0.0,
                      logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, shuffle_dataset=False,
                      gradient_checkpointing=False, temperature=1.0)
    trainer = FixedCompletions(model=AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float64),
                               processing_class=AutoTokenizer.from_pretrained(a.model), reward_funcs=[reward], args=args,
                               train_dataset=data, fipo=dict(tau=4.0, fkl_clip_low=0.5, fkl_clip_high=2.0, safety_thresh=10.0))
    trainer.add_callback(RecordStep(trainer, a.out))
    trainer.train()
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        (a.out / "log.json").write_text(json.dumps({"logs": logs, "num_processes": trainer.accelerator.num_processes}))


if __name__ == "__main__":
    main()
