"""The learning-rate schedule: nanoGPT's warmup + cosine, and warmup-stable-decay, constant or exponential."""
import math
from dataclasses import dataclass, fields
from types import SimpleNamespace


@dataclass(frozen=True)
class Schedule:
    """A run's learning-rate schedule, its settings the Config keys of the same names (schedule: lr_schedule)."""
    learning_rate: float
    warmup_iters: int
    lr_decay_iters: int
    min_lr: float
    decay_lr: bool = True
    schedule: str = "cosine"
    max_iters: int | None = None
    decay_frac: float = 0.2

    @classmethod
    def of(cls, cfg):
        """The schedule of a run's config (an object with the Config keys)."""
        return cls(**{f.name: getattr(cfg, "lr_schedule" if f.name == "schedule" else f.name) for f in fields(cls)})

    def lr(self, it):
        """Learning rate for optimizer step `it` (0-based). All schedules start with a linear warmup from
        learning_rate/(warmup_iters+1) (never 0) to learning_rate at warmup_iters. Then
          cosine:   nanoGPT's cosine from learning_rate at warmup_iters to min_lr at lr_decay_iters, then min_lr;
          wsd:      hold learning_rate, then a cosine to min_lr over the last decay_frac of max_iters
                    (warmup-stable-decay, tutorial ch01 4.2);
          constant: hold learning_rate (also what decay_lr=False gives);
          exponential: grow from min_lr at the end of warmup to learning_rate at max_iters - 1, by the same factor
                    each step (the learning-rate range test: tools/lr_finder.py)."""
        learning_rate, warmup_iters, min_lr, max_iters = self.learning_rate, self.warmup_iters, self.min_lr, self.max_iters
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if self.schedule == "exponential":
            return min_lr * (learning_rate / min_lr) ** ((it - warmup_iters) / max(1, max_iters - 1 - warmup_iters))
        if not self.decay_lr or self.schedule == "constant":
            return learning_rate
        if self.schedule == "wsd":
            decay_start = max(warmup_iters, max_iters - round(self.decay_frac * max_iters))
            if it < decay_start:
                return learning_rate
            decay_ratio = min(1.0, (it - decay_start) / max(1, max_iters - decay_start))
        else:
            if it >= self.lr_decay_iters:
                return min_lr
            decay_ratio = (it - warmup_iters) / (self.lr_decay_iters - warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
        return min_lr + coeff * (learning_rate - min_lr)


def schedule_of(config, defaults):
    """(steps, learning rates) for every optimizer step of a run with this config (a dict; keys it lacks, e.g. from
    an older run's config.json, take the defaults)."""
    run = SimpleNamespace(**{**defaults, **config})
    schedule = Schedule.of(run)
    steps = list(range(run.max_iters))
    return steps, [schedule.lr(it) for it in steps]
