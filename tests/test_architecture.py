"""The layers of docs/ARCHITECTURE.md, read from the code: imports run downwards only and form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lower number = lower layer. A module may import its own layer or a lower one, never a higher one.
LAYERS = {
    "workspace": 0,
    "settings": 0,
    "runfolder": 1,
    "llm_clients": 1,  # the LLM provider clients: synthetic data and both judges
    "stages": 2,  # the training stages' records: read by training, planning, the comparison, chat, export and the UI
    "dataset_utils": 2,
    "dataset_files": 2,  # reading a dataset's rows (dataset_utils prepares them)
    "dataset_formats": 2,  # formats, column maps, rows as chat messages
    "dataset_render": 2,  # chat templates, reply spans, tokens with loss masks
    "model_utils": 2,
    "training_utils": 2,
    "train_config": 2,  # TrainConfig and its checks: read by the UI, the CLI, planning, chat and evaluation
    "distributed": 2,  # the GPUs a training run sees, torchrun's processes, the DDP fallback
    "inference_utils": 2,
    "lora_weights": 2,  # a chat model's LoRA weights: merged in place for the tuned side, restored for the base
    "evaluation": 2,  # held-out loss and perplexity of base vs tuned (the eval job kind), over inference_utils
    "synthetic_utils": 2,
    "synthetic_rows": 2,  # SyntheticConfig, the prompts and the reply's validation into a row
    "gguf_utils": 2,
    "arena_utils": 2,
    "arena_config": 2,  # ArenaConfig, contestants and prompts
    "arena_judge": 2,  # what the arena's judge reads and how its verdict is read
    "arena_report": 2,  # the arena's statistics and report
    "compare_utils": 2,
    "preference_utils": 2,  # DPO and GRPO trainers, called by training_utils.train
    "preference_data": 2,
    "rewards": 2,
    "dataset_report": 2,  # the dataset quality report (datasketch duplicates)
    "planning": 2,  # suggested settings and the time estimate, over training_utils and dataset_report
    "download_utils": 2,
    "export_targets": 2,  # export targets (GGUF): the export job kind's config and job function
    "job_checks": 2,  # what submit checks per job kind before a run exists, named by jobs.KINDS
    "jobs": 3,
    "chat_worker": 3,  # the Test tab's model process: started by the UI, runs inference_utils
    "submit": 4,
    "ui": 5,
    "main": 6,
    "__main__": 6,  # the installed package's entry point (the llm-finetuner command): runs main
}


def project_modules() -> dict[str, Path]:
    """Dotted name → file of every module of the app (not tests, benchmarks, scripts or vendored code)."""
    modules = {}
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("ui/*.py")) + sorted(ROOT.glob("gguf_utils/*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)
        modules[name] = path
    return modules


def imports_of(path: Path, package: str, known: set[str]) -> set[str]:
    """Project modules a file imports anywhere (inside functions too: those are how the old cycles hid)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            # `from ui import forms` depends on ui.forms; the package itself only when a name comes from it.
            names = submodules if len(submodules) == len(node.names) else [base, *submodules]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imports_of(path, package, set(modules)) - {name}
    return graph


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer():
    assert sorted(name for name in project_modules() if name.split(".")[0] not in LAYERS) == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["jobs"], "the graph is empty: the parser found no imports"
    assert cycles(graph) == []


def test_imports_run_downwards_only():
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_the_run_folder_protocol_imports_only_the_workspace():
    assert import_graph()["runfolder"] == {"workspace"}


def test_the_cycle_finder_sees_a_cycle_through_function_level_imports(tmp_path):
    # The check itself must be able to fail: a stage importing the supervisor inside a function is a cycle.
    stage = tmp_path / "stage.py"
    stage.write_text("def run():\n    from jobs import now\n")
    graph = {"jobs": {"stage"}, "stage": imports_of(stage, "", {"jobs", "stage"})}
    assert cycles(graph) == [["jobs", "stage", "jobs"]]
