"""The endpoint's process (`main.py serve RUN`): llama-cpp-python's OpenAI-compatible app over the run's GGUF, or
a small FastAPI app of our own over its transformers model (/v1/models, /v1/chat/completions streamed or not, the
run's chat template). serving.py finds, starts and stops it."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

# FastAPI reads a handler's annotations from this module's globals (they are strings here): Request must be one.
from fastapi import Request

from serving import AUTO, ENDPOINT_FILE, Endpoint, check_key, check_port, model_to_serve
from workspace import UserError, read_json, write_json

log = logging.getLogger(__name__)


def serve_forever(
    run: str | Path,
    workspace: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str = "",
    weights: str = AUTO,
) -> None:
    """Serve the run until interrupted (SIGTERM or Ctrl+C); endpoint.json names it meanwhile."""
    import uvicorn

    run_dir, gguf_path = model_to_serve(run, workspace, weights)
    check_key(host, api_key, shared=False)
    check_port(host, port)
    model_id = run_dir.name
    if gguf_path is not None:
        app, backend = _llama_app(gguf_path, model_id, api_key), "llama.cpp"
    else:
        app, backend = _transformers_app(run_dir, model_id, api_key, workspace), "transformers"
    shown = f"[{host}]" if ":" in host else host
    endpoint = Endpoint(str(run_dir), f"http://{shown}:{port}/v1", model_id, backend, os.getpid(), bool(api_key))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        write_json(run_dir / ENDPOINT_FILE, asdict(endpoint))  # only once it accepts connections
        log.info("serving %s (%s) at %s", model_id, backend, endpoint.base_url)

    server.startup = startup
    try:
        server.run()
    finally:
        if (read_json(run_dir / ENDPOINT_FILE, None) or {}).get("pid") == os.getpid():
            (run_dir / ENDPOINT_FILE).unlink(missing_ok=True)


def _llama_app(gguf_path: Path, model_id: str, api_key: str):
    """llama-cpp-python's own OpenAI-compatible app over the GGUF (its chat template from the file's metadata)."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    return create_app(
        server_settings=ServerSettings(api_key=api_key or None),
        model_settings=[
            ModelSettings(model=str(gguf_path), model_alias=model_id, n_ctx=0, logits_all=False, verbose=False)
        ],
    )


def _transformers_app(run_dir: Path, model_id: str, api_key: str, workspace: str | Path | None):
    """/v1/models and /v1/chat/completions (streamed or not) over the run's model, with its chat template."""
    import threading

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    import inference_utils

    chat_model = inference_utils.load_chat_model(None, str(run_dir), workspace)
    turns = threading.Lock()  # one generation at a time: the model is shared
    app = FastAPI(title=f"{model_id} (OpenAI-compatible)")

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if api_key and not secrets.compare_digest(given, api_key):
            return JSONResponse(_error("Invalid API key.", "invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.json()
        try:
            messages, config = _chat_request(body)
        except UserError as exc:
            return JSONResponse(_error(str(exc), "invalid_request_error"), status_code=400)
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def deltas() -> Iterator[str]:
            with turns:
                yield from inference_utils.chat_deltas(chat_model, messages, config)

        if body.get("stream"):
            return StreamingResponse(_sse(deltas(), completion_id, created, model_id), media_type="text/event-stream")
        text = "".join(deltas())
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }

    return app


def _chat_request(body: dict[str, Any]):
    """(messages, GenerationConfig) of an OpenAI chat request; UserError for what the model cannot take."""
    from inference_utils import GenerationConfig

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {role, content} objects.")
    plain = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # the content-parts form: its text parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str) or message.get("role") not in ("system", "user", "assistant"):
            raise UserError("Each message needs a role (system, user or assistant) and text content.")
        plain.append({"role": message["role"], "content": content})
    # OpenAI's defaults where the request leaves a value out (null included): temperature 1, top_p 1.
    values = {
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_new_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
    }
    try:
        config = GenerationConfig(
            temperature=float(1.0 if values["temperature"] is None else values["temperature"]),
            top_p=float(1.0 if values["top_p"] is None else values["top_p"]),
            max_new_tokens=int(values["max_new_tokens"] or GenerationConfig.max_new_tokens),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"temperature, top_p and max_tokens must be numbers ({exc}).") from exc
    config.validate()
    return plain, config


def _sse(deltas: Iterator[str], completion_id: str, created: int, model_id: str) -> Iterator[str]:
    """The reply as OpenAI's server-sent chunks: the role, the text pieces, the finish reason, [DONE]."""

    def chunk(delta: dict[str, str], finish: str | None = None) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in deltas:
        if piece:
            yield chunk({"content": piece})
    yield chunk({}, "stop")
    yield "data: [DONE]\n\n"


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "code": code}}
