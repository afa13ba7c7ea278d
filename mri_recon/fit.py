"""The training loop every method shares: AdamW with train.py's warm-up + cosine schedule, gradient clipping,
an optional time budget, and model selection on the validation split."""

import dataclasses
import math
import time

import numpy as np
import torch

from train import Schedule


@dataclasses.dataclass
class FitResult:
    losses: list  # training loss per step
    checks: list  # [(step, validation loss)], lower is better
    best_step: int  # the step whose parameters the model holds after fit (the last one without validation)


def fit(name, params, loss_fn, batches, steps, lr, seconds=0, validate=None, checks=4):
    """AdamW with train.py's schedule (linear warm-up over 5% of the steps, cosine decay to 10% of lr);
    gradient clipping at 1.
    seconds > 0: from the pace of steps 6-15 (and the cost of one validation), shorten the run (and its
    schedule) to fit in that many seconds.
    validate: () -> validation loss, run `checks` times spread over the run (the last at the end); the
    parameters of the best check are restored at the end (model selection on the validation split)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(lr, steps)
    losses, val_checks, best, t0, step = [], [], (math.inf, steps, None), time.time(), 0

    def check():
        nonlocal best
        t = time.time()
        val = float(validate())
        val_checks.append((step, val))
        if val < best[0]:
            best = (val, step, [p.detach().clone() for p in params])
        print(
            f"  [{name}] step {step} validation loss {val:.4f} (best {best[0]:.4f} at step {best[1]})",
            flush=True,
        )
        return time.time() - t

    while step < schedule.max_steps:
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step)
        loss = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if seconds and step == 5:
            t5 = time.time()  # steps 1-5 warm up (cuDNN, allocator)
        if seconds and step == 15:
            per_step = (time.time() - t5) / 10
            check_cost = check() * (checks - 1) if validate else 0.0  # this check is the first of `checks`
            left = seconds - (time.time() - t0) - check_cost
            schedule = warmup_cosine(lr, min(steps, max(15, 15 + int(left / per_step))))
            print(
                f"  [{name}] {per_step:.3f}s/step: {schedule.max_steps} steps fit in {seconds:.0f}s",
                flush=True,
            )
        total = schedule.max_steps
        every = max(1, total // 10)
        if step % every == 1 or step == total:
            elapsed = time.time() - t0
            print(
                f"  [{name}] step {step}/{total} loss {np.mean(losses[-every:]):.4f} "
                f"({elapsed:.0f}s, ETA {elapsed / step * (total - step):.0f}s)",
                flush=True,
            )
        due = step % max(1, total // checks) == 0 or step == total
        if validate and due and not (seconds and step == 15):  # a timed run checked at step 15 already
            check()
    if best[2] is None:
        return FitResult(losses, val_checks, step)
    with torch.no_grad():
        for p, value in zip(params, best[2]):
            p.copy_(value)
    return FitResult(losses, val_checks, best[1])


def warmup_cosine(lr, steps):
    """train.py's schedule over `steps` steps: warm-up over 5% of them, cosine decay to 10% of lr."""
    return Schedule(peak_lr=lr, min_lr=0.1 * lr, warmup_steps=max(1, steps // 20), max_steps=steps)
