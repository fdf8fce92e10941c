"""Sharded training (FSDP2 over gloo, two CPU processes) and runs on several nodes (two torchrun launchers on this
machine), on the demo model."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open
from test_distributed import ended, processes_of, rank_pid

import distributed
import inference_utils
import jobs
import main
import runfolder
import training_utils
from conftest import capital_rows, demo_train_config, logged_steps, wait_for, write_jsonl
from inference_utils import GenerationConfig
from workspace import UserError, config_to_dict

GREEDY = GenerationConfig(temperature=0, max_new_tokens=12)


def small_config(data: Path, **changes):
    """Two short rows per process: a few two-process steps take seconds on two CPU cores."""
    values = {"max_steps": 4, "per_device_train_batch_size": 2, "max_seq_length": 96, "save_steps": 4}
    return demo_train_config(data, **{**values, **changes})


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "capitals.jsonl", capital_rows(32))


def lora_weights(path: Path) -> dict:
    with safe_open(str(path), "pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}


# ---------------------------------------------------------------- choosing the strategy


def test_auto_shards_only_a_model_that_does_not_fit_one_gpu_and_only_sft():
    assert distributed.resolve_strategy("auto", "sft", fits_one_gpu=True) == "ddp"
    assert distributed.resolve_strategy("auto", "sft", fits_one_gpu=False) == "fsdp"
    assert distributed.resolve_strategy("auto", "dpo", fits_one_gpu=False) == "ddp"
    assert distributed.resolve_strategy("fsdp", "sft", fits_one_gpu=True) == "fsdp"


def test_auto_asks_the_memory_estimate(demo_workspace, data_file):
    fits = config_to_dict(small_config(data_file))
    assert training_utils.launch_strategy(fits) == "ddp"
    # A batch whose activations outgrow this machine's memory: the estimate says it does not fit one device.
    too_large = config_to_dict(small_config(data_file, per_device_train_batch_size=4096, max_seq_length=8192))
    assert training_utils.launch_strategy(too_large) == "fsdp"


def test_fsdp_is_refused_for_the_stages_that_train_with_ddp(data_file):
    with pytest.raises(UserError, match="FSDP trains SFT runs"):
        small_config(data_file, distributed="fsdp", stage="dpo").validate()


def test_fsdp_arguments_turn_on_fsdp2_with_sharded_checkpoints_in_transformers(tmp_path):
    from trl import SFTConfig

    arguments = distributed.fsdp_arguments(["LlamaDecoderLayer"], checkpointing=True)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **arguments)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_fsdp_qlora_stores_the_4bit_weights_in_the_compute_dtype():
    import torch

    assert training_utils.qlora_quantization(torch.bfloat16, True).bnb_4bit_quant_storage == torch.bfloat16
    assert training_utils.qlora_quantization(torch.bfloat16, False).bnb_4bit_quant_storage == torch.uint8


def test_memory_per_gpu_shards_the_model_and_its_state_under_fsdp_only(demo_workspace, data_file):
    import model_utils
    import planning

    estimate = model_utils.MemoryEstimate(16.0, 8.0, 4.0, 28.0, None, "GPU", 8_000_000_000, 40_000_000)
    four = planning.per_gpu_memory(estimate, gpus=4, layers=32)
    assert four.ddp_gib == 28.0  # every GPU holds everything
    assert four.fsdp_gib == (16.0 + 8.0) / 4 + 2 * 16.0 / 32 + 4.0  # a quarter, two whole layers, own activations
    assert planning.per_gpu_memory(estimate, gpus=1, layers=32).fsdp_gib == 28.0

    config = small_config(data_file)
    path = str(model_utils.demo_model_dir(demo_workspace))
    two, eight = planning.gpu_memory_for(config, path, 2), planning.gpu_memory_for(config, path, 8)
    assert two.ddp_gib == eight.ddp_gib == model_utils.estimate_memory(config, path).total_gib
    assert eight.fsdp_gib < two.fsdp_gib < two.ddp_gib
    assert "per GPU on 2 GPUs: DDP" in two.summary()


# ---------------------------------------------------------------- several nodes


def test_a_multi_node_run_needs_an_endpoint_every_node_reaches(data_file):
    for endpoint in ("", "10.0.0.1", "10.0.0.1:port", "10.0.0.1:70000", "my host:29400"):
        with pytest.raises(UserError, match="rdzv_endpoint"):
            small_config(data_file, nnodes=2, rdzv_endpoint=endpoint).validate()
    with pytest.raises(UserError, match="set nnodes above 1"):
        small_config(data_file, rdzv_endpoint="10.0.0.1:29400").validate()
    small_config(data_file, nnodes=2, rdzv_endpoint="10.0.0.1:29400").validate()


def test_each_node_gets_the_first_nodes_command_with_its_own_node_rank(demo_workspace, data_file, capsys):
    config = small_config(data_file, nnodes=3, rdzv_endpoint="10.0.0.1:29400", distributed="fsdp")
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "nodes")
    with pytest.raises(UserError, match="not started on several nodes"):
        jobs.node_commands(run_dir)
    jobs.write_node_launch(run_dir, True, 2, 3, "10.0.0.1:29400", {distributed.STRATEGY_ENV: "fsdp", "X": "1"})
    first = jobs.launch_command(run_dir, True, 2, 3, "10.0.0.1:29400")
    commands = jobs.node_commands(run_dir)
    assert len(commands) == 2
    for node_rank, command in enumerate(commands, start=1):
        words = shlex.split(command)
        assert words[:4] == ["cd", str(jobs.ROOT), "&&", f"{distributed.STRATEGY_ENV}=fsdp"]
        assert words[4:] == [arg.replace("--node-rank=0", f"--node-rank={node_rank}") for arg in first]
    assert "--rdzv-endpoint=10.0.0.1:29400" in first and "--nnodes=3" in first and first[-1] == "--resume"

    assert main.main(["node-command", str(run_dir)]) == 0
    assert capsys.readouterr().out == f"# node 1\n{commands[0]}\n# node 2\n{commands[1]}\n"


def test_the_train_tab_shows_the_nodes_and_each_other_nodes_command(demo_workspace, data_file):
    from ui import train_tab

    config = small_config(data_file, nnodes=2, rdzv_endpoint="10.0.0.1:29400")
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "tab-nodes")
    assert train_tab.nodes_hint(run_dir, runfolder.read_status(run_dir)) == ""  # not started on several nodes
    jobs.write_node_launch(run_dir, False, 1, 2, "10.0.0.1:29400", {})
    (command,) = jobs.node_commands(run_dir)
    waiting = train_tab.nodes_hint(run_dir, runfolder.Status(state=runfolder.State.QUEUED, processes=1))
    assert waiting.startswith("Nodes: 2 × 1 process(es)") and f"node 1: `{command}`" in waiting
    done = train_tab.nodes_hint(run_dir, runfolder.Status(state=runfolder.State.DONE, processes=1))
    assert "Nodes: 2 × 1" in done and command not in done


# ---------------------------------------------------------------- two CPU processes


@pytest.mark.slow
def test_fsdp_trains_stops_with_a_sharded_checkpoint_resumes_and_saves_the_one_process_adapter(
    demo_workspace, data_file
):
    config = small_config(data_file, distributed="fsdp", max_steps=6, save_steps=6, gradient_checkpointing=True)
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "fsdp")
    jobs.start_job(run_dir, processes=2)
    wait_for(lambda: logged_steps(run_dir), timeout=600)
    jobs.stop_job(run_dir)
    status = wait_for(lambda: ended(run_dir), timeout=300)
    assert status.state == "stopped", f"{status.error}\n{runfolder.log_tail(run_dir, 40)}"
    assert "FSDP" in status.note and status.backend == "transformers"  # the live view says which backend and why
    checkpoint = runfolder.last_checkpoint(run_dir)
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) < 6
    shards = {path.name for path in (checkpoint / "pytorch_model_fsdp_0").iterdir()}
    assert shards == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # each rank wrote its own part
    assert {path.name for path in (checkpoint / "optimizer_0").iterdir()} == shards
    wait_for(lambda: not processes_of(run_dir), timeout=60)

    jobs.resume_job(run_dir, processes=2)
    status = wait_for(lambda: ended(run_dir), timeout=600)
    assert status.state == "done", f"{status.error}\n{runfolder.log_tail(run_dir, 40)}"
    steps = logged_steps(run_dir)
    assert max(steps) == 6 and len(steps) == len(set(steps))  # resumed where it stopped, each step logged once

    # The adapter holds the trained weights of the last sharded checkpoint, in the one-process layout.
    adapter = lora_weights(run_dir / "adapter" / "adapter_model.safetensors")
    assert {key: tuple(value.shape) for key, value in adapter.items()} == one_process_layout(config, demo_workspace)
    final = consolidated(run_dir / "checkpoints" / "checkpoint-6" / "pytorch_model_fsdp_0")
    assert set(final) == set(adapter)
    assert all(final[key].equal(adapter[key]) for key in adapter)
    assert any(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)  # trained, not initial

    # One-process chat loads it; the same weights written by hand answer the same.
    copy = run_dir.parent / "fsdp-copy"
    copy.mkdir()
    (copy / "adapter").mkdir()
    for name in os.listdir(run_dir / "adapter"):
        if name != "adapter_model.safetensors":
            (copy / "adapter" / name).write_bytes((run_dir / "adapter" / name).read_bytes())
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in final.items()}, copy / "adapter" / "adapter_model.safetensors")
    (copy / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (copy / "status.json").write_text((run_dir / "status.json").read_text())
    replies = []
    for folder in (run_dir, copy):
        chat = inference_utils.load_chat_model(run=str(folder))
        *_, reply = inference_utils.stream_chat(
            chat, [{"role": "user", "content": "What is the capital of Peru?"}], GREEDY
        )
        replies.append(reply)
    assert replies[0] == replies[1] and replies[0].strip()


def one_process_layout(config, workspace: Path) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the LoRA weights a one-process run of `config` saves (PEFT's adapter state dict)."""
    from peft import get_peft_model_state_dict

    import model_utils

    model, _ = training_utils._load_transformers(config, str(model_utils.demo_model_dir(workspace)))
    return {key: tuple(value.shape) for key, value in get_peft_model_state_dict(model).items()}


def consolidated(folder: Path) -> dict:
    """A sharded (DCP) model checkpoint as one state dict in this process, under the adapter file's names."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / "consolidated.pt"
    dcp_to_torch_save(str(folder), str(target))
    state = torch.load(target, weights_only=True)
    state = state.get("model", state)
    return {key.removeprefix("model."): value for key, value in state.items()}


# Both "nodes" share this machine's cores: a thread each, as torchrun gives its ranks on one node (two threads each
# on two cores made every step ~25x slower).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def start_second_node(run_dir: Path) -> subprocess.Popen:
    """Node 1 of the run, as a user would start it on another machine: the command the app shows."""
    (command,) = jobs.node_commands(run_dir)
    log = open(run_dir.parent.parent / f"{run_dir.name}-node1.txt", "ab")  # beside runs/: not a run
    env = {**os.environ, **ONE_THREAD}
    return subprocess.Popen(command, shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


@pytest.mark.slow
def test_two_nodes_on_this_machine_train_one_run_logged_once(demo_workspace, data_file):
    config = small_config(data_file, nnodes=2, rdzv_endpoint=f"127.0.0.1:{jobs.free_port()}")
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "two-nodes")
    jobs.start_job(run_dir, env=ONE_THREAD)
    node1 = start_second_node(run_dir)
    status = wait_for(lambda: ended(run_dir), timeout=600)
    assert status.state == "done", f"{status.error}\n{runfolder.log_tail(run_dir, 40)}"
    assert node1.wait(timeout=120) == 0

    events = runfolder.read_events(run_dir)
    starts = [event for event in events if event.kind == "start"]
    assert len(starts) == 1 and starts[0].metrics["processes"] == 2  # one process on each node
    assert logged_steps(run_dir) == [1, 2, 3, 4]  # rank 0 alone writes: each step once
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_on_every_node_naming_its_node(demo_workspace, data_file):
    config = small_config(data_file, nnodes=2, rdzv_endpoint=f"127.0.0.1:{jobs.free_port()}", max_steps=500)
    run_dir = jobs.create_run("train", config_to_dict(config), demo_workspace, "node-dies")
    jobs.start_job(run_dir, env=ONE_THREAD)
    node1 = start_second_node(run_dir)
    wait_for(lambda: logged_steps(run_dir), timeout=600)
    os.kill(wait_for(lambda: rank_pid(run_dir, 1), timeout=30), signal.SIGKILL)

    status = wait_for(lambda: ended(run_dir), timeout=180)
    assert status.state == "failed"
    assert "node 1 (" in status.error and "rank 1" in status.error, status.error
    assert node1.wait(timeout=120) != 0  # the node whose rank died fails too
    wait_for(lambda: not processes_of(run_dir), timeout=90)  # and nothing of the first node keeps running
    assert not (run_dir / "adapter").exists()
