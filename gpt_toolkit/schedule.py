"""The learning-rate schedule: nanoGPT's warmup + cosine, and warmup-stable-decay, constant or exponential."""
import math
from types import SimpleNamespace


def get_lr(it, *, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True, schedule="cosine",
           max_iters=None, decay_frac=0.2):
    """Learning rate for optimizer step `it` (0-based). All schedules start with a linear warmup from
    learning_rate/(warmup_iters+1) (never 0) to learning_rate at warmup_iters. Then
      cosine:   nanoGPT's cosine from learning_rate at warmup_iters to min_lr at lr_decay_iters, then min_lr;
      wsd:      hold learning_rate, then a cosine to min_lr over the last decay_frac of max_iters
                (warmup-stable-decay, tutorial ch01 4.2);
      constant: hold learning_rate (also what decay_lr=False gives);
      exponential: grow from min_lr at the end of warmup to learning_rate at max_iters - 1, by the same factor
                each step (the learning-rate range test: tools/lr_finder.py)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == "exponential":
        return min_lr * (learning_rate / min_lr) ** ((it - warmup_iters) / max(1, max_iters - 1 - warmup_iters))
    if not decay_lr or schedule == "constant":
        return learning_rate
    if schedule == "wsd":
        decay_start = max(warmup_iters, max_iters - round(decay_frac * max_iters))
        if it < decay_start:
            return learning_rate
        decay_ratio = min(1.0, (it - decay_start) / max(1, max_iters - decay_start))
    else:
        if it >= lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def lr_at(cfg, it):
    """get_lr with a run's config (an object with the Config keys)."""
    return get_lr(it, learning_rate=cfg.learning_rate, warmup_iters=cfg.warmup_iters, lr_decay_iters=cfg.lr_decay_iters,
                  min_lr=cfg.min_lr, decay_lr=cfg.decay_lr, schedule=cfg.lr_schedule, max_iters=cfg.max_iters,
                  decay_frac=cfg.decay_frac)


def schedule_of(config, defaults):
    """(steps, learning rates) for every optimizer step of a run with this config (a dict; keys it lacks, e.g. from
    an older run's config.json, take the defaults)."""
    run = SimpleNamespace(**{**defaults, **config})
    steps = list(range(run.max_iters))
    return steps, [lr_at(run, it) for it in steps]
