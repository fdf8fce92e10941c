"""The installable package: `pip install .` gives an `llm-finetuner` command with the same CLI as `python main.py`,
the flat modules installed as they are, llama.cpp's converter beside them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the package is built from: the app, not the checkout's environment, data or tests.
LEFT_OUT = (".venv", ".git", ".gpu", "workspace", "tests", "bench", "notebooks", "docs", "build", "__pycache__")


def test_every_top_level_module_is_packaged():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert sorted(declared["py-modules"]) == sorted(path.stem for path in ROOT.glob("*.py"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built and installed into a fresh virtual env; its bin/ folder.

    The env sees this checkout's .venv packages through a .pth file instead of reinstalling torch & co.: a
    `--system-site-packages` env would see the base interpreter's site-packages, not .venv's. It has no pip or
    setuptools of its own (the ensurepip ones are older), so .venv's pip installs into it (`--python`) and .venv's
    setuptools builds it (`--no-build-isolation`). The source is a copy, so the build writes nothing here."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_OUT, "*.egg-info"), symlinks=True)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    env_dir = tmp / "env"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(env_dir)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    (purelib / "finetuner-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    install = [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q"]
    subprocess.run([*install, "--no-deps", "--no-build-isolation", str(source)], check=True, timeout=300)
    return env_dir / "bin"


def run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_llm_finetuner_has_the_same_commands_as_main_py(installed, tmp_path):
    help_text = run([str(installed / "llm-finetuner"), "--help"], tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: llm-finetuner")
    reference = run([sys.executable, "main.py", "--help"], ROOT)
    # The usage line wraps differently with a shorter name; the options and commands below it are the same.
    assert help_text.stdout.split("\n\n", 1)[1] == reference.stdout.split("\n\n", 1)[1]
    export_help = run([str(installed / "llm-finetuner"), "export", "--help"], tmp_path)
    assert "--ollama NAME" in export_help.stdout and "--lora-gguf" in export_help.stdout


@pytest.mark.slow
def test_installed_command_runs_from_site_packages_with_the_converter(installed, tmp_path, demo_model):
    python = str(installed / "python")
    where = run([python, "-c", "import main, gguf_utils; print(main.__file__); print(gguf_utils.CONVERTER)"], tmp_path)
    module, converter = where.stdout.split()
    assert not Path(module).is_relative_to(ROOT) and "site-packages" in module, module
    if (ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        assert Path(converter).is_file() and Path(converter.replace("hf", "lora")).is_file()
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "Hi!"}\n' * 4, encoding="utf-8")
    workspace = tmp_path / "ws"
    command = [str(installed / "llm-finetuner"), "--workspace", str(workspace)]
    prepared = run([*command, "dataset", str(data), "--model", str(demo_model), "--examples", "1"], tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "format: alpaca" in prepared.stdout and "⟦" in prepared.stdout
    refused = run([*command, "export", "nothing"], tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error:"), refused.stderr
    assert "Traceback" not in refused.stderr
