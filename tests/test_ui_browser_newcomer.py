"""What a newcomer sees in a real browser (issue 30): a reload keeps the form, the Train tab names what Start takes
and shows only the chosen stage's fields, Refresh runs lists a new GGUF and a stopped run's checkpoint, a Hub id
typed offline gets Download's words at once and leaves no error badge, disabled Stop buttons are grey and the
Modelfile shows no line numbers drifting away from its lines.

The runs these tabs list are written as the jobs leave them (a finished run, a stopped one with a checkpoint, an
export's report): nothing is trained here, so the module stays under a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_ui_browser import (
    DEMO_LABEL,
    browser,  # noqa: F401 (the module's chromium, as a fixture here)
    choose,
    open_tab,
    serve_app,
    type_into,
    wait_text,
)

import jobs
import runfolder
from train_config import TrainConfig
from workspace import config_to_dict

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_model):
    workspace = tmp_path_factory.mktemp("newcomer-workspace")
    (workspace / "models").mkdir()
    (workspace / "models" / demo_model.name).symlink_to(demo_model)
    yield from serve_app(workspace, {"HF_HUB_OFFLINE": "1"})


@pytest.fixture
def page(browser, app):  # noqa: F811 (the imported fixture)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app.url)
    page.wait_for_selector("#tab-model-button")
    yield page
    context.close()


def train_run(workspace: Path, name: str, state: str) -> Path:
    run_dir = jobs.create_run("train", config_to_dict(TrainConfig()), workspace, name)
    runfolder.write_status(run_dir, state=state)
    return run_dir


def visible(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").is_visible()


def error_badges(page, elem_id: str) -> int:
    """Gradio's status tracker marks an output whose event failed with an 'Error' badge."""
    return page.locator(f"#{elem_id} .error").count()


# ---------------------------------------------------------------- tests


def test_a_reload_keeps_the_form_and_the_stage_shows_its_own_fields(page, app):
    open_tab(page, "train")
    wait_text(page, "train-uses", "no dataset chosen yet")
    type_into(page, "train-max-steps", 7)
    page.click("text=Stage: SFT")
    page.wait_for_selector("#train-stage", state="visible")
    assert not visible(page, "train-beta") and not visible(page, "train-judge-model")  # SFT has no own fields
    choose(page, "train-stage", "dpo")
    page.wait_for_selector("#train-beta", state="visible")
    assert not visible(page, "train-judge-model")  # GRPO's judge is not DPO's
    open_tab(page, "dataset")
    type_into(page, "dataset-source", "uploads/support.csv")
    page.keyboard.press("Tab")
    open_tab(page, "train")
    wait_text(page, "train-uses", "uploads/support.csv")
    wait_text(page, "train-uses", "DPO, 7 steps")
    page.wait_for_timeout(1500)  # the browser stores the form after its change events

    page.reload()
    page.wait_for_selector("#tab-model-button")
    open_tab(page, "train")
    wait_text(page, "train-uses", "uploads/support.csv", timeout=30_000)  # backticks render as code: no "`"
    wait_text(page, "train-uses", "DPO, 7 steps")
    assert page.input_value("#train-max-steps input") == "7"
    page.click("text=Stage: SFT")
    page.wait_for_selector("#train-beta", state="visible")
    assert not visible(page, "train-judge-model")


def test_refresh_runs_lists_a_new_gguf_and_a_stopped_runs_checkpoint(page, app):
    done = train_run(app.workspace, "finished", "done")
    open_tab(page, "test")
    page.wait_for_function("() => document.querySelector('#test-run input')?.value === 'finished'", timeout=30_000)
    (done / "gguf").mkdir()
    (done / "gguf" / "finished-q8_0.gguf").write_bytes(b"GGUF")
    stopped = train_run(app.workspace, "halfway", "stopped")
    checkpoint = stopped / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "adapter_config.json").write_text('{"base_model_name_or_path": "demo"}')
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")

    page.click("text=Refresh runs")
    page.click("#test-weights input")
    page.wait_for_selector("#test-weights li[role=option][aria-label='GGUF: finished-q8_0.gguf']", timeout=30_000)
    page.keyboard.press("Escape")
    page.click("#test-run input")
    page.wait_for_selector("#test-run li[role=option][aria-label='halfway (stopped: checkpoint-2)']")
    page.keyboard.press("Escape")


def test_a_hub_id_typed_offline_says_what_download_says_and_leaves_no_badge(page):
    wait_text(page, "model-memory", "Memory estimate:")
    type_into(page, "model-name", "someone/not-downloaded")
    page.keyboard.press("Enter")
    # At once (no ~40 s of retries), in Download's words: the demo model's figure is gone.
    wait_text(page, "model-memory", "HF_HUB_OFFLINE=1 keeps this app off the Hub", timeout=15_000)
    assert "Memory estimate:" not in page.inner_text("#model-memory")
    page.click("#model-check")
    wait_text(page, "model-info", "Cannot check this model")
    page.click("#model-download")
    page.wait_for_selector(".toast-body:has-text('HF_HUB_OFFLINE=1 keeps this app off the Hub')")
    choose(page, "model-name", DEMO_LABEL)
    wait_text(page, "model-memory", "Memory estimate:")
    assert page.inner_text("#model-info").strip() == ""
    assert error_badges(page, "model-memory") == 0 and error_badges(page, "model-info") == 0


def test_a_disabled_stop_button_is_grey_not_red(page):
    open_tab(page, "train")
    page.wait_for_selector("#train-stop:disabled")
    red, green, blue = page.evaluate(
        "() => getComputedStyle(document.querySelector('#train-stop')).backgroundColor.match(/\\d+/g).map(Number)"
    )
    assert not (red > 180 and green < 120 and blue < 120), (red, green, blue)


def test_the_modelfile_shows_no_drifting_line_numbers(page, app):
    run_dir = train_run(app.workspace, "exported", "done")
    gguf = run_dir / "gguf"
    gguf.mkdir()
    (gguf / "exported-q8_0.gguf").write_bytes(b"GGUF")
    modelfile = 'FROM ./exported-q8_0.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop <|im_end|>\n'
    modelfile += "PARAMETER temperature 0.7\nPARAMETER top_p 0.9\nPARAMETER num_ctx 4096\n"
    (gguf / "Modelfile").write_text(modelfile)
    report = {
        "files": [
            {"file": "exported-q8_0.gguf", "size_bytes": 4, "agreement": 0.97, "tokenizer_match": 1.0, "export_s": 1}
        ],
        "check": {"prompts": 4, "tokens_per_prompt": 16},
        "times_s": {"total": 1},
    }
    (gguf / "report.json").write_text(json.dumps(report))
    open_tab(page, "export")
    choose(page, "export-run", "exported")
    page.wait_for_selector("#export-modelfile .cm-line")
    wait_text(page, "export-modelfile", "PARAMETER num_ctx 4096")
    # No gutter of numbers beside the lines: CodeMirror sized it while the tab was hidden (14 px rows beside 16.8 px
    # lines, drifting a little more on each line).
    assert page.locator("#export-modelfile .cm-lineNumbers").count() == 0
