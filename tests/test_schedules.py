"""Learning-rate schedules against hand-computed values, and the scheduler's resume from a bare step."""

from __future__ import annotations

import math

import pytest
import torch

from launcher.config import ScheduleConfig
from launcher.schedules import lr_multiplier, make_scheduler, schedule_steps

SPE, TOTAL = 10, 100  # steps per epoch, total steps


def values(cfg: ScheduleConfig, steps: list[int]) -> list[float]:
    s = schedule_steps(cfg, SPE, TOTAL)
    return [lr_multiplier(step, s, cfg) for step in steps]


def test_linear_warmup_then_cosine():
    cfg = ScheduleConfig(
        warmup="linear", warmup_steps=10, warmup_start_factor=0.1, decay="cosine", min_lr_factor=0.1
    )
    # start, middle of warm-up, last warm-up step, end of warm-up, middle of cosine, last step, end, beyond
    assert values(cfg, [0, 5, 9, 10, 55, 99, 100, 120]) == pytest.approx(
        [0.1, 0.55, 0.91, 1.0, 0.55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), 0.1, 0.1]
    )


def test_exponential_warmup():
    cfg = ScheduleConfig(warmup="exponential", warmup_steps=10, warmup_start_factor=0.01, decay="constant")
    assert values(cfg, [0, 5, 10, 50]) == pytest.approx([0.01, 0.1, 1.0, 1.0])


def test_constant_warmup_holds_the_start_factor():
    cfg = ScheduleConfig(warmup="constant", warmup_steps=10, warmup_start_factor=0.1, decay="constant")
    assert values(cfg, [0, 9, 10, 99]) == pytest.approx([0.1, 0.1, 1.0, 1.0])


def test_warmup_in_epochs_converts_to_steps():
    cfg = ScheduleConfig(warmup="linear", warmup_epochs=0.5, warmup_start_factor=0.0, decay="constant")
    assert schedule_steps(cfg, SPE, TOTAL).warmup == 5
    assert values(cfg, [0, 1, 4, 5]) == pytest.approx([0.0, 0.2, 0.8, 1.0])


def test_step_decay_counts_from_the_start():
    cfg = ScheduleConfig(decay="step", step_size_epochs=3, gamma=0.1)
    assert values(cfg, [0, 29, 30, 59, 60, 99]) == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])


def test_multistep_milestones_in_epochs():
    cfg = ScheduleConfig(decay="multistep", milestones_epochs=(2, 5), gamma=0.5)
    assert values(cfg, [0, 19, 20, 49, 50, 99]) == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])


def test_warmup_then_multistep():
    cfg = ScheduleConfig(
        warmup="linear",
        warmup_steps=4,
        warmup_start_factor=0.2,
        decay="multistep",
        milestones_epochs=(2,),
        gamma=0.1,
    )
    assert values(cfg, [0, 2, 4, 19, 20]) == pytest.approx([0.2, 0.6, 1.0, 1.0, 0.1])


def test_scheduler_resumes_from_the_step_alone():
    """A fresh LambdaLR positioned at step k gives the lrs an uninterrupted one gives from step k on."""
    cfg = ScheduleConfig(warmup="exponential", warmup_steps=7, warmup_start_factor=0.05, decay="cosine")
    steps = schedule_steps(cfg, SPE, TOTAL)

    def run(start: int, n: int, optimizer: torch.optim.Optimizer) -> list[float]:
        sched = make_scheduler(optimizer, steps, cfg, last_step=start)
        lrs = []
        for _ in range(n):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            sched.step()
        return lrs

    straight = run(0, 30, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    first = run(0, 12, opt)
    saved = opt.state_dict()
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    opt2.load_state_dict(saved)  # as a resume does: the param groups carry initial_lr
    assert first + run(12, 18, opt2) == straight
    assert straight[0] == pytest.approx(0.4 * 0.05) and straight[7] == pytest.approx(0.4)
