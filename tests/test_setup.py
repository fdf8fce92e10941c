"""scripts/setup_plan.py: which packages `make setup` installs, decided from fake `nvidia-smi` / `nvcc` on a PATH
that holds nothing else; --dry-run prints the pip commands, so nothing is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup_plan.py"
LLAMA_PIN = next(
    line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("llama-cpp-python")
)

# Real output of an H200 (driver 580.159.04), captured on the device machine; the script reads its header line.
H200_SMI = """Fri Dec  4 15:53:23 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA H200                    On  |   00000000:00:06.0 Off |                    0 |
| N/A   43C    P0             86W /  700W |       0MiB / 143771MiB |      0%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+"""
# A driver of the CUDA 11.4 era (470 series), too old for torch 2.13's CUDA 13.0 wheel.
OLD_DRIVER_SMI = """Tue Mar  1 09:12:44 2022
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 470.82.01    Driver Version: 470.82.01    CUDA Version: 11.4     |
|-------------------------------+----------------------+----------------------+
| GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp  Perf  Pwr:Usage/Cap|         Memory-Usage | GPU-Util  Compute M. |
|===============================+======================+======================|
|   0  NVIDIA GeForce ...  Off  | 00000000:01:00.0 Off |                  N/A |
|  0%   38C    P8    21W / 350W |      1MiB / 24268MiB |      0%      Default |
+-------------------------------+----------------------+----------------------+"""
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
    "NVIDIA driver is installed and running."
)
NVCC = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0"""


def fake_tool(bin_dir: Path, name: str, plain: str, query: str = "", exit_code: int = 0) -> None:
    """An executable `name` printing `query` for `--query-gpu=...` and `plain` otherwise. It uses shell builtins
    only, since PATH holds nothing but these fakes."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / f"{name}.plain").write_text(plain + "\n")
    (bin_dir / f"{name}.query").write_text(query + "\n")
    script = bin_dir / name
    script.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --query-gpu=*) out="$0.query" ;; *) out="$0.plain" ;; esac\n'
        'while IFS= read -r line; do printf \'%s\\n\' "$line"; done < "$out"\n'
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)


def plan(bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir.mkdir(exist_ok=True)
    command = [sys.executable, str(SCRIPT), "--install", "/venv/bin/python", "--dry-run", *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={"PATH": str(bin_dir), **env}, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def h200(tmp_path) -> Path:
    fake_tool(tmp_path / "bin", "nvidia-smi", H200_SMI, query="NVIDIA H200, 580.159.04")
    return tmp_path / "bin"


def test_a_machine_without_nvidia_smi_gets_the_cpu_set(tmp_path):
    out = plan(tmp_path / "bin").stdout
    assert "setup: CPU set (requirements.txt): no NVIDIA GPU found (nvidia-smi is not on PATH)" in out
    assert out.strip().splitlines()[-1] == "/venv/bin/python -m pip install -r requirements.txt"
    assert "GGML_CUDA" not in out


def test_a_gpu_with_nvcc_gets_unsloth_and_llama_cpp_built_with_cuda(h200):
    fake_tool(h200, "nvcc", NVCC)
    out = plan(h200).stdout.strip().splitlines()
    assert out[0] == (
        "setup: GPU set (requirements-gpu.txt: Unsloth, bitsandbytes): NVIDIA H200, driver 580.159.04, CUDA 13.0"
    )
    assert out[1] == f"setup: llama-cpp-python: CUDA build (CMAKE_ARGS=-DGGML_CUDA=on, nvcc 13.0 at {h200}/nvcc)"
    assert out[2] == "/venv/bin/python -m pip install -r requirements-gpu.txt"
    assert out[3].startswith("CMAKE_ARGS=-DGGML_CUDA=on /venv/bin/python -m pip install --force-reinstall --no-deps")
    assert "--no-binary llama-cpp-python" in out[3] and out[3].endswith(f"'{LLAMA_PIN}'")


def test_a_gpu_without_nvcc_gets_unsloth_and_the_cpu_build_of_llama_cpp(h200):
    out = plan(h200).stdout
    assert "GPU set (requirements-gpu.txt" in out
    assert "llama-cpp-python: CPU build (nvcc, the CUDA compiler, is not on PATH" in out
    assert out.strip().splitlines()[-1] == "/venv/bin/python -m pip install -r requirements-gpu.txt"


def test_nvidia_smi_that_cannot_reach_the_driver_gives_the_cpu_set_and_says_why(tmp_path):
    fake_tool(tmp_path / "bin", "nvidia-smi", NO_DRIVER, query=NO_DRIVER, exit_code=9)
    fake_tool(tmp_path / "bin", "nvcc", NVCC)
    out = plan(tmp_path / "bin").stdout
    assert f"setup: CPU set (requirements.txt): nvidia-smi failed (exit 9: {NO_DRIVER}), so no GPU can be used" in out
    assert "requirements-gpu.txt" not in out and "GGML_CUDA" not in out


def test_a_driver_too_old_for_torch_gives_the_cpu_set_and_says_update_the_driver(tmp_path):
    fake_tool(tmp_path / "bin", "nvidia-smi", OLD_DRIVER_SMI, query="NVIDIA GeForce RTX 3090, 470.82.01")
    out = plan(tmp_path / "bin").stdout
    line = out.splitlines()[0]
    assert line.startswith("setup: CPU set (requirements.txt): the NVIDIA driver 470.82.01 of the NVIDIA GeForce RTX")
    assert "supports CUDA up to 11.4, but torch 2.13.0 needs CUDA 13.0 (driver 580.65.06 or newer)" in line
    assert "update the NVIDIA driver" in line
    assert out.strip().splitlines()[-1] == "/venv/bin/python -m pip install -r requirements.txt"


def test_finetuner_setup_cpu_chooses_the_cpu_set_on_a_gpu_machine(h200):
    out = plan(h200, FINETUNER_SETUP="cpu").stdout
    assert "setup: CPU set (requirements.txt): FINETUNER_SETUP=cpu chose it" in out
    assert "requirements-gpu.txt" not in out


def test_the_recorded_plan_changes_only_when_the_machine_does(tmp_path, h200):
    """`make` reinstalls when the record's date moves: not on a second call, but once a GPU appears."""
    record = tmp_path / "venv" / ".setup-plan"
    empty = tmp_path / "empty"
    plan(empty, "--record", str(record))
    assert record.read_text() == "requirements.txt llama-cuda=off\n"
    os.utime(record, (1, 1))
    plan(empty, "--record", str(record))
    assert record.stat().st_mtime == 1
    plan(h200, "--record", str(record))
    assert record.read_text() == "requirements-gpu.txt llama-cuda=off\n" and record.stat().st_mtime > 1


def test_the_driver_minimum_follows_the_torch_pin():
    """The constants name torch's CUDA for the pin in requirements.txt: a torch upgrade must revisit them."""
    source = SCRIPT.read_text()
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)[1]
    assert f"torch {'.'.join(torch_pin.split('.')[:2])}'s default (PyPI) Linux wheel" in source
