"""Gradio app: tabs Model · Dataset · Synthetic data · Train · Test & compare · Arena · Benchmarks · Export · Runs.

One module per tab builds its widgets and wires each event to one utility function; no logic lives here.
`python main.py` calls `serve()`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gradio as gr

from ui import arena_tab, dataset_tab, export_tab, forms, model_tab, runs_tab, synthetic_tab, test_tab, train_tab
from workspace import CONFINE_ENV, WORKSPACE_ENV, UserError, is_loopback, workspace_root

log = logging.getLogger(__name__)

AUTH_ENV = "FINETUNER_AUTH"
SPACE_ENV = "SPACE_ID"  # set by Hugging Face Spaces in every Space's container (owner/name)
SPACE_STORAGE = Path("/data")  # a Space's persistent storage, mounted there when the Space has some
CSS = """
.run-status progress { height: 14px; }
.run-error { white-space: pre-wrap; color: #b91c1c; }
.run-note { color: #92400e; }
.state { font-weight: 600; }
.state-running, .state-queued { color: #2563eb; } .state-done { color: #16a34a; } .state-failed { color: #b91c1c; }
button.stop:disabled { background: var(--button-secondary-background-fill); color: var(--body-text-color-subdued);
  border-color: var(--border-color-primary); box-shadow: none; opacity: 0.7; }
#train-hint, #export-hint, #synth-hint, #arena-hint { color: var(--body-text-color-subdued); font-size: var(--text-sm); }
"""


def build_app(workspace: str | Path | None = None) -> gr.Blocks:
    """The whole app for one workspace; every tab reads and writes only inside it."""
    from ui import bench_tab  # here, not in the import line above that every new tab edits: merges stay small

    root = workspace_root(workspace)
    form = forms.Form()
    with gr.Blocks(title="LLM Finetuner") as app:
        gr.Markdown(f"# LLM Finetuner\nWorkspace: `{root}`")
        with gr.Tabs() as tabs:
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                model = model_tab.build(form, root)
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                dataset = dataset_tab.build(form)
            with gr.Tab("Synthetic data", id="synthetic", elem_id="tab-synthetic"):
                synthetic = synthetic_tab.build()
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(form)
            with gr.Tab("Test & compare", id="test", elem_id="tab-test") as test_container:
                test = test_tab.build()
            with gr.Tab("Arena", id="arena", elem_id="tab-arena") as arena_container:
                arena = arena_tab.build()
            with gr.Tab("Benchmarks", id="benchmarks", elem_id="tab-benchmarks") as bench_container:
                bench = bench_tab.build()
            with gr.Tab("Export", id="export", elem_id="tab-export") as export_container:
                export = export_tab.build()
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_container:
                runs = runs_tab.build()
        model_tab.wire(model, form, [model.memory, train.memory], app, root)
        dataset_tab.wire(dataset, form, root)
        synthetic_tab.wire(synthetic, form.widgets[dataset_tab.FIELDS.dataset.source], "dataset", tabs, app, root)
        train_tab.wire(train, form, app, root)
        test_tab.wire(test, test_container, root)
        arena_tab.wire(arena, arena_container, app, root)
        bench_tab.wire(bench, bench_container, app, root)
        export_tab.wire(export, export_container, root)
        runs_tab.wire(runs, runs_container, root)
        forms.keep_in_browser(form, app, root)
    return app


def _import_libraries() -> None:
    """Import torch, transformers (with its lazily loaded model classes) and datasets once, before serving.

    Handlers run in threads: when one imports transformers while another's `datasets` call sees the half-imported
    module in sys.modules, datasets fails (`no attribute 'PreTrainedTokenizerBase'`). Importing up front also keeps
    the first page load from waiting ~10 s for the memory estimate.
    """
    import datasets  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def parse_auth(auth: str | None, auth_file: str | Path | None = None) -> tuple[str, str] | None:
    """USER:PASS from the flag, else the file (one line, kept out of `ps`), else $FINETUNER_AUTH; or None."""
    if auth and auth_file:
        raise UserError("Give --auth or --auth-file, not both.")
    if auth_file:
        try:
            value = Path(auth_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"Cannot read the --auth-file '{auth_file}': {exc.strerror or exc}.") from None
        if "\n" in value:
            raise UserError(f"The --auth-file '{auth_file}' must hold one USER:PASS line.")
    else:
        value = auth or os.environ.get(AUTH_ENV)
        if not value:
            return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth-file holds one USER:PASS line." if auth_file else "--auth takes USER:PASS.")
    return user, password


def space_workspace() -> Path | None:
    """The workspace of an app running in a Hugging Face Space: on its persistent storage when it has some (else
    the container's disk, lost on restart: None); None outside a Space or when a workspace is chosen already."""
    if not os.environ.get(SPACE_ENV) or os.environ.get(WORKSPACE_ENV):
        return None
    if SPACE_STORAGE.is_dir() and os.access(SPACE_STORAGE, os.W_OK):
        # The Hub cache goes there too, so models downloaded once survive a restart.
        os.environ.setdefault("HF_HOME", str(SPACE_STORAGE / "huggingface"))
        return SPACE_STORAGE / "workspace"
    log.warning("This Space has no persistent storage: runs and exports are lost when it restarts.")
    return None


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    auth: str | None = None,
    workspace: str | Path | None = None,
    auth_file: str | Path | None = None,
    insecure_no_auth: bool = False,
) -> None:
    """Serve the app; a public link (share) needs a password and confines file paths to the workspace, and so does
    any host other than this machine's loopback address unless insecure_no_auth says otherwise."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, not {port}.")
    credentials = parse_auth(auth, auth_file)
    if share and credentials is None:
        raise UserError(f"A public link needs a password: add --auth USER:PASS (or set {AUTH_ENV}).")
    space = os.environ.get(SPACE_ENV)
    if space and credentials is None:
        # A Space is public on the internet (a private one to its collaborators): never serve it open.
        raise UserError(
            f"This Hugging Face Space ({space}) needs a login: add a secret named {AUTH_ENV} holding USER:PASS in the "
            "Space's settings (Settings → Variables and secrets) and restart it."
        )
    if credentials is None and not is_loopback(host):
        if not insecure_no_auth:
            raise UserError(
                f"Serving on {host} without a login lets anyone who can reach this machine use the app: add --auth "
                f"USER:PASS, --auth-file PATH or set {AUTH_ENV} (or --insecure-no-auth to serve it open anyway)."
            )
        log.warning(
            "--insecure-no-auth: serving on %s:%d without a login; anyone who reaches it can run jobs and read and "
            "download every file in the workspace.",
            host,
            port,
        )
    if share or space or not is_loopback(host):
        # Anyone other than this machine's user may reach the app: keep every path they type inside the workspace.
        os.environ[CONFINE_ENV] = "1"
    root = workspace_root(workspace or space_workspace())
    _import_libraries()
    try:
        build_app(root).queue().launch(
            server_name=host,
            server_port=port,
            share=share,
            auth=credentials,
            allowed_paths=[str(root)],
            css=CSS,
        )
    except OSError as exc:
        # Gradio raises OSError when it cannot bind the port (taken, or not allowed to this user).
        raise UserError(
            f"Port {port} on {host} cannot be opened: it is in use or not allowed ({exc.strerror or 'no free port'}). "
            "Stop what holds it or pick another with --port."
        ) from None
