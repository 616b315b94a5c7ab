"""The in-process RL loop: sample -> reward -> advantage -> FIPO/DAPO/GRPO update -> metrics.

Read `train` top to bottom; every helper above it does one thing. The same loop drives the CPU
path (HF engine, float32 LoRA) and the GPU path (vLLM engine, bnb4/unsloth backends): only
`backends.load_model` and `engines.build_engine` differ.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import checkpoint, metrics as M, rundir, samples as S, tracking
from .allocator import keep_freed_memory
from .packed import set_packed_matmul
from .config import gen_batch_size, load_config, policy_loss_kwargs, warmup_steps
from .data import data_specs, encode_within, load_examples, prompt_template, set_name
from .engines import SamplingParams, build_engine
from .errors import UserError
from .example import Example
from .objective import DEFAULT_AGG, policy_loss
from .policy import Policy, SeqBatch, use_lean_forward
from .rollout import evaluate_rollouts, sample_and_score, summarize_sets
from .tasks import classify_form, get_task


# ----------------------------------------------------------------------------- data stream
class PromptStream:
    """Endless, seeded, epoch-shuffled stream of example indices; its state is two integers."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise ValueError("the training data is empty")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make_order()


# ----------------------------------------------------------------------------- rollout + reward
@dataclass
class Group:
    """The n samples of one prompt with their rewards."""

    prompt_ids: list[int]
    responses: list[list[int]]
    truncated: list[bool]
    scores: list[float]
    accs: list[float]
    sampler_logprobs: list[list[float]] | None = None
    texts: list[str] | None = None
    preds: list | None = None  # the answers the reward extracted (None: none found)
    example: Example | None = None
    gen_batch: int = 0  # the dynamic-sampling batch of its step it came from
    advantages: list[float] | None = None  # set when the group is trained on
    components: dict[str, list[float]] | None = None  # with reward.function(s): each reward's unweighted scores


def rollout_groups(engine, tokenizer, examples, prompt_ids, params: SamplingParams, reward_fn,
                   timings: dict | None = None, gen_batch: int = 0) -> tuple[list[Group], int]:
    """Sample n responses per prompt and score them; returns the groups and reward failures (and adds
    the seconds spent sampling and scoring to `timings`)."""
    scored = sample_and_score(engine, tokenizer, examples, prompt_ids, params, reward_fn)
    if timings is not None:
        timings["sample"] = timings.get("sample", 0.0) + scored.sample_s
        timings["reward"] = timings.get("reward", 0.0) + scored.reward_s
    ro, texts, rew = scored.rollout, scored.texts, scored.rewards
    groups = []
    for g, rows in enumerate(scored.rows_by_prompt(len(prompt_ids))):
        groups.append(Group(
            prompt_ids=prompt_ids[g], responses=[ro.response_ids[i] for i in rows], truncated=[ro.truncated[i] for i in rows],
            scores=[float(rew.scores[i]) for i in rows], accs=[float(rew.accs[i]) for i in rows],
            sampler_logprobs=[ro.sampler_logprobs[i] for i in rows] if ro.sampler_logprobs is not None else None,
            texts=[texts[i] for i in rows], preds=[rew.preds[i] for i in rows], example=examples[g], gen_batch=gen_batch,
            components={k: [v[i] for i in rows] for k, v in rew.components.items()},
        ))
    return groups, int(rew.failures)


def group_advantages(scores: list[float], norm_by_std: bool) -> list[float]:
    """(r - mean) / (std + 1e-6) within a group (spec section 8); mean-only for Dr. GRPO."""
    r = torch.tensor(scores, dtype=torch.float64)
    centred = r - r.mean()
    if not norm_by_std:
        return centred.tolist()
    std = r.std() if len(scores) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (centred / (std + 1e-6)).tolist()


def has_signal(group: Group, metric: str) -> bool:
    """DAPO's filter: keep a group whose metric (acc | score) varies, or a single-sample group (as the recipe)."""
    values = {"acc": group.accs, "score": group.scores}[metric]
    return len(values) == 1 or max(values) != min(values)


class DynamicSamplingError(UserError):
    """Dynamic sampling reached max_num_gen_batches with on_cap=error (the recipe's behaviour)."""


def collect_groups(engine, tokenizer, examples, prompt_ids, stream: PromptStream, params: SamplingParams, reward_fn,
                   cfg: DictConfig, timings: dict | None = None) -> tuple[list[Group], list[Group], int, int]:
    """DAPO dynamic sampling as in the recipe's trainer: generation batches of `gen_batch_size` prompts,
    keeping the groups with signal, until train_batch_size groups are kept (the surplus is dropped) or
    max_num_gen_batches is reached, where on_cap decides: stop with an error, or train on fewer groups.
    Returns (groups to train on, every group sampled, generation batches used, reward failures)."""
    t, fg = cfg.trainer, cfg.algorithm.filter_groups
    size = gen_batch_size(cfg)
    kept: list[Group] = []
    sampled: list[Group] = []
    n_gen, failures = 0, 0
    while len(kept) < t.train_batch_size:
        if fg.enable and fg.max_num_gen_batches and n_gen >= fg.max_num_gen_batches:
            if fg.on_cap == "error":
                raise DynamicSamplingError(
                    f"dynamic sampling kept {len(kept)} of trainer.train_batch_size={t.train_batch_size} groups after {n_gen} "
                    f"generation batches of {size} prompts (algorithm.filter_groups.max_num_gen_batches={fg.max_num_gen_batches}): "
                    f"too few prompts give mixed {fg.metric} within a group, the data may be too hard or too easy for the model. "
                    "Raise algorithm.filter_groups.max_num_gen_batches (0: no limit) or trainer.gen_batch_size, or set "
                    "algorithm.filter_groups.on_cap=partial to train on the groups kept")
            break
        n_gen += 1
        idx = stream.take(size)
        groups, fails = rollout_groups(engine, tokenizer, [examples[i] for i in idx], [prompt_ids[i] for i in idx], params, reward_fn,
                                       timings, gen_batch=n_gen - 1)
        failures += fails
        sampled += groups
        kept += [g for g in groups if has_signal(g, fg.metric)] if fg.enable else groups
    return kept[: t.train_batch_size], sampled, n_gen, failures


def group_metrics(groups: list[Group]) -> dict[str, float]:
    """Reward, accuracy and response-length figures of these groups' samples, under metrics' names."""
    flat = [(len(r), tr, sc, ac) for g in groups for r, tr, sc, ac in zip(g.responses, g.truncated, g.scores, g.accs)]
    lengths, truncated, scores, accs = (list(col) for col in zip(*flat)) if flat else ([], [], [], [])
    return M.rollout_stats(lengths, truncated, scores, accs)


def component_metrics(groups: list[Group], names: list[str], sampled: bool = False) -> dict[str, float]:
    """The mean unweighted score of each of reward.function(s) (`names`) over these groups' samples; a
    sample whose reward failed (NaN) is left out, as NaN when none is left (as reward/mean of no groups)."""
    return {M.reward_component(name, sampled): M.nan_mean(v for g in groups for v in (g.components or {}).get(name, ()))
            for name in names}


# ----------------------------------------------------------------------------- update
@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    sampler_logprobs: list[float] | None = None
    old_logp: torch.Tensor | None = None  # [len(response)]


def micro_batches(samples: list[Sample], size: int, token_budget: int) -> list[list[Sample]]:
    """Split by count, or pack by a padded-token budget (long responses) when token_budget > 0."""
    if token_budget <= 0:
        return [samples[i : i + size] for i in range(0, len(samples), size)]
    out, cur, width = [], [], 0
    for s in samples:
        w = max(width, len(s.prompt_ids) + len(s.response_ids))
        if cur and (len(cur) + 1) * w > token_budget:
            out.append(cur)
            cur, w = [], len(s.prompt_ids) + len(s.response_ids)
        cur.append(s)
        width = w
    if cur:
        out.append(cur)
    return out


def to_tensors(mb: list[Sample], pad_id: int, device) -> tuple[SeqBatch, torch.Tensor, torch.Tensor]:
    batch = SeqBatch.from_lists([s.prompt_ids for s in mb], [s.response_ids for s in mb], pad_id)
    B, R = batch.response_mask.shape
    adv = torch.tensor([s.advantage for s in mb], dtype=torch.float32).unsqueeze(1).expand(B, R).contiguous()
    old = torch.zeros(B, R)
    for b, s in enumerate(mb):
        if s.old_logp is not None:
            old[b, : len(s.response_ids)] = s.old_logp
    return batch, adv.to(device), old.to(device)


@torch.no_grad()
def recompute_old_logp(policy: Policy, samples: list[Sample], cfg: DictConfig) -> float:
    """Old log-probs from the trainer (not the sampler), before the first update; returns entropy."""
    ents, counts = 0.0, 0
    for mb in micro_batches(samples, cfg.trainer.micro_batch_size, cfg.trainer.max_tokens_per_micro_batch):
        batch, _, _ = to_tensors(mb, policy.tokenizer.pad_token_id, policy.device)
        logp, ent = policy.logprobs(batch, with_entropy=True)
        for b, s in enumerate(mb):
            s.old_logp = logp[b, : len(s.response_ids)].cpu()
        ents += float((ent * batch.response_mask).sum())
        counts += int(batch.response_mask.sum())
    return ents / max(counts, 1)


def is_on_policy(num_samples: int, n: int, cfg: DictConfig) -> bool:
    """One epoch over one mini-batch: the update's first forward IS the old policy (as verl's and
    TRL's actors, the old log-probs are then that forward's, detached, and no extra pass runs)."""
    return cfg.trainer.ppo_epochs == 1 and num_samples <= cfg.trainer.ppo_mini_batch_size * n


def ppo_update(policy: Policy, optimizer, samples: list[Sample], n: int, cfg: DictConfig, on_policy: bool = False) -> dict[str, float]:
    """ppo_epochs x mini-batches of ppo_mini_batch_size prompts, gradient accumulation over
    micro-batches with ONE denominator per mini-batch (the big-batch gradient, exactly).
    `on_policy` (see is_on_policy): old log-probs and entropy come from the update's own forward."""
    a, t = cfg.algorithm, cfg.trainer
    kw = policy_loss_kwargs(cfg)
    kw["max_response_length"] = cfg.rollout.max_new_tokens
    params = [p for group in optimizer.param_groups for p in group["params"]]
    pad_id = policy.tokenizer.pad_token_id
    mini = t.ppo_mini_batch_size * n
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    n_updates, n_skipped = 0, 0
    ent_sum, ent_count = 0.0, 0
    # Training mode for the update only: transformers checkpoints activations (model.gradient_checkpointing)
    # and LoRA dropout acts only in training mode; sampling and old log-probs run in eval mode.
    policy.model.train()
    for _ in range(t.ppo_epochs):
        for m0 in range(0, len(samples), mini):
            mb_samples = samples[m0 : m0 + mini]
            optimizer.zero_grad(set_to_none=True)
            loss_sum, kept_tok, kept_seq, mb_metrics = 0.0, 0.0, 0.0, []
            for mb in micro_batches(mb_samples, t.micro_batch_size, t.max_tokens_per_micro_batch):
                batch, adv, old = to_tensors(mb, pad_id, policy.device)
                logp, ent = policy.logprobs(batch, with_entropy=on_policy)
                if on_policy:
                    old = logp.detach()
                    for b, s in enumerate(mb):
                        s.old_logp = old[b, : len(s.response_ids)].cpu()
                    ent_sum += float((ent * batch.response_mask.to(ent.device)).sum())
                    ent_count += int(batch.response_mask.sum())
                ref = None
                if a.kl_coef > 0:  # a KL to the reference is a property of the loss, not of the mode (verl's use_kl_loss)
                    with torch.no_grad(), policy.reference():
                        ref, _ = policy.logprobs(batch)
                is_w = None
                if a.tis_cap and all(s.sampler_logprobs is not None for s in mb):
                    samp = torch.zeros_like(old)
                    for b, s in enumerate(mb):
                        samp[b, : len(s.response_ids)] = torch.tensor(s.sampler_logprobs[: len(s.response_ids)])
                    is_w = torch.exp(old - samp).clamp(max=a.tis_cap) * batch.response_mask.to(old.device)
                # denominator=1: sum the loss; divide the accumulated gradient by the mini-batch count below.
                loss, met = policy_loss(old, logp, adv, batch.response_mask, ref_logp=ref, is_weights=is_w, denominator=1.0, **kw)
                loss.backward()
                loss_sum += loss.item()
                kept_tok += met["kept_tokens"]
                kept_seq += met["kept_seqs"]
                mb_metrics.append(met)
            agg = kw.get("loss_agg_mode") or DEFAULT_AGG[a.loss_mode]
            denom = kept_tok if agg == "token-mean" else kept_seq
            if denom > 0:
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(denom)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
                if torch.isfinite(grad_norm):
                    optimizer.step()
                    n_updates += 1
                else:  # as verl's actor: a NaN/inf gradient would poison the weights and Adam's moments; skip it
                    optimizer.zero_grad(set_to_none=True)
                    n_skipped += 1
                    print(f"[fipo_lite] gradient norm is {float(grad_norm)}: optimizer step skipped", file=sys.stderr)
                _acc(sums, counts, "grad_norm", float(grad_norm))
            _acc(sums, counts, "loss", loss_sum / denom if denom > 0 else 0.0)
            for met in mb_metrics:
                for k, v in met.items():
                    if k not in ("loss", "kept_tokens", "kept_seqs"):
                        _acc(sums, counts, k, v)
    policy.model.eval()
    out = {M.ACTOR + k: sums[k] / counts[k] for k in sums if counts[k]}
    out[M.NUM_UPDATES] = n_updates
    out[M.SKIPPED_STEPS] = n_skipped
    if on_policy:
        out[M.ENTROPY] = ent_sum / max(ent_count, 1)
    return out


def _acc(sums: dict, counts: dict, key: str, value: float) -> None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        sums.setdefault(key, 0.0)
        counts.setdefault(key, 0)
        return
    sums[key] = sums.get(key, 0.0) + value
    counts[key] = counts.get(key, 0) + 1


# ----------------------------------------------------------------------------- evaluation, samples, perf
def run_eval(engine, tokenizer, examples, prompt_ids, cfg, reward_fn, step: int, tracker=None,
             sets: list[tuple[str, int]] | None = None) -> dict[str, float]:
    """The periodic evaluation's metrics (with `sets`, data.val's list: each set's too); its samples go to eval/ (log_samples)."""
    params = SamplingParams(n=cfg.trainer.eval_k, temperature=cfg.trainer.eval_temperature, top_p=cfg.trainer.eval_top_p, max_new_tokens=cfg.rollout.max_new_tokens)
    summary, problems = evaluate_rollouts(engine, tokenizer, examples, cfg.trainer.eval_k, params, reward_fn, prompt_ids=prompt_ids)
    if sets:
        summary.update(summarize_sets(problems, sets, cfg.trainer.eval_k))
    log_samples(cfg, S.EVAL_DIR, step, S.eval_rows(step, examples, problems), tracker)
    return summary


def log_samples(cfg: DictConfig, kind: str, step: int, rows: list[dict], tracker=None) -> None:
    """Where a step's sample rows go (samples.py): OUTPUT_DIR/KIND/step_NNNNNN.jsonl; for training
    steps a few on the console every trainer.print_samples_every steps; to the experiment trackers as
    a table (every evaluation, and the training steps that print)."""
    t = cfg.trainer
    if kind == S.ROLLOUTS_DIR and t.log_rollouts_max:
        rows = rows[: t.log_rollouts_max]
    if t.log_rollouts:
        S.write_rows(S.step_file(cfg.output_dir, kind, step), rows)
    shown = bool(rows) and kind == S.ROLLOUTS_DIR and t.print_samples_every > 0 and step % t.print_samples_every == 0
    if shown:
        from tqdm.auto import tqdm

        tqdm.write(f"[fipo_lite] step {step}: {min(t.print_samples_num, len({r['group'] for r in rows}))} of its completions\n"
                   f"{S.format_rows(rows, t.print_samples_num)}", file=sys.stderr)
    if tracker is not None and rows and (kind == S.EVAL_DIR or shown):
        tracker.log_table(kind, rows, step=step)


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak resident memory so far and, on CUDA, the allocator's peak since the last reset (GB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    out = {M.PEAK_RSS_GB: rss / 2**30}
    if device.type == "cuda":
        out[M.MAX_MEMORY_ALLOCATED_GB] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# ----------------------------------------------------------------------------- the loop
def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, cfg):
    t = cfg.trainer
    if t.optimizer == "paged_adamw_8bit":
        from .backends.bnb4 import make_optimizer as bnb_optimizer

        return bnb_optimizer(params, cfg)
    params = list(params)
    # the fused kernel on CPU: one call for all LoRA tensors instead of a loop of small ops (same update)
    fused = bool(params) and all(p.device.type == "cpu" for p in params)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def make_scheduler(optimizer, t):
    """The lr schedule over training steps (trainer.lr_scheduler; stepped once per step)."""
    warmup = warmup_steps(t)  # trainer.warmup_steps, or warmup_ratio x total_steps
    if t.lr_scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    from transformers import get_scheduler

    extra = {"min_lr_rate": t.min_lr_ratio} if t.lr_scheduler == "cosine_with_min_lr" else None
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, t.total_steps),
                         scheduler_specific_kwargs=extra)


def apply_optimizer_config(optimizer, scheduler, t) -> None:
    """Restored optimizer and scheduler states carry the lr and weight decay they were saved with;
    the config's win (a resume allowed to change them must train with the new values)."""
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = t.lr, t.weight_decay
        group["lr"] = t.lr * lam(scheduler.last_epoch)
    scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def train(cfg: DictConfig, reward_callables: dict | None = None) -> dict:
    """Run (or resume) a training run; returns the last step's metrics. The output directory is held
    by this run alone, and a resume must continue the same experiment (see rundir.py). The experiment
    trackers (trainer.logger) are checked before anything loads and closed however the run ends.
    `reward_callables`: {name: function} for the `callable:` rewards the notebook API hands over."""
    from .rewards import RewardRunner, describe

    tracking.require(cfg.trainer.logger)
    # the rewards load first: a missing file or a bad signature stops before the run directory is touched
    reward_fn = RewardRunner(cfg.reward, max_response_length=cfg.rollout.max_new_tokens, callables=reward_callables)
    if reward_fn.named:
        print(f"[fipo_lite] reward = {describe(reward_fn.components)}", file=sys.stderr)
    inputs = rundir.input_digests(cfg)  # the reward and data files' contents, checked on resume like the config
    with rundir.hold(cfg.output_dir), tracking.Tracker() as tracker:
        resume = rundir.open_run(cfg, inputs)  # before the model loads: a refused resume stops at once
        return _train(cfg, resume, reward_fn, tracker, inputs)


def encode_data(tokenizer, examples: list, data_cfg: DictConfig, what: str, template: dict) -> tuple[list, list[list[int]]]:
    """A set's examples and prompt ids, the overlong prompts left out (data.filter_overlong_prompts) and counted."""
    kept, ids, dropped = encode_within(tokenizer, examples, data_cfg.max_prompt_length, drop_overlong=data_cfg.filter_overlong_prompts,
                                       what=what, **template)
    if dropped:
        print(f"[fipo_lite] {what}: left out {dropped} of {len(examples)} prompts longer than data.max_prompt_length="
              f"{data_cfg.max_prompt_length} tokens (data.filter_overlong_prompts=true)", file=sys.stderr)
    return kept, ids


def _short_spec(spec) -> str:
    return spec if isinstance(spec, str) else json.dumps(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec)


def load_val(cfg: DictConfig, tokenizer, template: dict) -> tuple[list, list[list[int]], list[tuple[str, int]] | None]:
    """data.val's examples and prompt ids, data.val_size from each set; for a list of sets also (name, problems)
    of each, in order, for the per-set metrics (one set: None, its metrics are the pooled val/...)."""
    specs = data_specs(cfg.data.val)
    examples, ids, sets = [], [], []
    for spec in specs:
        ex = load_examples(spec, n=cfg.data.val_size, seed=cfg.seed, split="val", prompt_key=cfg.data.prompt_key,
                           answer_key=cfg.data.answer_key)
        ex, p = encode_data(tokenizer, ex, cfg.data, f"data.val {_short_spec(spec)}" if len(specs) > 1 else "data.val", template)
        name = set_name(spec, ex)
        while name in {n for n, _ in sets}:  # two sets of one name: the later one numbered
            name += "_2"
        examples += ex
        ids += p
        sets.append((name, len(ex)))
    return examples, ids, sets if isinstance(cfg.data.val, (list, ListConfig)) else None


def _train(cfg: DictConfig, resume: tuple[Path, dict] | None, reward_fn, tracker: tracking.Tracker, inputs: dict[str, str]) -> dict:
    from .backends import load_model

    t, a, r = cfg.trainer, cfg.algorithm, cfg.rollout
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    set_packed_matmul(t.packed_matmul)  # before any weight is packed (the engine's, the policy's)
    set_seed(cfg.seed)
    model, tokenizer = load_model(cfg)
    # Unsloth replaces the model's forward with its own; the shared-prompt pass is checked on transformers' only.
    policy = Policy(model, tokenizer, t.logprob_chunk_size, share_prompts=t.share_prompt_forward and cfg.model.backend != "unsloth",
                    lean_forward=use_lean_forward(t.lean_forward, model, cfg.model.backend), temperature=r.temperature)
    keep_freed_memory(t.keep_freed_memory, policy.device.type)
    engine = build_engine(cfg, model, tokenizer)
    synthetic = isinstance(cfg.data.train, str) and cfg.data.train.startswith("synthetic:")
    task = get_task(cfg.data.train.split(":", 1)[1]) if synthetic else None
    form_task = task if task is not None and task.step_line is not None else None  # a task with answer forms to count
    train_ex = load_examples(cfg.data.train, n=cfg.data.train_size if synthetic else None, seed=cfg.seed, split="train",
                             prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
    template = prompt_template(cfg.data)  # data.system_prompt, data.chat_template_kwargs
    train_ex, train_ids = encode_data(tokenizer, train_ex, cfg.data, "data.train", template)
    val_ex, val_ids, val_sets = load_val(cfg, tokenizer, template) if t.eval_every > 0 else ([], [], None)
    stream = PromptStream(len(train_ex), cfg.seed, cfg.data.shuffle)
    optimizer = make_optimizer(policy.trainable_parameters(), cfg)
    scheduler = make_scheduler(optimizer, t)

    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    start = 0
    resume_from, state = resume or (None, None)
    if resume_from is not None:
        checkpoint.load_adapter(resume_from, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_config(optimizer, scheduler, t)  # a changed trainer.lr / weight_decay takes effect
        stream.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
        moved = checkpoint.set_aside_after(ckpt_root, resume_from)  # a rollback: the later steps are another branch
        if moved:
            print(f"[fipo_lite] checkpoints after step {start} belong to the branch this resume leaves: moved to {moved[0].parent}",
                  file=sys.stderr)
        engine.sync(policy)  # the sampler starts from the restored adapter, not from the base model
        # drop metrics of steps after the checkpoint: they are about to be redone
        kept = [row for row in M.read_jsonl(metrics_path) if row.get(M.STEP, 0) <= start] if metrics_path.exists() else []
        checkpoint.write_atomic(metrics_path, "".join(json.dumps(row) + "\n" for row in kept))  # an interrupt here keeps the history
        S.prune(out, after=start)  # and their completions
        print(f"[fipo_lite] resumed from {resume_from} at step {start}", file=sys.stderr)
        if start >= t.total_steps:
            print(f"[fipo_lite] {out} already finished {t.total_steps} steps; raise trainer.total_steps to train "
                  "further, or use trainer.resume=never / another output_dir to start over", file=sys.stderr)
            return kept[-1] if kept else {}
    else:
        metrics_path.write_text("")
        S.prune(out, after=-1)  # a previous run's completions

    sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                              logprobs=bool(a.tis_cap) or r.engine == "vllm")
    fg = a.filter_groups
    if fg.enable:
        at_cap = "stop with an error" if fg.on_cap == "error" else "train on the groups kept (metric train/partial_batch = 1)"
        print(f"[fipo_lite] dynamic sampling: generation batches of {gen_batch_size(cfg)} prompts, at most "
              f"{fg.max_num_gen_batches or 'unlimited'} per step; at the cap: {at_cap} (algorithm.filter_groups.on_cap={fg.on_cap})",
              file=sys.stderr)
    tracker.open(cfg, start, resumed=resume_from is not None)  # the console's progress bar starts here

    def record(row: dict) -> None:
        """A step's metrics: metrics.jsonl (what plot and ablate read), then the trackers."""
        M.append_jsonl(metrics_path, row)
        tracker.log(row)

    if start == 0 and t.eval_every > 0:
        record({M.STEP: 0, **run_eval(engine, tokenizer, val_ex, val_ids, cfg, reward_fn, step=0, tracker=tracker, sets=val_sets)})

    row: dict = {}
    for step in range(start + 1, t.total_steps + 1):
        t0 = time.perf_counter()
        if policy.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(policy.device)  # perf/max_memory_allocated_gb: this step's peak
        # 1. rollout with DAPO dynamic sampling: keep groups whose accuracy varies, refill.
        timings: dict[str, float] = {}
        kept, sampled, n_gen, failures = collect_groups(engine, tokenizer, train_ex, train_ids, stream, sampling, reward_fn, cfg, timings)
        t_gen = time.perf_counter() - t0

        # 2. advantages, old log-probs, update.
        samples = []
        for g in kept:
            g.advantages = group_advantages(g.scores, a.norm_adv_by_std)
            for j, (resp, adv) in enumerate(zip(g.responses, g.advantages)):
                samples.append(Sample(g.prompt_ids, resp, adv, g.sampler_logprobs[j] if g.sampler_logprobs else None))
        row = {M.STEP: step}
        if samples:
            on_policy = is_on_policy(len(samples), r.n, cfg)
            t1 = time.perf_counter()
            if not on_policy:
                row[M.ENTROPY] = recompute_old_logp(policy, samples, cfg)
            t2 = time.perf_counter()
            row.update(ppo_update(policy, optimizer, samples, r.n, cfg, on_policy=on_policy))
            row["time/old_logp_s"], row["time/update_s"] = t2 - t1, time.perf_counter() - t2
            trained_tokens = t.ppo_epochs * sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
            row[M.UPDATE_TOKENS_PER_S] = trained_tokens / row["time/update_s"] if row["time/update_s"] > 0 else math.nan
            lengths = [len(s.response_ids) for s in samples]
            row[M.LENGTH_WEIGHTED_ADV] = sum(L * s.advantage for L, s in zip(lengths, samples)) / max(sum(lengths), 1)
            if samples[0].sampler_logprobs is not None:
                gaps = [(s.old_logp - torch.tensor(s.sampler_logprobs[: len(s.response_ids)])).abs().mean().item() for s in samples if len(s.response_ids)]
                row["rollout/logprob_gap"] = sum(gaps) / max(len(gaps), 1)
        with warnings.catch_warnings():  # a step whose groups were all filtered makes no optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
        engine.sync(policy)

        # 3. metrics of the batch trained on (as the recipe), and of everything sampled this step.
        row.update(group_metrics(kept))
        row.update({M.SAMPLED[k]: v for k, v in group_metrics(sampled).items()})
        names = [c.name for c in reward_fn.components] if reward_fn.named else []
        row.update(component_metrics(kept, names))
        row.update(component_metrics(sampled, names, sampled=True))
        row[M.NUM_GEN_BATCHES] = n_gen
        row[M.KEPT_GROUPS] = len(kept)
        row[M.SAMPLED_GROUPS] = len(sampled)
        row[M.PARTIAL_BATCH] = int(len(kept) < t.train_batch_size)
        row[M.REWARD_FAILURES] = failures
        if form_task is not None:  # which answer form the policy chose: the demo's "thinking longer"
            for key, groups in ((M.STEPS_FORM_FRAC, kept), (M.SAMPLED[M.STEPS_FORM_FRAC], sampled)):
                forms = [classify_form(x, form_task) for g in groups for x in g.texts]
                row[key] = forms.count("steps") / len(forms) if forms else math.nan
        row["actor/lr"] = scheduler.get_last_lr()[0]
        row["time/gen_s"] = t_gen  # sampling + scoring, every generation batch of the step
        row["time/sample_s"], row["time/reward_s"] = timings.get("sample", 0.0), timings.get("reward", 0.0)
        sampled_tokens = sum(len(resp) for g in sampled for resp in g.responses)
        row[M.SAMPLE_TOKENS_PER_S] = sampled_tokens / row["time/sample_s"] if row["time/sample_s"] > 0 else math.nan
        log_samples(cfg, S.ROLLOUTS_DIR, step, S.rollout_rows(step, sampled, kept), tracker)
        if t.eval_every > 0 and (step % t.eval_every == 0 or step == t.total_steps):
            row.update(run_eval(engine, tokenizer, val_ex, val_ids, cfg, reward_fn, step=step, tracker=tracker, sets=val_sets))
        row.update(peak_memory(policy.device))
        row["time/step_s"] = time.perf_counter() - t0
        record(row)

        # 4. checkpoint (after eval, so the saved RNG state is the one the next step starts from).
        if t.save_every > 0 and (step % t.save_every == 0 or step == t.total_steps):
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "data": stream.state_dict(), "rng": checkpoint.rng_state(), "inputs": inputs}
            checkpoint.save(ckpt_root, step, model, state, keep=t.keep_checkpoints, config=OmegaConf.to_container(cfg))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fipo_lite train", description="Train a LoRA policy with FIPO / DAPO / GRPO.")
    p.add_argument("--config", help="YAML run config (e.g. configs/tiny_cpu.yaml); defaults apply without one")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.total_steps=20 algorithm.loss_mode=dapo")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.backend == "unsloth":  # Unsloth patches transformers and peft: import it before they load
        from .backends.unsloth import import_unsloth

        try:
            import_unsloth(cfg)
        except (ImportError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        last = train(cfg)
    except UserError as e:  # busy run dir; bad data file, model path or checkpoint; dynamic sampling at its cap
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[fipo_lite] done: {cfg.output_dir} (last step {last.get(M.STEP, 0)})", file=sys.stderr)
    return 0
