"""A small local HTTP server speaking the wire protocols the official LLM SDKs use, with injectable faults.

One server answers all three protocols:
- OpenAI: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}
- Anthropic: POST /v1/messages, GET /v1/models, GET /v1/models/{id} (told apart by the `anthropic-version` header),
  with Anthropic's error bodies ({"type": "error", "error": {"type": "rate_limit_error", ...}})
- Ollama: POST /api/chat, POST /api/show, GET /api/tags; and, as Ollama's API documents them, HEAD / POST
  /api/blobs/sha256:<digest> (201 on upload, 400 when the body's digest differs, HEAD 200 / 404) and POST /api/create
  ({"model", "files", "adapters", "template", "parameters", "stream"}; streamed status lines ending in "success").
  A model created that way answers POST /api/chat and /api/generate by running its GGUF (+ adapter) in llama.cpp
  (llama-cpp-python), so a reply proves the uploaded file loads and generates. It renders prompts with the GGUF's own
  chat template, not the TEMPLATE Go text (no Go here); the stop tokens and options are applied.

Faults are queued and consumed one per chat request: 429 with Retry-After, 500, 529, dropped connections, slow
replies and malformed JSON, and the broken servers a client must survive: a body trickled byte by byte, an endless
body, a huge error message, a 200 carrying an HTML page, a cut-off JSON body or JSON of another shape. A whole server
can also be a web page (every route answers HTML), echo a wrong key in its 401, or redirect every request elsewhere.
Tests and bench/synth_bench.py use it; uploaded blobs live in a temporary folder removed by stop().
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

WORDS = (
    "apple river stone cloud garden lamp copper violin meadow harbor pencil glacier lantern orbit pepper saddle "
    "timber velvet walnut yonder anchor bishop canyon dolphin ember falcon gravel hollow island jasmine kettle "
    "ladder marble nectar oyster pillow quartz raven silver thistle umbrella vessel willow zephyr acorn basket "
    "candle desert engine feather goblet hazel ivory jacket kernel lemon mirror needle orchid puzzle quiver "
    "ribbon saffron tunnel uniform valley wagon yarrow zinc amber beacon cedar drum elbow fossil ginger helmet "
    "iris jungle kiosk lotus magnet nickel olive parrot quill rocket spruce tiger urchin vapor whistle yeast"
).split()

JSON = "application/json"
NDJSON = "application/x-ndjson"
DIGEST = re.compile(r"^/api/blobs/(sha256[:-][0-9a-f]{64})$")
HTML_PAGE = (
    b"<!doctype html><html><head><title>Open WebUI</title></head><body><div id='app'>Loading...</div>"
    b"<script src='/static/app.js'></script></body></html>"
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Fault:
    """One injected misbehaviour: "429", "500", "529", "drop" (close without replying), "slow", "malformed"; and
    "trickle" (a good reply, one byte every `seconds`), "endless" (a 200 whose body does not end before `size` bytes,
    1 GiB by default), "huge_error" (a `status` reply whose message has `size` characters), "html" (200 with a web
    page), "truncated" (200, JSON cut off in the middle), "wrong_shape" (200, valid JSON that is no chat reply)."""

    kind: str
    retry_after: float | None = None  # seconds, sent as Retry-After with 429 / 529
    seconds: float = 0.0  # how long a "slow" reply waits before answering; a "trickle" pause between bytes
    size: int = 0  # characters of a "huge_error" message; bytes of an "endless" body
    status: int = 400  # the status of a "huge_error"


class FakeLLMServer:
    """Threaded HTTP server on 127.0.0.1; use as a context manager or call start() / stop()."""

    def __init__(
        self,
        models: tuple[str, ...] = ("fake-model",),
        latency_s: float = 0.0,
        api_key: str | None = None,
        reply: Callable[[str, int], str] | None = None,
        always_malformed: bool = False,
        port: int = 0,
        faults: list[dict] | None = None,
        html_pages: bool = False,
        echo_key: bool = False,
        redirect_to: str | None = None,
    ) -> None:
        self.models = models
        self.latency_s = latency_s  # fixed delay before every chat reply
        self.api_key = api_key  # when set, requests must carry it (Bearer / x-api-key) or get a 401
        self.reply = reply  # (prompt, request number) -> reply text; default: a fresh random row for the task asked
        self.always_malformed = always_malformed
        self.seed = random.randrange(2**32)  # rows differ between servers, so a restarted server makes no duplicates
        self.faults: deque[Fault] = deque(Fault(**fault) for fault in faults or ())
        self.html_pages = html_pages  # every route answers 200 with a web page, as a web UI at the wrong URL does
        self.echo_key = echo_key  # a 401 quotes the key it was sent, as some providers' error messages do
        self.redirect_to = redirect_to  # every request answered 307 to this origin (+ the same path)
        self.requests = 0  # every request, chat or not
        self.prompts: list[str] = []
        self.bodies: list[dict] = []  # every chat request's JSON body, as the SDK sent it
        self.statuses: list[int] = []
        self.chat_requests = 0
        self.lock = threading.Lock()
        self.port = port  # 0: any free port
        self.httpd: ThreadingHTTPServer | None = None
        self.blob_dir: Path | None = None  # uploaded blobs, by digest (made on the first upload)
        self.created: dict[str, dict] = {}  # model name -> its /api/create request
        self.llamas: dict[str, Any] = {}  # model name -> its loaded llama_cpp.Llama
        self.created_prompts: list[str] = []  # the user messages / prompts put to created models
        self.llama_lock = threading.Lock()  # one generation at a time: a Llama is not thread-safe

    @property
    def url(self) -> str:
        assert self.httpd is not None, "start the server first"
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def start(self) -> FakeLLMServer:
        server = self

        class Handler(_Handler):
            fake = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        # A short poll interval: stop() waits for the serving loop to notice, once per test.
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        with self.llama_lock:
            for llm in self.llamas.values():
                llm.close()
            self.llamas.clear()
        if self.blob_dir is not None:
            shutil.rmtree(self.blob_dir, ignore_errors=True)
            self.blob_dir = None

    def blob_path(self, digest: str) -> Path:
        if self.blob_dir is None:
            self.blob_dir = Path(tempfile.mkdtemp(prefix="fake-ollama-blobs-"))
        return self.blob_dir / digest.replace(":", "-")

    def llama(self, name: str):
        """The created model `name` loaded in llama.cpp (its GGUF, with its adapter when it has one); call with
        llama_lock held."""
        if name not in self.llamas:
            import llama_cpp

            request = self.created[name]
            (model_digest,) = request["files"].values()
            adapters = list((request.get("adapters") or {}).values())
            num_ctx = int((request.get("parameters") or {}).get("num_ctx") or 2048)
            self.llamas[name] = llama_cpp.Llama(
                str(self.blob_path(model_digest)),
                lora_path=str(self.blob_path(adapters[0])) if adapters else None,
                n_ctx=min(num_ctx, 2048),
                n_threads=1,
                verbose=False,
            )
        return self.llamas[name]

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _next(self, prompt: str, body: dict) -> tuple[int, Fault | None]:
        with self.lock:
            self.chat_requests += 1
            self.prompts.append(prompt)
            self.bodies.append(body)
            return self.chat_requests, self.faults.popleft() if self.faults else None


def random_row(prompt: str, rng: random.Random) -> str:
    """A unique, well-formed reply in the JSON shape the prompt asks for."""

    def sentence(count: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(count)).capitalize() + "."

    if '"messages"' in prompt:
        match = re.search(r"(\d+) user turns?", prompt)
        turns = int(match.group(1)) if match else 2
        messages = []
        for _ in range(turns):
            messages += [{"role": "user", "content": sentence(8)}, {"role": "assistant", "content": sentence(16)}]
        return json.dumps({"messages": messages})
    if '"question"' in prompt:
        return json.dumps({"question": sentence(8)[:-1] + "?", "answer": sentence(20)})
    return json.dumps({"instruction": sentence(8), "response": sentence(20)})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do: the SDKs pool connections
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms to every reply.
    disable_nagle_algorithm = True
    fake: FakeLLMServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ------------------------------------------------------------ routing

    def do_GET(self) -> None:
        if self._answered_elsewhere() or not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            if self._anthropic():
                data = [self._anthropic_model(name) for name in self.fake.models]
                self._json(200, {"data": data, "has_more": False, "first_id": None, "last_id": None})
            else:
                self._json(200, {"object": "list", "data": [self._openai_model(name) for name in self.fake.models]})
        elif self.path.startswith("/v1/models/"):
            name = self.path[len("/v1/models/") :]
            if name not in self.fake.models:
                self._error(404, f"model: {name}" if self._anthropic() else f"The model '{name}' does not exist")
            else:
                self._json(200, self._anthropic_model(name) if self._anthropic() else self._openai_model(name))
        elif self.path == "/api/tags":
            self._json(
                200,
                {
                    "models": [
                        {"name": name, "model": name, "size": 1, "digest": "0" * 12}
                        for name in (*self.fake.models, *self.fake.created)
                    ]
                },
            )
        else:
            self._error(404, f"no route {self.path}")

    def do_HEAD(self) -> None:
        """HEAD /api/blobs/:digest: 200 when the server has the blob, else 404 (no body either way)."""
        match = DIGEST.match(self.path)
        found = match is not None and self.fake.blob_path(match.group(1)).exists()
        self._send(200 if found else 404, b"", JSON)

    def do_POST(self) -> None:
        if self.path.startswith("/api/blobs/"):
            if not self._answered_elsewhere():
                self._upload_blob()
            return
        body = self._body()
        if body is None or self._answered_elsewhere() or not self._authorized():
            return
        if self.path == "/api/create":
            self._create(body)
            return
        model = body.get("model")
        if self.path in ("/api/chat", "/api/generate") and model in self.fake.created:
            self._run_created(body)
            return
        if self.path == "/api/show":
            name = body.get("model") or body.get("name")
            if name not in self.fake.models:
                self._error(404, f"model '{name}' not found")
            else:
                self._json(
                    200,
                    {
                        "modelfile": "",
                        "parameters": "",
                        "template": "{{ .Prompt }}",
                        "details": {"format": "gguf", "family": "fake"},
                        "model_info": {},
                    },
                )
            return
        if self.path not in ("/v1/chat/completions", "/v1/messages", "/api/chat"):
            self._error(404, f"no route {self.path}")
            return
        if body.get("model") not in self.fake.models:
            name = body.get("model")
            self._error(404, f"model '{name}' not found" if self.path == "/api/chat" else f"model: {name}")
            return
        self._chat(body)

    # ------------------------------------------------------------ chat

    def _chat(self, body: dict) -> None:
        prompt = "\n".join(
            _text(message.get("content")) for message in body.get("messages", []) if message.get("role") == "user"
        )
        number, fault = self.fake._next(prompt, body)
        if self.fake.latency_s:
            time.sleep(self.fake.latency_s)
        if fault is not None:
            if fault.kind == "drop":
                self.close_connection = True  # no status line at all: the client sees a dropped connection
                return
            if fault.kind == "slow":
                time.sleep(fault.seconds)
            elif fault.kind == "huge_error":
                self._error(fault.status, "Bad request: " + "x" * fault.size)
                return
            elif fault.kind == "endless":
                self._endless(fault.size or 2**30)
                return
            elif fault.kind in ("html", "truncated", "wrong_shape"):
                self._broken_200(fault.kind)
                return
            elif fault.kind in ("429", "500", "529"):
                status = int(fault.kind)
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                self._error(status, f"injected {status}", headers)
                return
        if self.fake.always_malformed or (fault is not None and fault.kind == "malformed"):
            text = 'Sure! Here is your row: {"instruction": "unterminated'
        elif self.fake.reply is not None:
            text = self.fake.reply(prompt, number)
        else:
            text = random_row(prompt, random.Random(f"{self.fake.seed}-{number}"))
        tokens_in, tokens_out = len(prompt.split()), len(text.split())
        trickle_s = fault.seconds if fault is not None and fault.kind == "trickle" else 0.0
        if self.path == "/v1/chat/completions":
            self._json(
                200,
                {
                    "id": f"chatcmpl-{number}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": tokens_in,
                        "completion_tokens": tokens_out,
                        "total_tokens": tokens_in + tokens_out,
                    },
                },
                trickle_s=trickle_s,
            )
        elif self.path == "/v1/messages":
            self._json(
                200,
                {
                    "id": f"msg_{number:08d}",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
                },
                trickle_s=trickle_s,
            )
        else:
            self._json(
                200,
                {
                    "model": body["model"],
                    "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": text},
                    "done": True,
                    "done_reason": "stop",
                    "total_duration": 1,
                    "load_duration": 1,
                    "prompt_eval_count": tokens_in,
                    "prompt_eval_duration": 1,
                    "eval_count": tokens_out,
                    "eval_duration": 1,
                },
                trickle_s=trickle_s,
            )

    # ------------------------------------------------------------ Ollama's model creation

    def _upload_blob(self) -> None:
        """POST /api/blobs/:digest with the file as the body: 201 Created, or 400 when its SHA-256 differs."""
        match = DIGEST.match(self.path)
        if match is None:
            self._error(400, "invalid digest format")
            return
        digest = match.group(1).replace("-", ":", 1)
        target = self.fake.blob_path(digest)
        partial = target.with_suffix(f".partial-{threading.get_ident()}")
        sha = hashlib.sha256()
        with open(partial, "wb") as out:
            for chunk in self._raw_body():
                sha.update(chunk)
                out.write(chunk)
        if f"sha256:{sha.hexdigest()}" != digest:
            partial.unlink()
            self._error(400, "digest mismatch")
            return
        partial.replace(target)
        self._send(201, b"", JSON)

    def _raw_body(self):
        """The request body in chunks, sized by Content-Length or sent chunked (httpx streams a file either way)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _create(self, body: dict) -> None:
        """POST /api/create from uploaded blobs: `files` holds one GGUF, `adapters` at most one LoRA GGUF."""
        name, files, adapters = body.get("model"), body.get("files") or {}, body.get("adapters") or {}
        if not name:
            self._error(400, "model is required")
            return
        if len(files) != 1:
            self._error(400, "this server creates models from exactly one GGUF in files")
            return
        for digest in (*files.values(), *adapters.values()):
            path = self.fake.blob_path(str(digest))
            if not path.exists():
                self._error(400, f"blob {digest} not found; upload it with POST /api/blobs/{digest} first")
                return
            with open(path, "rb") as handle:
                if handle.read(4) != b"GGUF":
                    self._error(400, f"blob {digest} is not a GGUF file")
                    return
        with self.fake.llama_lock:
            old = self.fake.llamas.pop(name, None)
            if old is not None:
                old.close()
            self.fake.created[name] = body
        statuses = [{"status": "parsing GGUF"}]
        statuses += [{"status": f"using existing layer {digest}"} for digest in (*files.values(), *adapters.values())]
        statuses += [{"status": "writing manifest"}, {"status": "success"}]
        if body.get("stream", True):
            self._send(200, b"".join(json.dumps(status).encode() + b"\n" for status in statuses), NDJSON)
        else:
            self._json(200, statuses[-1])

    def _run_created(self, body: dict) -> None:
        """/api/chat or /api/generate for a created model: generate with llama.cpp, the request's options over the
        model's parameters."""
        name = body["model"]
        request = self.fake.created[name]
        settings = {**(request.get("parameters") or {}), **(body.get("options") or {})}
        stop = settings.get("stop") or []
        arguments = {
            "max_tokens": int(settings.get("num_predict") or 128),
            "temperature": float(settings.get("temperature", 0.8)),
            "top_p": float(settings.get("top_p", 0.9)),
            "stop": [stop] if isinstance(stop, str) else list(stop),
        }
        started = time.monotonic_ns()
        with self.fake.llama_lock:
            llm = self.fake.llama(name)
            if self.path == "/api/chat":
                messages = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body["messages"]]
                self.fake.created_prompts.append(messages[-1]["content"])
                out = llm.create_chat_completion(messages, **arguments)
                text = out["choices"][0]["message"]["content"] or ""
            else:
                self.fake.created_prompts.append(body.get("prompt", ""))
                out = llm.create_completion(body.get("prompt", ""), **arguments)
                text = out["choices"][0]["text"]
        usage = out["usage"]
        reply = {
            "model": name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "done": True,
            "done_reason": "length" if out["choices"][0]["finish_reason"] == "length" else "stop",
            "total_duration": time.monotonic_ns() - started,
            "prompt_eval_count": usage["prompt_tokens"],
            "eval_count": usage["completion_tokens"],
        }
        key = "message" if self.path == "/api/chat" else "response"
        content: Any = {"role": "assistant", "content": text} if key == "message" else text
        if body.get("stream", True):
            # One content chunk, then the final chunk with the counts, as Ollama streams them.
            empty: Any = {"role": "assistant", "content": ""} if key == "message" else ""
            first = {"model": name, "created_at": reply["created_at"], key: content, "done": False}
            lines = [first, {**reply, key: empty}]
            self._send(200, b"".join(json.dumps(line).encode() + b"\n" for line in lines), NDJSON)
        else:
            self._json(200, {**reply, key: content})

    # ------------------------------------------------------------ broken replies

    def _answered_elsewhere(self) -> bool:
        """Answer a request a web page or a redirect when the whole server is set to; True when answered."""
        with self.fake.lock:
            self.fake.requests += 1
        if self.fake.redirect_to:
            self._send(307, b"", "text/plain", {"Location": self.fake.redirect_to.rstrip("/") + self.path})
            return True
        if self.fake.html_pages:
            self._send(200, HTML_PAGE, "text/html; charset=utf-8")
            return True
        return False

    def _broken_200(self, kind: str) -> None:
        if kind == "html":
            self._send(200, HTML_PAGE, "text/html; charset=utf-8")
        elif kind == "truncated":
            self._send(200, b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "mess', JSON)
        else:
            self._send(200, b'{"status": "ok", "result": [1, 2, 3]}', JSON)

    def _endless(self, size: int) -> None:
        """A 200 JSON reply whose body goes on until the client hangs up, `size` bytes are sent or a minute passes."""
        self.close_connection = True
        chunk = b"[" * 65536
        try:
            self.send_response(200)
            self.send_header("Content-Type", JSON)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            deadline = time.monotonic() + 60
            for _ in range(0, size, len(chunk)):
                if time.monotonic() > deadline:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ------------------------------------------------------------ helpers

    def _anthropic(self) -> bool:
        return "anthropic-version" in self.headers or self.path == "/v1/messages"

    def _ollama(self) -> bool:
        return self.path.startswith("/api/")

    def _authorized(self) -> bool:
        key = self.fake.api_key
        if key is None or self._ollama():
            return True
        # Anthropic's SDK sends x-api-key or, in recent versions, a Bearer token; OpenAI's a Bearer token.
        bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if bearer == key or (self._anthropic() and self.headers.get("x-api-key") == key):
            return True
        message = "invalid x-api-key" if self._anthropic() else "Incorrect API key provided."
        if self.fake.echo_key:
            message += f" You passed: {bearer or self.headers.get('x-api-key', '')}"
        self._error(401, message)
        return False

    def _body(self) -> dict | None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._error(400, "request body is not JSON")
            return None
        return body if isinstance(body, dict) else {}

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        if self._ollama():
            body: dict = {"error": message}
        elif self._anthropic():
            body = {
                "type": "error",
                "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
                "request_id": "req_fake",
            }
        else:
            body = {
                "error": {
                    "message": message,
                    "type": ERROR_TYPES.get(status, "server_error"),
                    "param": None,
                    "code": None,
                }
            }
        self._json(status, body, headers)

    def _json(self, status: int, body: dict, headers: dict[str, str] | None = None, trickle_s: float = 0.0) -> None:
        self._send(status, json.dumps(body).encode(), JSON, headers, trickle_s)

    def _send(
        self,
        status: int,
        data: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        trickle_s: float = 0.0,
    ) -> None:
        with self.fake.lock:
            self.fake.statuses.append(status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if trickle_s:
                for index in range(len(data)):  # each byte arrives well within any read timeout
                    self.wfile.write(data[index : index + 1])
                    time.sleep(trickle_s)
            else:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout) before the reply

    @staticmethod
    def _openai_model(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "fake"}

    @staticmethod
    def _anthropic_model(name: str) -> dict:
        return {"type": "model", "id": name, "display_name": name, "created_at": "2025-01-01T00:00:00Z"}


def _text(content: Any) -> str:
    """Message content as text: a string (OpenAI, Ollama) or a list of content blocks (Anthropic)."""
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return str(content or "")


def main() -> None:
    """Serve until killed, printing the base URL first (bench/synth_bench.py runs it in its own process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, default=0.0, help="fixed delay before every chat reply")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    args = parser.parse_args()
    server = FakeLLMServer(latency_s=args.latency_s, port=args.port).start()
    print(server.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
