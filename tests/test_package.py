"""The installable package: `pip install .` adds one import package, `llm_finetuner` (the app's modules inside it),
and an `llm-finetuner` command with the same CLI as `python main.py`, llama.cpp's converter beside the modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the package is built from: the app, not the checkout's environment, data or tests.
LEFT_OUT = (".venv", ".git", ".gpu", "workspace", "tests", "bench", "notebooks", "docs", "build", "__pycache__")
PACKAGE = "llm_finetuner"
DEPS_PTH = "finetuner-deps.pth"


def test_the_root_and_each_of_its_module_folders_are_packaged_under_one_name():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    # The root's modules come in as a whole (no list of them to keep); its folders of modules are listed.
    assert setuptools["package-dir"] == {PACKAGE: "."}
    assert "py-modules" not in setuptools
    folders = sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))
    assert sorted(setuptools["packages"]) == sorted([PACKAGE, *(f"{PACKAGE}.{name}" for name in folders + ["vendor"])])


class Installed(NamedTuple):
    bin: Path
    site_packages: Path
    site_before: set[str]  # the env's site-packages and bin/ before the install
    bin_before: set[str]


def site_packages_of(env_dir: Path) -> Path:
    return Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The package built and installed into a fresh virtual env: its bin/ and site-packages folders, and what they
    held before the install.

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
    purelib = site_packages_of(env_dir)
    (purelib / DEPS_PTH).write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    site_before, bin_before = (
        {path.name for path in purelib.iterdir()},
        {path.name for path in (env_dir / "bin").iterdir()},
    )
    install = [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q"]
    subprocess.run([*install, "--no-deps", "--no-build-isolation", str(source)], check=True, timeout=300)
    return Installed(env_dir / "bin", purelib, site_before, bin_before)


def run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_install_adds_one_package_holding_every_module_and_the_command(installed, tmp_path):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    added = {path.name for path in installed.site_packages.iterdir()} - installed.site_before
    assert added == {PACKAGE, f"{PACKAGE}-{version}.dist-info"}
    assert {path.name for path in installed.bin.iterdir()} - installed.bin_before == {"llm-finetuner"}
    package = installed.site_packages / PACKAGE
    for folder in (".", "ui", "gguf_utils"):  # a module added to the checkout is installed without being listed
        assert sorted(path.name for path in (package / folder).glob("*.py")) == sorted(
            path.name for path in (ROOT / folder).glob("*.py")
        ), folder
    # Another package's module of the same name (here a `settings` that breaks on import) does not shadow the app's.
    other = tmp_path / "other"
    other.mkdir()
    (other / "settings.py").write_text("raise ImportError('another package settings module')\n", encoding="utf-8")
    shadowed = run(
        [str(installed.bin / "llm-finetuner"), "--help"], tmp_path, env={**os.environ, "PYTHONPATH": str(other)}
    )
    assert shadowed.returncode == 0, shadowed.stderr[-2000:]


@pytest.mark.slow
def test_llm_finetuner_has_the_same_commands_as_main_py(installed, tmp_path):
    help_text = run([str(installed.bin / "llm-finetuner"), "--help"], tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: llm-finetuner")
    reference = run([sys.executable, "main.py", "--help"], ROOT)
    # The usage line wraps differently with a shorter name; the options and commands below it are the same.
    assert help_text.stdout.split("\n\n", 1)[1] == reference.stdout.split("\n\n", 1)[1]
    export_help = run([str(installed.bin / "llm-finetuner"), "export", "--help"], tmp_path)
    assert "--ollama NAME" in export_help.stdout and "--lora-gguf" in export_help.stdout


@pytest.mark.slow
def test_installed_command_runs_from_site_packages_with_the_converter(installed, tmp_path, demo_model):
    python = str(installed.bin / "python")
    code = f"from {PACKAGE} import __main__ as entry; entry.use_flat_names(); import main, gguf_utils; "
    where = run([python, "-c", code + "print(main.__file__); print(gguf_utils.CONVERTER)"], tmp_path)
    module, converter = where.stdout.split()
    assert not Path(module).is_relative_to(ROOT) and Path(module).parent == installed.site_packages / PACKAGE, module
    if (ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        assert Path(converter).is_file() and Path(converter.replace("hf", "lora")).is_file()
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "Hi!"}\n' * 4, encoding="utf-8")
    workspace = tmp_path / "ws"
    command = [str(installed.bin / "llm-finetuner"), "--workspace", str(workspace)]
    prepared = run([*command, "dataset", str(data), "--model", str(demo_model), "--examples", "1"], tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "format: alpaca" in prepared.stdout and "⟦" in prepared.stdout
    refused = run([*command, "export", "nothing"], tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error:"), refused.stderr
    assert "Traceback" not in refused.stderr
