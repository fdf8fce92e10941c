"""report_to: several of transformers' tracker integrations at once, each refused with a message a user can act on
when it cannot run, and each one's own local store holding the run's training loss (MLflow's file store, W&B's
offline run file, Trackio's local database; TensorBoard's event files)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import train_config
from train_config import TrainConfig, check_report_to, report_to_list, train_config_from_dict
from workspace import UserError

ROOT = Path(__file__).resolve().parent.parent

# The training job in its own process: Trackio reads TRACKIO_DIR once, when it is imported. It prints the loss
# Trackio's local store holds for the run, read through Trackio's own storage API.
TRAIN = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jobs, runfolder, training_utils
from conftest import capital_rows, demo_train_config, write_jsonl
from dataset_utils import DatasetConfig
from model_utils import ModelConfig
from workspace import config_to_dict
from pathlib import Path

workspace, folder = Path({workspace!r}), {folder!r}
data = write_jsonl(workspace / "rows.jsonl", capital_rows(8))
config = demo_train_config(
    data, model=ModelConfig(folder), dataset=DatasetConfig(source=str(data), chat_template={template!r}),
    max_steps=3, max_seq_length=96, save_steps=3, lora_r=4, lora_alpha=8, report_to={report_to!r},
)
run_dir = jobs.create_run("train", config_to_dict(config), workspace, "tracked")
training_utils.train(config, runfolder.JobContext.for_run(run_dir))
from trackio.sqlite_storage import SQLiteStorage
rows = SQLiteStorage.get_logs("huggingface", "tracked")
print("TRACKIO " + json.dumps([row["train/loss"] for row in rows if "train/loss" in row]))
"""


def test_report_to_names_several_trackers_and_none_is_none():
    assert report_to_list("none") == []
    assert report_to_list("TensorBoard, wandb,mlflow") == ["tensorboard", "wandb", "mlflow"]
    # A config written when report_to was one name still loads.
    assert train_config_from_dict({"report_to": "tensorboard"}).report_to == "tensorboard"


@pytest.mark.parametrize("value, message", [("wandb-ish", "unknown tracker"), ("mlflow,mlflow", "twice")])
def test_a_tracker_name_transformers_lacks_is_refused(value, message):
    with pytest.raises(UserError, match=message):
        check_report_to(value)


def test_a_missing_tracker_package_is_named_for_pip(monkeypatch):
    monkeypatch.setitem(train_config.TRACKERS, "trackio", ("trackio_is_not_installed_here", "trackio"))
    with pytest.raises(UserError, match="pip install trackio"):
        check_report_to("tensorboard,trackio")


def test_wandb_without_a_key_or_offline_mode_is_refused_before_the_job(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        check_report_to("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_report_to("wandb")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_report_to("wandb")
    # The key is the environment's: nothing in the run's config holds it.
    assert "x" * 40 not in json.dumps(TrainConfig(report_to="wandb").__dict__, default=str)


def wandb_history(run_file: Path, key: str) -> list[float]:
    """The values of `key` in a W&B offline run file: LevelDB's log format (32 KiB blocks of chunks, each a 7-byte
    header: checksum, length, type) holding wandb's own Record protobufs, after a 7-byte ':W&B' file header."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, values = run_file.read_bytes(), 32768, 7, b"", []
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL chunk, or the LAST of a record's chunks
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                if key in items:
                    values.append(json.loads(items[key]))
    return values


@pytest.mark.slow  # a 3-step run that starts four trackers, in its own process: ~50 s on two CPU cores
def test_each_tracker_holds_the_runs_training_loss_in_its_local_store(family_model, tmp_path):
    import runfolder

    folder, template = family_model("llama")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    env = {
        **os.environ,
        "FINETUNER_WORKSPACE": str(workspace),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
    }
    env.pop("WANDB_API_KEY", None)
    script = TRAIN.format(
        root=str(ROOT),
        tests=str(ROOT / "tests"),
        workspace=str(workspace),
        folder=str(folder),
        template=template or "",
        report_to="tensorboard,wandb,mlflow,trackio",
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = workspace / "runs" / "tracked"
    losses = [event.metrics["loss"] for event in runfolder.read_events(run_dir) if "loss" in event.metrics]
    assert len(losses) == 3

    trackio = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("TRACKIO "))[8:])
    assert trackio == pytest.approx(losses)

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's files in the run folder
    assert wandb_history(run_file, "train/loss") == pytest.approx(losses)

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    (run,) = [run for run in runs if run.info.run_name == "tracked"]
    assert [metric.value for metric in client.get_metric_history(run.info.run_id, "loss")] == pytest.approx(losses)

    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
