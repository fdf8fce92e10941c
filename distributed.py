"""Training on several processes: which GPUs a run sees, how many processes torchrun starts (on one node or several),
DDP or FSDP (`distributed`) and FSDP's TrainingArguments, the fallback from Unsloth to transformers + PEFT, the
heartbeat that names a lost node, and accelerate's process state that lets the ranks wait for each other."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from workspace import UserError

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """'index: name' of every CUDA GPU this process may use (CUDA_VISIBLE_DEVICES applies)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"{index}: {torch.cuda.get_device_name(index)}" for index in range(torch.cuda.device_count())]


def check_num_gpus(num_gpus: int) -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus > count:
        listing = "; ".join(visible_gpus()) or "none"
        raise UserError(
            f"num_gpus is {num_gpus} but this machine has {count} visible GPU(s): {listing}. "
            "Lower num_gpus, or set it to 0 to use every visible GPU."
        )


def gpu_launch(num_gpus: int) -> tuple[int, dict[str, str]]:
    """(processes to start, environment to add) for a run on `num_gpus` GPUs (0: all visible).

    A run on fewer GPUs than are visible sees only its own: with two visible GPUs and one process, the HF Trainer
    would otherwise wrap the model in DataParallel.
    """
    import torch

    if num_gpus:
        check_num_gpus(num_gpus)
    count = torch.cuda.device_count()  # NVML-based: no CUDA context in the calling (server) process
    if count == 0:
        return 1, {}
    wanted = num_gpus or count
    env = {}
    if wanted < count:
        listed = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        devices = [item.strip() for item in listed.split(",") if item.strip()] or [str(i) for i in range(count)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[:wanted])
    return wanted, env


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def ddp_fallback() -> str:
    """Under DDP, when the installed Unsloth cannot train on several GPUs: switch this process to transformers + PEFT
    (call it before Unsloth is imported) and return the note for the run's status; else ""."""
    import importlib.util

    if world_size() <= 1 or importlib.util.find_spec("unsloth") is None or unsloth_supports_ddp():
        return ""
    os.environ["FINETUNER_BACKEND"] = "transformers"
    log.warning("the installed Unsloth does not support multi-GPU training: using transformers + PEFT with DDP")
    return "The installed Unsloth does not support multi-GPU training; this run uses transformers + PEFT with DDP."


def unsloth_supports_ddp() -> bool:
    """Whether the installed Unsloth places each DDP rank on its own GPU (read from its source, without importing it:
    importing Unsloth patches transformers, so the choice must come first)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("unsloth.models.loader_utils")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    return "def prepare_device_map" in Path(spec.origin).read_text(encoding="utf-8", errors="replace")


def distributed_state(on_cuda: bool):
    """accelerate's process state, set up before the model loads so that ranks can wait for each other (one process
    when not launched by torchrun; gloo on CPU, NCCL on CUDA). The caller says whether this is a CUDA machine
    (model_utils.detect_device): this module stays below the model code, which TrainConfig's checks import."""
    from accelerate import PartialState

    if world_size() > 1 and not on_cuda:
        _restore_indexed_cpu_locations()
    return PartialState(cpu=not on_cuda)


def _restore_indexed_cpu_locations() -> None:
    """Resuming a DDP run, transformers loads the optimizer state with map_location=args.device, which CPU ranks
    name 'cpu:N'; torch.load knows only 'cpu' and fails. Teach it that 'cpu:N' is the CPU."""
    import torch.serialization

    def keep_on_cpu(storage, location: str):
        return storage if location.startswith("cpu:") else None

    torch.serialization.register_package(100, lambda storage: None, keep_on_cpu)


# ---------------------------------------------------------------- DDP or FSDP

DISTRIBUTED = ("auto", "ddp", "fsdp")
# The strategy a launch resolved (`auto` becomes ddp or fsdp once, on the first machine), handed to every rank.
STRATEGY_ENV = "FINETUNER_DISTRIBUTED"


def check_distributed(config, device) -> None:
    """UserError for a multi-GPU or multi-node setting that cannot work (config: a TrainConfig; not imported here)."""
    if config.distributed == "fsdp" and config.stage != "sft":
        raise UserError(
            f"FSDP trains SFT runs; the {config.stage} stage trains with DDP here. Set distributed to ddp or auto."
        )
    if config.nnodes > 1:
        endpoint_parts(config.rdzv_endpoint)
    elif config.rdzv_endpoint.strip():
        raise UserError("rdzv_endpoint is for runs on several nodes: set nnodes above 1, or clear the endpoint.")


def endpoint_parts(endpoint: str) -> tuple[str, int]:
    """(host, port) of a rendezvous endpoint written host:port; UserError otherwise."""
    host, _, port = endpoint.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(char.isspace() for char in host):
        raise UserError(
            f"rdzv_endpoint '{endpoint}' is not host:port. With several nodes, give this machine's address that "
            "every node can reach and a free port, e.g. 10.0.0.1:29400."
        )
    return host.strip("[]"), int(port)


def resolve_strategy(choice: str, stage: str, fits_one_gpu: bool) -> str:
    """ddp or fsdp for a run on several processes: `auto` shards only when the model does not fit one GPU (DDP is
    faster when it fits: no weights gathered at every layer), and only SFT (the other stages train with DDP)."""
    if choice == "auto":
        return "fsdp" if not fits_one_gpu and stage == "sft" else "ddp"
    return choice


def strategy() -> str:
    """This rank's strategy: fsdp or ddp under torchrun, "" for one process."""
    if world_size() <= 1:
        return ""
    return os.environ.get(STRATEGY_ENV, "ddp") or "ddp"


def sharded() -> bool:
    return strategy() == "fsdp"


def fsdp_fallback(choice: str) -> str:
    """Under FSDP: switch this process to transformers + PEFT (Unsloth trains on one GPU or with DDP; call it before
    Unsloth is imported) and return the note that says so for the run's live view; else "".

    choice: the run's `distributed` setting, which names the strategy when no launch resolved it (a run started
    with an explicit process count)."""
    if world_size() > 1 and choice != "auto":
        os.environ.setdefault(STRATEGY_ENV, choice)
    if not sharded():
        return ""
    os.environ["FINETUNER_BACKEND"] = "transformers"
    return (
        f"FSDP shards the model over {world_size()} processes: this run uses transformers + PEFT with FSDP2 "
        "(Unsloth trains on one GPU or with DDP)."
    )


def fsdp_arguments(layer_classes: list[str], checkpointing: bool) -> dict:
    """transformers' TrainingArguments for FSDP2 through accelerate: each decoder layer (`layer_classes`) its own
    shard group, and sharded checkpoints (each rank writes its part: no rank gathers the whole model to save a
    resume point). Activation checkpointing stays the model's own (gradient_checkpointing, non-reentrant as FSDP2
    needs): FSDP's wrapper renames every layer's weights, and PEFT then finds no adapter weights to checkpoint."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": list(layer_classes),
            "state_dict_type": "SHARDED_STATE_DICT",
            "reshard_after_forward": True,
        },
        "gradient_checkpointing": checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }


# ---------------------------------------------------------------- several nodes


def node_arguments(processes: int, nodes: int, endpoint: str, node_rank: int, run_id: str) -> list[str]:
    """torchrun's arguments for one node of a multi-node run. The static rendezvous with --node-rank (not c10d's,
    which orders the nodes by host name) keeps node 0 on the first machine, so its first process is rank 0, the one
    that writes the run folder; the first machine's launcher serves the rendezvous at `endpoint`."""
    endpoint_parts(endpoint)
    return [
        f"--nnodes={nodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={processes}",
        "--rdzv-backend=static",
        f"--rdzv-endpoint={endpoint.strip()}",
        f"--rdzv-id={run_id}",
        "--max-restarts=0",
    ]


def node_rank() -> int:
    """This process's node under torchrun (GROUP_RANK), 0 for one node."""
    return int(os.environ.get("GROUP_RANK", "0") or 0)


class Heartbeat:
    """Each rank's heartbeat in torchrun's rendezvous store (served by node 0's launcher), so that when a collective
    fails the ranks still running can name the node that died: gloo and NCCL only say that a peer went away."""

    PERIOD_S = 1.0

    def __init__(self) -> None:
        import socket
        import threading

        import torch.distributed as dist

        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store.set(f"finetuner/node/{self.rank}", f"{node_rank()} {socket.gethostname()}")
        self.stopped = threading.Event()
        threading.Thread(target=self._beat, daemon=True, name="heartbeat").start()

    def _beat(self) -> None:
        while not self.stopped.wait(self.PERIOD_S):
            try:
                self.store.add(f"finetuner/beat/{self.rank}", 1)
            except Exception:  # the store is gone with node 0: lost_nodes says so
                return

    def close(self) -> None:
        self.stopped.set()

    def lost_nodes(self) -> str:
        """'node 1 (host-b, rank 1)' for each node with a rank whose heartbeat stopped, '' when every rank still
        beats; node 0 when its store cannot be reached. Takes a few heartbeat periods."""
        try:
            before = self._beats()
            time.sleep(3 * self.PERIOD_S)
            after = self._beats()
            silent = [rank for rank in range(self.world) if rank != self.rank and after[rank] == before[rank]]
            nodes: dict[str, list[int]] = {}
            for rank in silent:
                key = f"finetuner/node/{rank}"
                place = self.store.get(key).decode() if self.store.check([key]) else "? unknown host"
                nodes.setdefault(place, []).append(rank)
        except Exception:
            return "node 0 (the first machine, which serves the rendezvous)"
        return ", ".join(
            f"node {place.split(' ', 1)[0]} ({place.split(' ', 1)[1]}, rank {', '.join(map(str, ranks))})"
            for place, ranks in sorted(nodes.items())
        )

    def _beats(self) -> dict[int, int]:
        return {rank: int(self.store.add(f"finetuner/beat/{rank}", 0)) for rank in range(self.world)}


# What gloo and NCCL say when a peer went away (a closed connection, a reset, a collective that timed out).
PEER_LOST_WORDS = ("gloo", "nccl", "connection", "peer", "socket", "broken pipe", "timed out", "timeout")


def lost_node_error(heartbeat: Heartbeat | None, error: BaseException) -> UserError | None:
    """The error that names the node that died when `error` came from a lost peer, else None. Only a communication
    error is checked: on an error every rank meets (a diverged loss), the others exit at once and would read as lost."""
    text = f"{type(error).__name__} {error}".lower()
    if heartbeat is None or isinstance(error, UserError) or not any(word in text for word in PEER_LOST_WORDS):
        return None
    lost = heartbeat.lost_nodes()
    if not lost:
        return None
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return UserError(
        f"{lost} stopped during the run, so the run fails on every node ({first}). Check that machine (its log, "
        "memory, network), then resume the run from its last checkpoint, starting every node again."
    )
