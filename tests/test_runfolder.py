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


def test_a_resumed_job_shows_no_eta_until_it_has_its_own_pace(tmp_path):
    before = runfolder.Reporter(tmp_path, clock=Clock())
    before.start(0, 100)
    for step in range(1, 11):
        before.clock.now = step * 30.0  # a slow pace before the stop
        before.progress(step, 100, force=True)
    assert runfolder.read_progress(tmp_path).eta_s == pytest.approx(2700, rel=0.01)
    resumed = runfolder.Reporter(tmp_path, clock=Clock())  # the resumed job's process
    assert runfolder.read_progress(tmp_path).eta_s is None and runfolder.read_progress(tmp_path).step == 10
    resumed.start(10, 100)
    for step in range(11, 21):
        resumed.clock.now = (step - 10) * 1.0  # the resumed pace: 1 s a step
        resumed.progress(step, 100, force=True)
    assert runfolder.read_progress(tmp_path).eta_s == pytest.approx(80, rel=0.05)


def test_the_eta_counts_down_during_a_long_step(tmp_path):
    reporter = runfolder.Reporter(tmp_path, clock=Clock())
    reporter.start(0, 4)
    reporter.clock.now = 60.0
    reporter.progress(1, 4, force=True)  # 60 s a step: 180 s to go, then no report while the next step runs
    assert runfolder.read_progress(tmp_path).eta_s == pytest.approx(180, abs=1)
    data = runfolder.read_json(tmp_path / "progress.json")
    runfolder.write_json(tmp_path / "progress.json", {**data, "updated": data["updated"] - 50})
    assert runfolder.read_progress(tmp_path).eta_s == pytest.approx(130, abs=1)
    runfolder.write_json(tmp_path / "progress.json", {**data, "updated": data["updated"] - 500})
    assert runfolder.read_progress(tmp_path).eta_s is None  # run out: the step takes longer than the pace said


def test_the_event_log_drops_the_eta_at_a_stop_and_takes_the_resumed_pace(tmp_path):
    before = runfolder.Reporter(tmp_path, clock=Clock())
    before.start(0, 100)
    for step in range(1, 6):
        before.clock.now = step * 30.0
        before.log(step, 100, loss=1.0)
    events = runfolder.EventLog(tmp_path).update()
    assert events.latest["eta_s"] == pytest.approx(2850, rel=0.05)
    before.end("stopped")
    assert "eta_s" not in events.update().latest  # stopped: no ETA
    resumed = runfolder.Reporter(tmp_path, clock=Clock())
    resumed.start(5, 100)
    for step in range(6, 11):
        resumed.clock.now = (step - 5) * 1.0
        resumed.log(step, 100, loss=1.0)
    assert events.update().latest["eta_s"] == pytest.approx(90, rel=0.05)  # the resumed pace, 1 s a step
