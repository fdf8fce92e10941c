"""The layers of docs/ARCHITECTURE.md, read from the code: imports run downwards only, form no cycle and make no\nlong chains."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The layers, lowest first. A module may import its own layer or a lower one, never a higher one.
ORDER = (
    "workspace",  # paths, YAML, UserError
    "settings",  # the settings' metadata, the run-folder protocol
    "data",  # datasets and models: files, formats, templates, preparation, the report, downloads, the GPUs
    "clients",  # the LLM provider clients: synthetic data and both judges
    "stages",  # the training stages' records, TrainConfig, the preference data, the reward functions
    "training",  # the recipe and the stages' trainers
    "tasks",  # chat, evaluation, synthetic data, the arena, export, the comparison, planning
    "jobs",  # the supervisor, the job kinds and their checks
    "submit",
    "entry",  # the UI and the CLI
)
LAYERS = {
    "workspace": "workspace",
    "settings": "settings",
    "runfolder": "settings",
    "download_utils": "data",
    "dataset_files": "data",  # reading a dataset's rows (dataset_utils prepares them)
    "dataset_formats": "data",  # formats, column maps, rows as chat messages
    "dataset_render": "data",  # chat templates, reply spans, tokens with loss masks
    "template_sandbox": "data",  # a user's chat template rendered in a child process under limits
    "dataset_utils": "data",  # preparation: the rows a training run, a preview and evaluation read
    "dataset_report": "data",  # the dataset quality report
    "text_duplicates": "data",  # exact and near duplicates (datasketch): the report and the synthetic filter
    "model_utils": "data",  # models, devices, the memory estimate and the micro-batch it fits
    "distributed": "data",  # the GPUs a training run sees, torchrun's processes and nodes, DDP or FSDP
    "llm_clients": "clients",
    "stages": "stages",  # one record per training stage: read by training, planning, the comparison, chat, export, UI
    "train_config": "stages",  # TrainConfig and its checks: read by the UI, the CLI, planning, chat and evaluation
    "preference_data": "stages",  # preference pairs and prompts in each stage's data format
    "rewards": "stages",  # GRPO's reward functions, the judge among them
    "training_utils": "training",
    "preference_utils": "training",  # the DPO / ORPO / KTO / GRPO trainers a stage's record names
    "inference_utils": "tasks",
    "evaluation": "tasks",  # a run's held-out loss and perplexity, base vs tuned (the eval job)
    "lora_weights": "tasks",  # merging a LoRA adapter into its layers and restoring them (chat's base vs tuned)
    "chat_worker": "tasks",  # the Test tab's model process: started by the UI, runs inference_utils
    "synthetic_rows": "tasks",  # SyntheticConfig, the prompts and the reply's validation into a row
    "synthetic_utils": "tasks",
    "arena_config": "tasks",  # ArenaConfig, contestants and prompts
    "arena_judge": "tasks",  # what the arena's judge reads and how its verdict is read
    "arena_report": "tasks",  # the arena's statistics and report
    "arena_utils": "tasks",
    "gguf_utils": "tasks",
    "export_targets": "tasks",  # export targets (GGUF): the export job kind's config and job function
    "hub_push": "tasks",  # pushing a run to the Hub: the push job kind's config, checks and upload
    "model_card": "tasks",  # the pushed run's model card (README.md and the loss curve)
    "compare_utils": "tasks",
    "planning": "tasks",  # suggested settings and the time estimate
    "benchmark": "tasks",  # lm-evaluation-harness tasks on a run's base, tuned and GGUF models (the benchmark job)
    "benchmark_report": "settings",  # a saved benchmark table and its rows as text (no harness import)
    "serving": "tasks",  # a run's OpenAI-compatible endpoint: checks, start, reuse, stop (loads no model)
    "serving_app": "tasks",  # the endpoint's process: llama.cpp's server app or our FastAPI app over transformers
    "jobs": "jobs",
    "job_checks": "jobs",  # what submit checks per job kind before a run exists, named by jobs.KINDS
    "submit": "submit",
    "ui": "entry",
    "main": "entry",
    "__main__": "entry",  # the installed package's entry point (the llm-finetuner command): runs main
}
# The longest chain of imports from main.py over the app's own modules (tabs included), main counted.
MAX_CHAIN = 10


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
    return ORDER.index(LAYERS[module.split(".")[0]])


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
        f"{module} ({ORDER[layer(module)]}) imports {target} ({ORDER[layer(target)]})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert upward == []


def longest_chain(graph: dict[str, set[str]], start: str) -> list[str]:
    """The longest path of imports from `start` (the graph has no cycle: test_the_import_graph_has_no_cycle)."""
    memo: dict[str, list[str]] = {}

    def walk(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node, *max((walk(target) for target in sorted(graph[node])), key=len, default=[])]
        return memo[node]

    return walk(start)


def test_the_longest_import_chain_from_main_is_short():
    chain = longest_chain(import_graph(), "main")
    assert len(chain) <= MAX_CHAIN, " → ".join(chain)


def test_the_chain_finder_follows_the_longest_branch():
    graph = {"main": {"a", "b"}, "a": {"c"}, "b": set(), "c": {"d"}, "d": set()}
    assert longest_chain(graph, "main") == ["main", "a", "c", "d"]


def test_the_run_folder_protocol_imports_only_the_workspace():
    assert import_graph()["runfolder"] == {"workspace"}


def test_the_cycle_finder_sees_a_cycle_through_function_level_imports(tmp_path):
    # The check itself must be able to fail: a stage importing the supervisor inside a function is a cycle.
    stage = tmp_path / "stage.py"
    stage.write_text("def run():\n    from jobs import now\n")
    graph = {"jobs": {"stage"}, "stage": imports_of(stage, "", {"jobs", "stage"})}
    assert cycles(graph) == [["jobs", "stage", "jobs"]]
