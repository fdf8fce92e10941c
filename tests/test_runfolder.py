"""The run's own ETA (runfolder.Reporter) on a synthetic sequence of step times."""

from __future__ import annotations

import pytest

import runfolder


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_after_the_first_tenth_ignores_the_slow_first_steps():
    """A compile-heavy first step (20 s) and a warm-up (3 s, 2 s), then 1 s a step: the mean since start would read
    the remaining 90 steps at ~3.5 s each; the recent pace reads them at ~1 s."""
    clock = Clock()
    reporter = runfolder.Reporter(None, clock=clock)
    reporter.start(0, 100)
    durations = [20.0, 3.0, 2.0] + [1.0] * 97
    etas = {}
    for step, seconds in enumerate(durations, start=1):
        clock.now += seconds
        reporter.log(step, 100, loss=1.0)
        etas[step] = reporter.latest.eta_s
    remaining_after_tenth = sum(durations[10:])
    assert etas[10] == pytest.approx(remaining_after_tenth, rel=0.15)
    assert etas[50] == pytest.approx(sum(durations[50:]), rel=0.05)
    assert etas[100] == 0


def test_eta_needs_a_step():
    reporter = runfolder.Reporter(None, clock=Clock())
    reporter.start(0, 10)
    assert reporter.eta(0, 10) is None and reporter.eta(None, 10) is None


def test_eta_on_varied_lengths_counts_the_long_steps_too():
    """Varied row lengths: most steps are short, every fourth pads to a long row (2 s). A median would read the
    rest at 0.5 s a step and say 36 % too little; the mean of the recent steps holds within 15 %."""
    clock = Clock()
    reporter = runfolder.Reporter(None, clock=clock)
    reporter.start(0, 80)
    durations = [6.0] + [2.0 if step % 4 == 3 else 0.5 for step in range(1, 80)]
    etas = {}
    for step, seconds in enumerate(durations, start=1):
        clock.now += seconds
        reporter.log(step, 80, loss=1.0)
        etas[step] = reporter.latest.eta_s
    for step in (8, 20, 40):
        assert etas[step] == pytest.approx(sum(durations[step:]), rel=0.15), step
