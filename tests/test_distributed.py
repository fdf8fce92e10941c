"""Distributed training on the CPU: two processes (torchrun, gloo) train the demo model as one run."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from safetensors import safe_open

import jobs
import runfolder
from conftest import capital_rows, demo_train_config, wait_for, write_jsonl
from dataset_utils import DatasetConfig
from distributed import gpu_launch
from train_config import TrainConfig
from workspace import UserError, config_to_dict


def ddp_config(data: Path, **changes) -> TrainConfig:
    """Short sequences and two rows per process: a few DDP steps take seconds on two CPU cores."""
    return demo_train_config(
        data, **{"max_steps": 4, "per_device_train_batch_size": 2, "max_seq_length": 96, "save_steps": 4, **changes}
    )


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "capitals.jsonl", capital_rows(32))


def ended(run_dir: Path) -> dict:
    status = jobs.job_status(run_dir)
    return status if not status.active else None


def processes_of(run_dir: Path) -> list[int]:
    """Pids of live processes whose command line names this run folder (the launcher and its ranks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run_dir) in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def rank_pid(run_dir: Path, rank: int) -> int | None:
    for pid in processes_of(run_dir):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def adapter_layout(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}


# ---------------------------------------------------------------- choosing processes


def test_more_gpus_than_visible_is_refused_with_what_is_visible(tmp_path):
    config = TrainConfig(dataset=DatasetConfig(source=str(tmp_path / "data.jsonl")), num_gpus=2)
    with pytest.raises(UserError, match=r"num_gpus is 2 but this machine has 0 visible GPU\(s\): none"):
        config.validate()
    with pytest.raises(UserError, match="num_gpus is 2"):
        gpu_launch(2)


def test_bad_num_gpus_values_are_refused(tmp_path):
    for value in (-1, 1.5, True):
        config = TrainConfig(dataset=DatasetConfig(source=str(tmp_path / "data.jsonl")), num_gpus=value)
        with pytest.raises(UserError, match="num_gpus"):
            config.validate()


def test_a_run_asking_for_absent_gpus_fails_before_any_process_starts(demo_workspace, data_file):
    run_dir = jobs.create_run("train", config_to_dict(ddp_config(data_file, num_gpus=3)), demo_workspace, "too-many")
    with pytest.raises(UserError, match="num_gpus is 3"):
        jobs.start_job(run_dir)
    status = jobs.job_status(run_dir)
    assert status.state == "failed" and "num_gpus is 3" in status.error


def test_several_processes_launch_through_torchrun_on_a_free_port(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    try:
        command = jobs.launch_command(tmp_path, resume=True, processes=2)
        ports = {jobs.free_port() for _ in range(20)}
    finally:
        busy.close()
    assert command[1:4] == ["-m", "torch.distributed.run", "--nnodes=1"]
    assert "--nproc-per-node=2" in command and command[-3:] == ["run", str(tmp_path), "--resume"]
    port = int(next(arg for arg in command if arg.startswith("--master-port=")).split("=")[1])
    assert port != taken and taken not in ports
    assert jobs.launch_command(tmp_path, resume=False, processes=1)[1:] == [
        str(jobs.ROOT / "main.py"),
        "run",
        str(tmp_path),
    ]


# ---------------------------------------------------------------- two CPU processes


@pytest.mark.slow
def test_two_processes_train_one_run_logged_once_with_the_one_process_adapter_format(
    demo_workspace, data_file, trained_run
):
    run_dir = jobs.create_run("train", config_to_dict(ddp_config(data_file)), demo_workspace, "ddp")
    jobs.start_job(run_dir, processes=2)
    status = wait_for(lambda: ended(run_dir), timeout=600)
    assert status.state == "done", f"{status.error}\n{runfolder.log_tail(run_dir, 40)}"
    assert status.processes == 2

    events = runfolder.read_events(run_dir)
    starts = [event for event in events if event.kind == "start"]
    assert len(starts) == 1 and starts[0].metrics["processes"] == 2
    steps = [event.step for event in events if event.kind == "log" and "loss" in event.metrics]
    assert steps == [1, 2, 3, 4]  # rank 0 alone writes: each step once
    losses = [event.metrics["loss"] for event in events if "loss" in event.metrics]
    assert all(loss == loss for loss in losses)  # no NaN

    adapter, single = run_dir / "adapter", trained_run / "adapter"
    assert {path.name for path in adapter.iterdir()} == {path.name for path in single.iterdir()}
    assert adapter_layout(adapter) == adapter_layout(single)
    assert (run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    wait_for(lambda: not processes_of(run_dir), timeout=60)  # the ranks and torchrun exit once done is written


@pytest.mark.slow
def test_a_dying_rank_fails_the_job_and_ends_the_other_rank(demo_workspace, data_file):
    run_dir = jobs.create_run(
        "train", config_to_dict(ddp_config(data_file, max_steps=500, save_steps=500)), demo_workspace, "ddp-dies"
    )
    jobs.start_job(run_dir, processes=2)
    wait_for(lambda: any("loss" in event.metrics for event in runfolder.read_events(run_dir)), timeout=600)
    os.kill(wait_for(lambda: rank_pid(run_dir, 1), timeout=30), signal.SIGKILL)

    status = wait_for(lambda: ended(run_dir), timeout=120)
    assert status.state == "failed"
    wait_for(lambda: not processes_of(run_dir), timeout=90)  # torchrun ends rank 0: nothing hangs
    assert jobs.job_status(run_dir).state == "failed"
    assert not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_two_process_run_stops_with_a_checkpoint_and_resumes_to_the_end(demo_workspace, data_file):
    config = ddp_config(data_file, max_steps=8, save_steps=100)
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "ddp-stop")
    jobs.start_job(run_dir, processes=2)
    wait_for(lambda: any("loss" in event.metrics for event in runfolder.read_events(run_dir)), timeout=600)
    jobs.stop_job(run_dir)
    status = wait_for(lambda: ended(run_dir), timeout=300)
    assert status.state == "stopped", f"{status.error}\n{runfolder.log_tail(run_dir, 40)}"
    checkpoint = runfolder.last_checkpoint(run_dir)
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) < 8  # both ranks stopped at one step
    wait_for(lambda: not processes_of(run_dir), timeout=60)

    jobs.resume_job(run_dir, processes=2)
    status = wait_for(lambda: ended(run_dir), timeout=600)
    assert status.state == "done", f"{status.error}\n{runfolder.log_tail(run_dir, 40)}"
    steps = [event.step for event in runfolder.read_events(run_dir) if event.kind == "log" and "loss" in event.metrics]
    assert max(steps) == 8 and len(steps) == len(set(steps))  # resumed where it stopped, each step logged once
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
