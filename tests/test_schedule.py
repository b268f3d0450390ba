"""The learning-rate schedule: nanoGPT's warmup + cosine, never zero at step 0."""
import math

import pytest

from gpt_toolkit.training.schedule import Schedule


def get_lr(it, **settings):  # the schedule's learning rate at step it
    return Schedule(**settings).lr(it)


LR, WARMUP, DECAY, MIN = 1e-3, 100, 5000, 1e-4


def lr(it, decay_lr=True):
    return get_lr(it, learning_rate=LR, warmup_iters=WARMUP, lr_decay_iters=DECAY, min_lr=MIN, decay_lr=decay_lr)


def test_first_step_is_not_zero():
    assert lr(0) == pytest.approx(LR / (WARMUP + 1))
    assert get_lr(0, learning_rate=LR, warmup_iters=0, lr_decay_iters=DECAY, min_lr=MIN) == pytest.approx(LR)


def test_warmup_is_linear_and_ends_at_peak():
    assert lr(49) == pytest.approx(LR * 50 / 101)
    assert lr(99) == pytest.approx(LR * 100 / 101)
    assert lr(WARMUP) == pytest.approx(LR)


def test_cosine_midpoint_end_and_after():
    mid = WARMUP + (DECAY - WARMUP) // 2
    assert lr(mid) == pytest.approx(MIN + 0.5 * (LR - MIN))
    assert lr(1000) == pytest.approx(MIN + 0.5 * (1 + math.cos(math.pi * 900 / 4900)) * (LR - MIN))
    assert lr(DECAY) == pytest.approx(MIN)
    assert lr(DECAY + 1) == MIN and lr(10 * DECAY) == MIN


def test_decay_off_keeps_warmup_then_holds():
    assert lr(0, decay_lr=False) == pytest.approx(LR / (WARMUP + 1))
    assert lr(WARMUP, decay_lr=False) == LR
    assert lr(DECAY + 10, decay_lr=False) == LR
    assert get_lr(0, learning_rate=LR, warmup_iters=0, lr_decay_iters=DECAY, min_lr=MIN, decay_lr=False) == LR


def test_schedule_is_monotone_after_warmup():
    values = [lr(i) for i in range(WARMUP, DECAY + 1, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_equal_to_decay_does_not_divide_by_zero():
    assert get_lr(100, learning_rate=LR, warmup_iters=100, lr_decay_iters=100, min_lr=MIN) == MIN
