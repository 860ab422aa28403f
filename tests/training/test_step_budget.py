"""A time budget fits the step count to the measured pace, and the schedule follows the count."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from iadgpt.training.config import TrainConfig
from iadgpt.training.trainer import StepBudget, TrainingSetupError, build_optimizer


def run_clock(budget: StepBudget, first_step_seconds: float, step_seconds: float) -> tuple[int, float]:
    """Step as the loop does under a fake clock; returns (steps taken, seconds used)."""
    step, elapsed = 0, 0.0
    while step < budget.total_steps:
        step += 1
        elapsed += first_step_seconds if step == 1 else step_seconds
        budget.update(step, elapsed)
        if budget.out_of_time:
            break
    return step, elapsed


@pytest.mark.parametrize("planned", [10, 1000])
def test_a_wrong_plan_is_refitted_to_end_with_the_time(planned):
    budget = StepBudget(planned, max_minutes=1.0, fit_steps_to_minutes=True)
    steps, seconds = run_clock(budget, first_step_seconds=5.0, step_seconds=2.0)
    # 5 s for the first step, then 2 s each: 1 + (60 - 5) / 2 = 28.5 steps fit in the minute
    assert steps == 28 and not budget.out_of_time and seconds == pytest.approx(59.0)
    assert budget.tenths_passed == 9


def test_a_slow_start_does_not_end_the_run_early():
    """Four slow steps (workers starting, a busy neighbour) then fast ones: the plan follows the
    recent pace, and a run that reaches its count with time left re-plans instead of stopping."""
    budget = StepBudget(20, max_minutes=1.0, fit_steps_to_minutes=True)
    step, elapsed = 0, 0.0
    while step < budget.total_steps and not budget.out_of_time:
        step += 1
        elapsed += 8.0 if step <= 4 else 0.5
        budget.update(step, elapsed)
    assert 54.0 <= elapsed <= 60.0 and step > 50, (step, elapsed)


def test_without_fitting_the_plan_stands_and_the_time_limit_stops_it():
    assert run_clock(StepBudget(10, max_minutes=1.0), 5.0, 2.0) == (10, 23.0)
    budget = StepBudget(1000, max_minutes=1.0)
    steps, seconds = run_clock(budget, 5.0, 2.0)
    assert budget.out_of_time and steps == 29 and seconds == 61.0  # the first step past the minute
    assert StepBudget(10).total_steps == 10 and run_clock(StepBudget(10), 5.0, 2.0) == (10, 23.0)


def test_fitting_needs_a_time_budget():
    with pytest.raises(TrainingSetupError, match="fit_steps_to_minutes needs max_minutes"):
        StepBudget(10, fit_steps_to_minutes=True)


def lrs(scheduler, ticks):
    values = []
    for _ in range(ticks):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("processes", [1, 2])
def test_the_schedule_is_transformers_warmup_cosine(processes):
    cfg = TrainConfig(learning_rate=1e-3, warmup_ratio=0.1)
    model = torch.nn.Linear(2, 2)
    _, ours = build_optimizer(cfg, model, StepBudget(40), processes)
    reference_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference = get_cosine_schedule_with_warmup(reference_optimizer, math.ceil(0.1 * 40 * processes), 40 * processes)
    assert lrs(ours, 40 * processes) == pytest.approx(lrs(reference, 40 * processes), abs=1e-12)


def test_the_schedule_follows_a_refitted_horizon():
    cfg = TrainConfig(learning_rate=1e-3, warmup_ratio=0.1)
    budget = StepBudget(100)
    _, scheduler = build_optimizer(cfg, torch.nn.Linear(2, 2), budget, 1)
    lrs(scheduler, 30)
    budget.total_steps = 40  # re-planned shorter: the cosine now ends at step 40
    tail = lrs(scheduler, 11)
    assert tail[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(tail, tail[1:]))
    # the rate of tick 30 was set under the old horizon; tick 31 is 21 / 30 into the new cosine
    assert tail[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 20 / 90)))
    assert tail[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 21 / 30)))
