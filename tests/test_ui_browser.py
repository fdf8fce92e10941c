"""The app in a real browser (Debian's chromium driven by Playwright), served by `python main.py` on the demo model.

A person's path through every tab: pick the model, save and load a preset, upload a JSONL file, preview it, train a
few steps while the loss curve grows, stop, resume, reload the page mid-run, chat, compare base and tuned, export
q8_0 and download it, and delete a run. Also: a bad upload gives a readable error, synthetic data comes from an
OpenAI-compatible server with the API key passed only to the job, and a Hub id is downloaded from a local fake Hub
(tests/fake_hub.py) with visible progress and trained on. Screenshots of each tab go to docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

import jobs
import runfolder
from conftest import capital_rows, write_jsonl
from ui.model_tab import DEMO_NOTE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
DEMO_LABEL = f"demo — {DEMO_NOTE}"  # the Model tab's label of the demo model (the option a person clicks)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
JOB_TIMEOUT_MS = 600_000  # training and export on two shared CPU cores


@dataclass
class App:
    url: str
    workspace: Path
    log: Path


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_model):
    """`python main.py --port P --workspace W` with the session's demo model linked into W."""
    workspace = tmp_path_factory.mktemp("ui-workspace")
    (workspace / "models").mkdir()
    (workspace / "models" / demo_model.name).symlink_to(demo_model)
    yield from serve_app(workspace, {"HF_HUB_OFFLINE": "1"})


def serve_app(workspace: Path, env: dict[str, str]):
    """Serve the app on `workspace` with `env` added to this environment; yields an App, then stops its jobs."""
    port = jobs.free_port()
    log = workspace.parent / f"server-{workspace.name}.log"
    env = {**os.environ, **env, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--port", str(port), "--workspace", str(workspace)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield App(url, workspace, log)
    for run in jobs.list_runs(workspace):
        if run.state in runfolder.ACTIVE:
            jobs.stop_job(run.path)
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is missing: apt-get install chromium (make test does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app.url)
    page.wait_for_selector("#tab-model-button")
    yield page
    context.close()


# ---------------------------------------------------------------- what a person does


def open_tab(page, name: str) -> None:
    page.click(f"#tab-{name}-button")


def type_into(page, elem_id: str, value) -> None:
    page.fill(f"#{elem_id} input, #{elem_id} textarea", str(value))


def choose(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.click(f"#{elem_id} li[role=option][aria-label='{option}']")


def wait_text(page, elem_id: str, text: str, timeout: float = 60_000) -> None:
    page.wait_for_selector(f"#{elem_id}:has-text({text!r})", timeout=timeout)


def wait_step(page, at_least: int, timeout: float = JOB_TIMEOUT_MS) -> None:
    page.wait_for_function(
        "n => { const m = (document.querySelector('#train-status')?.innerText || '').match(/step (\\d+)\\//);"
        " return m && Number(m[1]) >= n; }",
        arg=at_least,
        timeout=timeout,
    )


POINTS_JS = (
    "() => [...document.querySelectorAll('#train-plot g.mark-line path')]"
    ".map(p => (p.getAttribute('d') || '').split(/[ML]/).filter(Boolean).length).reduce((a, b) => a + b, 0)"
)


def wait_points(page, at_least: int) -> None:
    """Wait until the loss curve, as drawn (Vega's SVG line paths: M x,y then L x,y per point), has this many points."""
    page.wait_for_function(f"n => ({POINTS_JS})() >= n", arg=at_least)


def toast_texts(page) -> list[str]:
    toasts = page.locator(".toast-body")
    return [toasts.nth(index).inner_text() for index in range(toasts.count())]


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)  # let plots finish drawing
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


# ---------------------------------------------------------------- tests


def test_bad_upload_shows_a_readable_error(page, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "missing quote}\n', encoding="utf-8")
    open_tab(page, "dataset")
    page.set_input_files("#dataset-upload input[type=file]", str(bad))
    page.wait_for_selector(".toast-body:has-text('line 2 is not valid JSON')")
    assert not any("Traceback" in text for text in toast_texts(page))


def test_synthetic_rows_from_an_openai_compatible_server(page, app):
    from fake_llm_servers import FakeLLMServer

    secret = "sk-test-ui-secret-1234"
    with FakeLLMServer(api_key=secret) as server:
        open_tab(page, "synthetic")
        type_into(page, "synth-model", "fake-model")
        type_into(page, "synth-base-url", server.openai_url)
        type_into(page, "synth-api-key", secret)
        type_into(page, "synth-topic", "capital cities of Europe")
        type_into(page, "synth-rows", 6)
        type_into(page, "synth-run-name", "synth-capitals")
        page.click("#synth-start")
        wait_text(page, "synth-status", "done", timeout=120_000)
    wait_text(page, "synth-rows-table", "user:")
    assert "6/6 rows" in page.inner_text("#synth-status")
    screenshot(page, "synthetic")

    run_dir = app.workspace / "runs" / "synth-capitals"
    assert not [path for path in run_dir.rglob("*") if path.is_file() and secret in path.read_text(errors="ignore")]
    page.click("#synth-use")
    page.wait_for_selector("#dataset-source:visible")
    assert page.input_value("#dataset-source textarea, #dataset-source input").endswith("synth-capitals/data.jsonl")


@pytest.mark.timeout(1800)  # minutes of CPU training and export; far less on an idle machine
def test_a_person_trains_tests_and_exports_the_demo_model(page, app, tmp_path):
    data = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(24))

    # Model: the demo model, checked, with its memory estimate.
    choose(page, "model-name", DEMO_LABEL)
    page.click("#model-check")
    wait_text(page, "model-info", "Model files")
    wait_text(page, "model-memory", "Memory estimate")
    screenshot(page, "model")

    # Dataset: upload, detected format, preview with the trained spans highlighted.
    open_tab(page, "dataset")
    page.set_input_files("#dataset-upload input[type=file]", str(data))
    wait_text(page, "dataset-summary", "24 rows")
    wait_text(page, "dataset-summary", "messages")
    page.click("#dataset-preview")
    wait_text(page, "dataset-stats", "24 rows read")
    wait_text(page, "dataset-rendered", "The capital of France is Paris. Zebra!")
    screenshot(page, "dataset")

    # Train settings small enough for two CPU cores, saved as a preset and loaded back.
    open_tab(page, "train")
    for elem_id, value in [
        ("train-max-steps", 8),
        ("train-batch", 4),
        ("train-accum", 1),
        ("train-seq", 128),
        ("train-lr", 0.001),
        ("train-eval", 0.25),
        ("train-save-steps", 4),
    ]:
        type_into(page, elem_id, value)
    page.click("#train-advanced")
    page.uncheck("#train-gc input[type=checkbox]")
    type_into(page, "train-warmup", 0)
    open_tab(page, "model")
    type_into(page, "preset-name", "tiny-cpu")
    page.click("#preset-save")
    wait_text(page, "preset-status", "Saved preset")
    open_tab(page, "train")
    type_into(page, "train-max-steps", 60)
    open_tab(page, "model")
    page.click("#preset-load")
    wait_text(page, "preset-status", "Loaded preset")
    open_tab(page, "train")
    assert page.input_value("#train-max-steps input") == "8"

    # Start: the loss curve grows while the run trains; another Start would wait in the queue, as on the CLI.
    page.click("#train-start")
    wait_text(page, "train-status", "running")
    wait_text(page, "train-hint", "waits for it in the queue")
    wait_step(page, 1)
    wait_points(page, 1)
    wait_step(page, 2)
    wait_points(page, 2)

    # Stop saves a checkpoint; Resume carries on from it.
    page.click("#train-stop")
    wait_text(page, "train-status", "stopped", timeout=JOB_TIMEOUT_MS)
    assert page.is_enabled("#train-resume")
    assert page.is_disabled("#train-stop")
    page.click("#train-resume")
    page.wait_for_selector("#train-status:has-text('running'), #train-status:has-text('queued')")

    # A reload mid-run shows the same run, its curve so far, and keeps updating.
    page.reload()
    open_tab(page, "train")
    page.wait_for_selector("#train-status:has-text('running'), #train-status:has-text('queued')")
    wait_points(page, 2)
    wait_text(page, "train-status", "done", timeout=JOB_TIMEOUT_MS)
    wait_text(page, "train-status", "step 8/8")
    assert "eval loss" in page.inner_text("#train-status")
    assert page.is_disabled("#train-resume") and page.is_enabled("#train-start")
    run_name = page.input_value("#train-runs input")
    screenshot(page, "train")

    # Test & compare: chat with the run, then base vs tuned on one prompt (greedy, short replies).
    open_tab(page, "test")
    page.wait_for_function("name => document.querySelector('#test-run input')?.value === name", arg=run_name)
    page.get_by_text("Generation settings").click()
    page.fill("#test-temperature input[type=number]", "0")
    page.press("#test-temperature input[type=number]", "Enter")
    type_into(page, "test-max-tokens", 16)
    type_into(page, "test-message", "What is the capital of Italy?")
    page.click("#test-send")
    # The run learned to end its answers with "Zebra!" (see capital_rows): the tuned model says it, the base does not.
    page.wait_for_function(
        "() => (document.querySelector('#test-chatbot [data-testid=bot]')?.innerText || '').includes('Zebra')"
        " && !document.querySelector('.generating')",
        timeout=300_000,
    )
    assert "Rome" in page.inner_text("#test-chatbot [data-testid=bot]")
    wait_text(page, "test-loaded", run_name)
    screenshot(page, "test")
    page.get_by_role("tab", name="Base vs tuned").click()
    type_into(page, "test-prompt", "What is the capital of Spain?")
    page.click("#test-compare")
    page.wait_for_function(
        "() => document.querySelector('#test-tuned-reply textarea')?.value.includes('Zebra')"
        " && document.querySelector('#test-base-reply textarea')?.value.trim().length > 0"
        " && !document.querySelector('.generating')",
        timeout=300_000,
    )
    assert "Madrid" in page.input_value("#test-tuned-reply textarea")
    assert "Zebra" not in page.input_value("#test-base-reply textarea")
    screenshot(page, "compare")

    # Export q8_0 (short check) and download the file.
    open_tab(page, "export")
    page.wait_for_function("name => document.querySelector('#export-run input')?.value === name", arg=run_name)
    page.get_by_text("Check and Modelfile settings").click()
    type_into(page, "export-check-tokens", 8)
    page.click("#export-start")
    wait_text(page, "export-status", "done", timeout=JOB_TIMEOUT_MS)
    wait_text(page, "export-results", "q8_0")
    wait_text(page, "export-modelfile", "FROM")
    link = page.locator("#export-downloads a", has_text=re.compile(r"q8_0\.gguf"))
    with page.expect_download() as download_info:
        link.click()
    saved = tmp_path / "model.gguf"
    download_info.value.save_as(saved)
    assert saved.read_bytes()[:4] == b"GGUF"
    assert saved.stat().st_size == (app.workspace / "runs" / run_name / "gguf" / f"{run_name}-q8_0.gguf").stat().st_size
    screenshot(page, "export")

    # Runs: every run is listed; deleting the export job's folder asks first.
    open_tab(page, "runs")
    for name in (run_name, f"export-{run_name}", "synth-capitals"):
        wait_text(page, "runs-table", name)
    choose(page, "runs-run", run_name)
    wait_text(page, "runs-config", "max_steps: 8")
    screenshot(page, "runs")
    choose(page, "runs-run", f"export-{run_name}")
    wait_text(page, "runs-config", "quants")  # the export run's details, as a person sees them before deleting
    page.click("#runs-delete")
    page.click("#runs-cancel")
    assert (app.workspace / "runs" / f"export-{run_name}").exists()
    page.click("#runs-delete")
    page.click("#runs-confirm")
    wait_text(page, "runs-status", "Deleted run")
    assert not (app.workspace / "runs" / f"export-{run_name}").exists()
    assert (app.workspace / "runs" / run_name / "gguf" / f"{run_name}-q8_0.gguf").exists()


@pytest.fixture(scope="module")
def hub_app(tmp_path_factory, demo_model):
    """The app online, its Hub (HF_ENDPOINT) a local fake serving a small model with the demo model's tokenizer
    as tester/smol, slowed to about 5 s for its 30 MB so that the download's progress shows; an empty cache."""
    from fake_hub import FakeHub, small_model

    workspace = tmp_path_factory.mktemp("hub-workspace")
    with FakeHub(rate=5e6) as hub:
        hub.add("tester/smol", small_model(demo_model, tmp_path_factory.getbasetemp() / "small-model"))
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(workspace.parent / "hub-home")}
        yield from serve_app(workspace, env)


@pytest.mark.timeout(600)
def test_a_person_downloads_a_hub_model_with_progress_and_trains_on_it(browser, hub_app, tmp_path):
    data = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(8))
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(hub_app.url)
    page.wait_for_selector("#tab-model-button")

    # Model: type a Hub id, Download: bytes done / total while it runs, then done.
    type_into(page, "model-name", "tester/smol")
    page.press("#model-name input", "Enter")
    page.click("#model-download")
    page.wait_for_function(
        "() => { const bar = document.querySelector('#model-download-status progress');"
        " return bar && bar.value > 0 && bar.value < bar.max; }"
    )
    assert re.search(r"Downloading tester/smol: [\d.]+ MB of [\d.]+ MB", page.inner_text("#model-download-status"))
    wait_text(page, "model-download-status", "done")
    wait_text(page, "model-download-status", "Ready in")
    page.click("#model-check")
    wait_text(page, "model-info", "in the local Hugging Face cache")

    # Train two steps on it.
    open_tab(page, "dataset")
    page.set_input_files("#dataset-upload input[type=file]", str(data))
    wait_text(page, "dataset-summary", "8 rows")
    open_tab(page, "train")
    for elem_id, value in [("train-max-steps", 2), ("train-batch", 1), ("train-accum", 1), ("train-seq", 64)]:
        type_into(page, elem_id, value)
    page.click("#train-advanced")
    page.uncheck("#train-gc input[type=checkbox]")
    type_into(page, "train-warmup", 0)
    page.click("#train-start")
    wait_text(page, "train-status", "done", timeout=JOB_TIMEOUT_MS)
    wait_text(page, "train-status", "step 2/2")
    context.close()
    run = next(info for info in jobs.list_runs(hub_app.workspace, kinds=("train",)))
    assert runfolder.stage_settings(run.path)["model"]["name_or_path"] == "tester/smol"


# ---------------------------------------------------------------- a preference file and columns that need mapping

# A reply longer than its cell, with a word longer than the cell is wide: both must wrap inside the cell.
LONG_REPLY = (
    "Paris-is-the-capital-of-France-" * 12 + " It sits on the Seine and has been the capital for centuries." * 6
)


def preference_file(folder: Path) -> Path:
    rows = [
        {"prompt": "What is the capital of France?", "chosen": LONG_REPLY, "rejected": "Lyon, I think."},
        {"prompt": "Say hello.", "chosen": "Hello! How can I help?", "rejected": "No."},
        {"prompt": "Say hello.", "chosen": "Hello! How can I help?", "rejected": "No."},
    ]
    return write_jsonl(folder / "prefs.jsonl", rows)


def support_csv(folder: Path) -> Path:
    """Columns no format names (customer_message, agent_reply), quoted commas and a line break, an empty reply."""
    path = folder / "support.csv"
    path.write_text(
        "customer_message,agent_reply,category\n"
        '"How do I reset my password, please?","Open Settings, then Security.\nClick Reset.",account\n'
        '"Where is my order?","It ships tomorrow.",orders\n'
        '"Can I pay by card?","",billing\n',
        encoding="utf-8",
    )
    return path


def pairs_geometry(page) -> dict:
    """How far the chosen reply's text reaches into the rejected cell (px), and whether it overflows its own box."""
    return page.evaluate(
        "() => { const row = document.querySelector('#dataset-pairs table.preference-pairs').rows[1];"
        " const pre = row.cells[0].querySelector('pre'); const rejected = row.cells[1].getBoundingClientRect();"
        " return {into_rejected: pre.getBoundingClientRect().right - rejected.left,"
        " overflow: pre.scrollWidth - pre.clientWidth}; }"
    )


def test_a_person_previews_preference_pairs_and_maps_the_columns_of_a_csv(page, app, tmp_path):
    page.set_viewport_size({"width": 1400, "height": 900})
    open_tab(page, "dataset")

    # A preference file: detected, shown side by side without overprinting, previewed and reported as DPO reads it.
    page.set_input_files("#dataset-upload input[type=file]", str(preference_file(tmp_path)))
    wait_text(page, "dataset-summary", "preference pairs")
    page.wait_for_selector("#dataset-pairs table.preference-pairs")
    geometry = pairs_geometry(page)
    assert geometry["into_rejected"] <= 0 and geometry["overflow"] <= 1, geometry
    page.click("#dataset-preview")
    wait_text(page, "dataset-stats", "read as DPO reads it")
    wait_text(page, "dataset-stats", "The Train tab's stage is SFT")
    wait_text(page, "dataset-rendered", "<|im_start|>assistant")
    wait_text(page, "dataset-rendered", "Lyon, I think.<|im_end|>")
    assert pairs_geometry(page)["into_rejected"] <= 0  # the rendered pairs too
    page.click("#dataset-report")
    wait_text(page, "dataset-report-text", "exact duplicates: 1 (rows 3)")
    assert not [text for text in toast_texts(page) if "Could not tell" in text or "Error" in text]
    screenshot(page, "dataset-pairs")

    # A CSV whose columns need mapping: the mapping opens where detection fails, each column with its first value.
    type_into(page, "dataset-source", support_csv(tmp_path))  # the upload box holds the first file: name this one
    page.click("#dataset-load")
    wait_text(page, "dataset-summary", "Format not detected")
    wait_text(page, "dataset-mapping", "Map your columns")
    page.click("#map-instruction input")
    page.click("#map-instruction li[role=option]:has-text('customer_message — “How do I reset my password')")
    page.click("#map-output input")
    page.click("#map-output li[role=option]:has-text('agent_reply — “Open Settings, then Security.')")
    wait_text(page, "dataset-summary", "with your mapping")
    page.click("#dataset-preview")
    wait_text(page, "dataset-stats", "3 rows read")
    wait_text(page, "dataset-rendered", "Open Settings, then Security.")
    screenshot(page, "dataset-mapping")

    # The cleaned copy (the empty reply dropped) is one click from being the dataset.
    page.click("#dataset-clean")
    wait_text(page, "dataset-report-text", "Saved 2 of 3 rows")
    page.click("#dataset-use-cleaned")
    page.wait_for_function(
        "() => (document.querySelector('#dataset-source textarea, #dataset-source input')?.value || '')"
        ".endsWith('support.cleaned.jsonl')"
    )
    wait_text(page, "dataset-summary", "2 rows")


def test_an_arena_judge_that_is_not_running_is_one_message_and_no_run(page, app, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n", encoding="utf-8")
    open_tab(page, "arena")
    for contestant in ("base:demo", f"base:{app.workspace / 'models' / 'SmolLM2-135M-Instruct'}"):
        page.click("#arena-contestants input")
        page.keyboard.type(contestant)
        page.keyboard.press("Enter")
    type_into(page, "arena-prompts-file", prompts)
    page.check("#arena-judge-provider input[value='ollama']")
    type_into(page, "arena-judge-model", "llama3.2")
    type_into(page, "arena-judge-url", f"http://127.0.0.1:{jobs.free_port()}")
    before = {path.name for path in (app.workspace / "runs").glob("arena-*")}
    page.click("#arena-start")
    page.wait_for_selector(".toast-body:has-text('Cannot reach the ollama server')")
    page.wait_for_timeout(3000)  # a job started anyway would fail within this
    assert len([text for text in toast_texts(page) if "Cannot reach the ollama server" in text]) == 1
    assert {path.name for path in (app.workspace / "runs").glob("arena-*")} == before
    assert "Cannot reach" not in page.inner_text("#arena-status")
