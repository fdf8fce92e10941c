"""Which packages `make setup` installs on this machine, and why: one line per decision.

A working NVIDIA GPU whose driver runs the pinned torch gets requirements-gpu.txt (Unsloth, bitsandbytes), and
llama-cpp-python is rebuilt with CUDA when the CUDA compiler (nvcc) is on PATH; anything else gets requirements.txt.
It runs with the system python3 before the virtual env has any packages, so it uses the standard library only.

    python3 scripts/setup_plan.py                   # the decisions
    python3 scripts/setup_plan.py --install PY      # ... and install them with PY's pip (what `make setup` runs)
    python3 scripts/setup_plan.py --install PY --dry-run   # ... print the commands instead of running them
    FINETUNER_SETUP=cpu make setup                  # the CPU set whatever the machine has
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_REQUIREMENTS = "requirements.txt"
GPU_REQUIREMENTS = "requirements-gpu.txt"
# torch 2.13's default (PyPI) Linux wheel is built with CUDA 13.0: PyPI's wheels moved from 12.8 to 13.0 with
# 2.11 (pytorch/pytorch#177975), 2.13 keeps 13.0 as stable (RELEASE.md, pytorch/pytorch#187075) and only 2.14 moves
# PyPI to 13.2 (pytorch/pytorch#190355). CUDA 13.0 needs NVIDIA driver 580.65.06 or newer (CUDA 13.0 release notes).
# Update both with the torch pin in requirements.txt.
TORCH_CUDA = (13, 0)
TORCH_DRIVER = "580.65.06"
NVIDIA_SMI_TIMEOUT_S = 30  # a hung driver must not hang `make`


@dataclass(frozen=True)
class Plan:
    requirements: str
    llama_cuda: bool
    reasons: tuple[str, ...]  # one line per decision, printed as they are

    @property
    def key(self) -> str:
        """What `--record` writes: a change of it (a driver installed or updated) makes `make` reinstall."""
        return f"{self.requirements} llama-cuda={'on' if self.llama_cuda else 'off'}\n"


def decide(env: dict[str, str] | None = None) -> Plan:
    """The plan for this machine; `env` (default os.environ) gives PATH and FINETUNER_SETUP."""
    env = dict(os.environ if env is None else env)
    path = env.get("PATH", "")
    if env.get("FINETUNER_SETUP", "").lower() == "cpu":
        return cpu_plan("CPU set (requirements.txt): FINETUNER_SETUP=cpu chose it")
    nvidia_smi = shutil.which("nvidia-smi", path=path)
    if nvidia_smi is None:
        return cpu_plan("CPU set (requirements.txt): no NVIDIA GPU found (nvidia-smi is not on PATH)")
    gpu, problem = read_gpu(nvidia_smi)
    if problem:
        return cpu_plan(f"CPU set (requirements.txt): {problem}")
    llama_cuda, llama_reason = llama_build(shutil.which("nvcc", path=path))
    return Plan(
        GPU_REQUIREMENTS,
        llama_cuda,
        (f"GPU set (requirements-gpu.txt: Unsloth, bitsandbytes): {gpu}", llama_reason),
    )


def cpu_plan(reason: str) -> Plan:
    return Plan(CPU_REQUIREMENTS, False, (reason,))


def read_gpu(nvidia_smi: str) -> tuple[str, str | None]:
    """('NVIDIA H200, driver 580.95.05, CUDA 13.0', None) for a GPU the pinned torch can use, else ('', why not)."""
    status = run_quiet([nvidia_smi])
    if status.returncode != 0:
        # e.g. exit 9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
        said = first_line(status.stdout + status.stderr) or "no message"
        return "", f"nvidia-smi failed (exit {status.returncode}: {said}), so no GPU can be used"
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", status.stdout)
    query = run_quiet([nvidia_smi, "--query-gpu=name,driver_version", "--format=csv,noheader"])
    gpus = [line.rsplit(",", 1) for line in query.stdout.splitlines() if "," in line]
    if query.returncode != 0 or not gpus:
        return "", "nvidia-smi lists no GPU, so none can be used"
    name, driver = gpus[0][0].strip(), gpus[0][1].strip()
    count = f"{len(gpus)} x " if len(gpus) > 1 else ""
    if cuda is None:  # drivers older than CUDA 10 do not print it; they are far too old anyway
        return "", f"NVIDIA driver {driver} does not say which CUDA it supports; update the NVIDIA driver"
    supported = (int(cuda[1]), int(cuda[2]))
    if supported < TORCH_CUDA:
        return "", (
            f"the NVIDIA driver {driver} of the {name} supports CUDA up to {cuda[1]}.{cuda[2]}, but torch "
            f"{torch_version()} needs CUDA {TORCH_CUDA[0]}.{TORCH_CUDA[1]} (driver {TORCH_DRIVER} or newer): "
            "update the NVIDIA driver, then run `make setup` again"
        )
    return f"{count}{name}, driver {driver}, CUDA {cuda[1]}.{cuda[2]}", None


def llama_build(nvcc: str | None) -> tuple[bool, str]:
    """Whether llama-cpp-python is built with CUDA, and the line that says why."""
    if nvcc is None:
        return False, (
            "llama-cpp-python: CPU build (nvcc, the CUDA compiler, is not on PATH; install the CUDA toolkit and put "
            "its bin/ on PATH for GPU GGUF checks and chat)"
        )
    release = re.search(r"release (\d+\.\d+)", run_quiet([nvcc, "--version"]).stdout)
    version = f" {release[1]}" if release else ""
    return True, f"llama-cpp-python: CUDA build (CMAKE_ARGS=-DGGML_CUDA=on, nvcc{version} at {nvcc})"


def run_quiet(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 1, "", str(exc))


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def pinned(package: str) -> str:
    """The requirement line of `package` in requirements.txt, e.g. 'llama-cpp-python[server]==0.3.36'."""
    for line in (ROOT / CPU_REQUIREMENTS).read_text(encoding="utf-8").splitlines():
        if re.match(rf"{re.escape(package)}\s*(\[|==)", line):
            return line.split("#")[0].strip()
    raise SystemExit(f"error: {package} is not pinned in {CPU_REQUIREMENTS}")


def torch_version() -> str:
    return pinned("torch").split("==")[1]


def install_commands(plan: Plan, python: str) -> list[tuple[dict[str, str], list[str]]]:
    """(extra environment, command) for each pip call of the plan, run in the checkout's root."""
    commands = [({}, [python, "-m", "pip", "install", "-r", plan.requirements])]
    if plan.llama_cuda:
        # PyPI has only the sdist, and pip keeps the CPU wheel it built for requirements.txt: force a fresh CUDA
        # build of the same pin. --no-deps: its dependencies are installed already and need no reinstall.
        flags = ["--force-reinstall", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python"]
        commands.append(
            ({"CMAKE_ARGS": "-DGGML_CUDA=on"}, [python, "-m", "pip", "install", *flags, pinned("llama-cpp-python")])
        )
    return commands


def llama_offloads(python: str) -> bool:
    """Whether the llama-cpp-python installed for `python` is a GPU build already (then it is not rebuilt)."""
    probe = "import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)"
    return run_quiet([python, "-c", probe]).returncode == 0


def install(plan: Plan, python: str, dry_run: bool) -> int:
    for extra, command in install_commands(plan, python):
        shown = " ".join([*(f"{key}={value}" for key, value in extra.items()), shlex.join(command)])
        if dry_run:
            print(shown)
            continue
        if extra and llama_offloads(python):
            print("llama-cpp-python: the installed build offloads to the GPU already; not rebuilt")
            continue
        print(shown, flush=True)
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **extra})
        if done.returncode != 0:
            return done.returncode
    return 0


def record(plan: Plan, path: Path) -> None:
    """Write the plan's key to `path` only when it changed, so that its date tells `make` when to reinstall."""
    if path.is_file() and path.read_text(encoding="utf-8") == plan.key:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.key, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the decisions (the default)")
    parser.add_argument("--install", metavar="PYTHON", help="install the plan with this interpreter's pip")
    parser.add_argument("--dry-run", action="store_true", help="with --install: print the pip commands only")
    parser.add_argument("--record", metavar="FILE", type=Path, help="write the plan to FILE when it changed, quietly")
    args = parser.parse_args(argv)
    plan = decide()
    if args.record:
        record(plan, args.record)
        return 0
    for reason in plan.reasons:
        print(f"setup: {reason}")
    if args.install:  # absolute, since pip runs in the checkout's root; not resolved: a venv's python is a link
        python = args.install if os.sep in args.install else shutil.which(args.install) or args.install
        return install(plan, os.path.abspath(python), args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
