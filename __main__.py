"""The installed package's entry point: the `llm-finetuner` command (and `python -m llm_finetuner`) runs main.main,
the CLI of `python main.py`.

`pip install .` puts the app's flat modules inside one package, `llm_finetuner`, instead of at the top of
site-packages (pyproject.toml says why). The modules import each other by their flat names (`import workspace`), as
they do from a checkout, so the package's folder goes first on sys.path before main is imported: for this process
only (and the job and chat processes it starts by file path, whose folder Python puts there itself), never for every
program of the environment as a .pth file would. In a checkout the folder is the checkout's root: `python .` is
`python main.py`."""

from __future__ import annotations

import sys
from pathlib import Path

FOLDER = str(Path(__file__).resolve().parent)


def use_flat_names() -> None:
    """Let `import workspace` and the other flat names find the app's modules first (before a same-named module of
    another installed package)."""
    if sys.path[:1] != [FOLDER]:
        sys.path.insert(0, FOLDER)


def main() -> int:
    use_flat_names()
    import main as app

    return app.main()


if __name__ == "__main__":
    sys.exit(main())
