"""The chat worker: the Test tab's model in a process of its own, streamed back, ended for GPU jobs and on crashes."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys

import pytest

import chat_worker
import jobs
import runfolder
from conftest import wait_for
from inference_utils import GenerationConfig
from runfolder import StopFlag
from workspace import UserError

PROMPT = "What is the capital of France?"  # a trained prompt: the tuned reply ends in "Zebra!"
GREEDY = GenerationConfig(temperature=0, max_new_tokens=20)
TUNED = ("", "trained", "")  # (model, run, gguf) as the tab passes them


def ask(worker: chat_worker.ChatWorker, prompt: str = PROMPT, use_adapter: bool = True) -> list[str]:
    return list(worker.chat(TUNED, [{"role": "user", "content": prompt}], GREEDY, use_adapter))


@pytest.fixture
def own_workspace(trained_run, demo_model, tmp_path):
    """A workspace of its own holding a copy of the trained run (its GPU lock and jobs touch nobody else)."""
    root = tmp_path / "ws"
    (root / "models").mkdir(parents=True)
    (root / "models" / demo_model.name).symlink_to(demo_model)
    run_dir = jobs.create_run("train", runfolder.stage_settings(trained_run), root, "trained")
    shutil.copytree(trained_run / "adapter", run_dir / "adapter")
    runfolder.write_status(run_dir, state="done")
    return root


@pytest.fixture
def worker(own_workspace):
    handle = chat_worker.ChatWorker(own_workspace)
    yield handle
    handle.end()


@pytest.mark.slow
def test_worker_streams_the_reply_and_keeps_the_model_between_messages(worker):
    chunks = ask(worker)
    assert len(chunks) > 1
    for before, after in itertools.pairwise(chunks):
        assert after.startswith(before) and len(after) > len(before)
    assert "Zebra" in chunks[-1]
    pid = worker.pid
    assert pid != os.getpid() and worker.alive
    base = ask(worker, use_adapter=False)[-1]
    assert "Zebra" not in base and worker.pid == pid  # the same process and model, adapter out
    pairs = list(worker.compare(TUNED, PROMPT, GREEDY))
    assert pairs[-1] == (base, chunks[-1])
    assert "unsloth" not in sys.modules  # the server itself imports no ML stack for chat
    with pytest.raises(UserError, match="prompt is empty"):
        ask(worker, "  ")
    assert worker.pid == pid  # a refused message leaves the worker as it was


@pytest.mark.slow
def test_a_stream_the_page_stopped_reading_leaves_the_worker_in_step(worker):
    stream = worker.chat(TUNED, [{"role": "user", "content": PROMPT}], GREEDY, True)
    assert next(stream)
    stream.close()  # Gradio closes the generator when the user leaves
    assert "Zebra" in ask(worker)[-1]


@pytest.mark.slow
def test_starting_a_gpu_job_ends_the_worker_and_the_next_message_reloads(worker, own_workspace):
    import submit
    from evaluation import EvalConfig

    ask(worker)
    first = worker.pid
    jobs.before_gpu_job(worker.end_for_job)
    try:
        job = submit.submit("eval", EvalConfig(run="trained", max_rows=1), own_workspace)
    finally:
        jobs.GPU_JOB_HOOKS.remove(worker.end_for_job)
    assert not worker.alive  # ended before the job's process was started
    assert f"unloaded because run 'eval-trained' started and needs {chat_worker.job_needs()}" in worker.state_line()
    wait_for(lambda: not jobs.job_status(job).active, timeout=600, what="the eval job")
    assert "Zebra" in ask(worker)[-1]
    assert worker.pid != first
    assert "unloaded because run 'eval-trained' started" in worker.notice


@pytest.mark.slow
def test_a_gpu_job_started_elsewhere_ends_the_worker(worker, own_workspace):
    worker.load(*TUNED)
    lock = jobs.gpu_lock(own_workspace, StopFlag())  # what a job started from the CLI holds while it runs
    try:
        wait_for(lambda: not worker.alive, timeout=30, what="the worker to end")
    finally:
        lock.close()
    assert worker._process.returncode == chat_worker.EXIT_GPU_JOB
    assert "unloaded because a training or export job started" in worker.state_line()
    worker.load(*TUNED)
    assert f"job started and needs {chat_worker.job_needs()}; it was loaded again" in worker.notice


@pytest.mark.slow
def test_a_crash_in_the_worker_is_an_error_and_the_next_message_works(worker):
    stream = worker.chat(TUNED, [{"role": "user", "content": PROMPT}], GREEDY, True)
    next(stream)
    os.kill(worker.pid, signal.SIGKILL)  # what a segfault or the OOM killer does
    with pytest.raises(UserError, match=r"chat worker crashed \(exit code -9\)"):
        list(stream)
    assert "exit code -9" in worker.state_line()
    assert "Zebra" in ask(worker)[-1]


@pytest.mark.slow
def test_an_idle_worker_ends_itself(own_workspace):
    worker = chat_worker.ChatWorker(own_workspace, idle_s=1)
    worker.load(*TUNED)
    wait_for(lambda: not worker.alive, timeout=30, what="the idle worker to end")
    assert worker._process.returncode == 0
    assert "unloaded after a while unused" in worker.state_line()


@pytest.mark.slow
def test_loading_says_what_it_does_and_a_second_request_waits_and_says_why(worker):
    import threading

    lines = list(worker.prepare(*TUNED))
    assert lines == ["Loading the model…"]  # the CPU: no decoding step to compile, so no warming up
    assert worker.info["kind"] == "adapter" and not worker.info["compiled"]
    assert list(worker.prepare(*TUNED)) == []  # loaded already: nothing to wait for
    worker.end()
    first = threading.Thread(target=worker.load, args=TUNED)
    first.start()  # another tab's message loads the model
    try:
        wait_for(lambda: worker.activity, timeout=60, what="the first load to start")
        waiting = next(worker.prepare(*TUNED))
        assert waiting == "Waiting: another request is loading the model (Loading the model)…"
    finally:
        first.join()
    assert "Zebra" in ask(worker)[-1]


@pytest.mark.slow
def test_a_job_started_during_a_reply_ends_it_with_the_text_so_far_and_a_true_reason(demo_workspace):
    import model_utils

    worker = chat_worker.ChatWorker(demo_workspace)
    base = ("", "", "")  # the demo model alone: no run needed
    story = [{"role": "user", "content": "Write a long story about a cat who learns to sail, with many details."}]
    try:
        stream = worker.chat(base, story, GenerationConfig(temperature=0, max_new_tokens=400), True)
        assert next(stream)
        worker.end_for_job(demo_workspace / "runs" / "export-trained")
        with pytest.raises(chat_worker.WorkerEnded, match="'export-trained' started and needs") as ended:
            list(stream)
        # The machine's own words: "the GPU" only where there is one.
        assert ("the GPU" in str(ended.value)) == model_utils.detect_device().cuda
        assert "export-trained" in worker.state_line()
        assert list(worker.chat(base, story, GenerationConfig(temperature=0, max_new_tokens=4), True))
    finally:
        worker.end()
