"""Test tab → Serve: the chosen run as an OpenAI-compatible endpoint (its GGUF through llama.cpp's server, or its
transformers model), with the base URL and copyable curl / openai snippets. The endpoint runs in a process of its
own that ends with the app; a key is required when the app is shared or the endpoint is bound beyond loopback."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

import serving
from ui.common import guarded
from workspace import CONFINE_ENV, UserError


@dataclass
class ServePanel:
    host: gr.Textbox
    port: gr.Number
    api_key: gr.Textbox
    start: gr.Button
    stop: gr.Button
    status: gr.Markdown
    curl: gr.Code
    python: gr.Code


def build() -> ServePanel:
    gr.Markdown(
        "Call the chosen run from your own code through an OpenAI-compatible API (`/v1/chat/completions`, "
        "streaming too). The chosen weights are served: an exported GGUF through llama-cpp-python's server, or the "
        "PyTorch weights with the run's chat template. The endpoint stops with the app."
    )
    with gr.Row(equal_height=True):
        host = gr.Textbox(
            value="127.0.0.1", label="Host", info="127.0.0.1: this machine only; 0.0.0.0 needs a key.", scale=2
        )
        port = gr.Number(value=serving.DEFAULT_PORT, label="Port", precision=0, minimum=1, maximum=65535, scale=1)
        api_key = gr.Textbox(
            label="API key",
            type="password",
            info="Clients send it as a Bearer token; required when the app is shared.",
            scale=2,
            elem_id="serve-api-key",
        )
        start = gr.Button("Start endpoint", variant="primary", scale=1, elem_id="serve-start")
        stop = gr.Button("Stop endpoint", variant="stop", scale=1, elem_id="serve-stop")
    status = gr.Markdown(elem_id="serve-status")
    with gr.Row():
        curl = gr.Code(label="curl", language="shell", interactive=False, elem_id="serve-curl")
        python = gr.Code(label="Python (openai)", language="python", interactive=False, elem_id="serve-python")
    return ServePanel(host, port, api_key, start, stop, status, curl, python)


def wire(panel: ServePanel, run: gr.Dropdown, weights: gr.Dropdown, workspace: Path) -> None:
    outputs = [panel.status, panel.curl, panel.python]

    @guarded
    def start(run_name: str, weights_name: str, host: str, port: float, api_key: str):
        if not run_name:
            raise UserError("Choose a training run to serve (the base model alone is not served here).")
        if port is None:
            raise UserError("Type the port to serve on (1 to 65535).")
        endpoint = serving.start_endpoint(
            run_name,
            workspace,
            host=(host or "127.0.0.1").strip(),
            port=int(port),
            api_key=api_key or "",
            shared=bool(os.environ.get(CONFINE_ENV)),
            weights=weights_name or serving.TRANSFORMERS,
        )
        return endpoint_view(endpoint)

    @guarded
    def stop(run_name: str):
        if not run_name:
            return "", "", ""
        stopped = serving.stop_endpoint(serving.model_to_serve(run_name, workspace, serving.TRANSFORMERS)[0])
        return ("Endpoint stopped." if stopped else "No endpoint was running for this run."), "", ""

    def shown(run_name: str):
        """The run's running endpoint, if any (e.g. started before a page reload, or from the CLI)."""
        try:
            endpoint = serving.running_endpoint(serving.model_to_serve(run_name, workspace, serving.TRANSFORMERS)[0])
        except UserError:
            endpoint = None
        return endpoint_view(endpoint) if endpoint else ("", "", "")

    inputs = [run, weights, panel.host, panel.port, panel.api_key]
    panel.start.click(start, inputs=inputs, outputs=outputs)
    panel.stop.click(stop, inputs=run, outputs=outputs)
    run.change(shown, inputs=run, outputs=outputs, show_progress="hidden")


def endpoint_view(endpoint: serving.Endpoint) -> tuple[str, str, str]:
    curl, python = serving.snippets(endpoint)
    key = "an API key (Bearer)" if endpoint.key_required else "no key"
    status = (
        f"Serving **{endpoint.model}** ({endpoint.backend}) at `{endpoint.base_url}` with {key}; model id "
        f"`{endpoint.model}`."
    )
    return status, curl, python
