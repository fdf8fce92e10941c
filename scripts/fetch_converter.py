"""Unpack llama.cpp's HF→GGUF converters from the sdist of the installed llama-cpp-python (same version).

Usage: python scripts/fetch_converter.py DEST   → DEST/llama.cpp/convert_hf_to_gguf.py (+ its helpers), its list of
supported model classes (SUPPORTED_MODELS), and llama.cpp's vocabulary files of the catalogue's tokenizers
(models/ggml-vocab-*.gguf: gguf_utils.vocab builds real tokenizers from them for the model-family tests).
The sdist comes from the package registry through pip; nothing is downloaded when the app runs.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# What the converters import from their own folder. gguf-py/ too: the converter puts it first on sys.path, and
# PyPI's gguf 0.19.0 is older than the gguf-py of the same number in llama-cpp-python 0.3.36 (no LazyChunkedTensor).
WANTED = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/gguf/",
    "gguf-py/LICENSE",
    "LICENSE",
    # gguf_utils.vocab.VOCABS (not imported: the app's modules need the venv this script may run before).
    "models/ggml-vocab-llama-bpe.gguf",
    "models/ggml-vocab-qwen2.gguf",
    "models/ggml-vocab-phi-3.gguf",
    "models/ggml-vocab-llama-spm.gguf",
)


def main(dest: str) -> None:
    version = importlib.metadata.version("llama-cpp-python")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                f"llama-cpp-python=={version}",
            ],
            check=True,
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staging = Path(tmp) / "out"
        with tarfile.open(sdist) as archive:
            prefix = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [
                member
                for member in archive.getmembers()
                if member.name.startswith(prefix) and member.name[len(prefix) :].startswith(WANTED)
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
            archive.extractall(staging, members=members, filter="data")
        if not (staging / "convert_hf_to_gguf.py").exists():
            sys.exit(f"convert_hf_to_gguf.py not found in {sdist.name}")
        supported = check_converter(staging / "convert_hf_to_gguf.py")
        (staging / "SUPPORTED_MODELS").write_text(supported)
        (staging / "VERSION").write_text(version + "\n")
        target = Path(dest) / "llama.cpp"
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)
    print(f"llama.cpp converter {version} in {target}")


def check_converter(script: Path) -> str:
    """Fail now, not at export time: the converter must start, and import the gguf-py shipped beside it. Returns
    its list of supported model classes."""
    result = subprocess.run([sys.executable, str(script), "--print-supported-models"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{script.name} does not start:\n{result.stderr[-2000:]}")
    # The same sys.path change the converter makes for itself.
    where = "import sys; sys.path.insert(1, sys.argv[1]); import gguf; print(gguf.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", where, str(script.parent / "gguf-py")], capture_output=True, text=True
    )
    if not Path(found.stdout.strip()).resolve().is_relative_to(script.parent.resolve()):
        sys.exit(
            f"the converter would import gguf from {found.stdout.strip() or found.stderr[-500:]}, not its own gguf-py"
        )
    return result.stdout + result.stderr


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vendor")
