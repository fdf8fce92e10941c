"""A user's chat template rendered in a child process with a time limit, a memory cap and an output cap.

A Jinja template is a program: `{{ 'x' * 10000000000 }}` asks for 10 GB at once and two nested loops run for hours,
and neither can be interrupted inside the process that renders it. So a template typed by a user (the Dataset tab's
chat_template, `main.py dataset --chat-template`, a run's dataset settings) is rendered by a short-lived Python child
that imports only transformers' own template renderer: the web server never runs it, a render that outlives
RENDER_TIMEOUT_S kills the child, and the child's address space is capped at MEMORY_CAP_BYTES. One child per template
serves every render of a preparation (a pipe round trip per conversation); a template that hit a limit is refused at
once afterwards, so a dataset of many rows does not wait for each one.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from workspace import UserError

ROOT = Path(__file__).resolve().parent
RENDER_TIMEOUT_S = 10.0  # one conversation; a real template renders one in milliseconds
STARTUP_TIMEOUT_S = 120.0  # the child's import of the renderer, on a loaded machine
MEMORY_CAP_BYTES = 1 << 30  # the child's whole address space (about 0.2 GiB of it is Python and the renderer)
CPU_CAP_S = 3600  # a child whose parent died mid-render ends by this much CPU time
MAX_RENDERED_CHARS = 1 << 22  # one rendered conversation (4 Mi characters: far beyond any max_seq_length)
KEPT_CHILDREN = 2  # children kept for further renders; older ones are ended
REFUSED_FOR_S = 60.0  # a template that hit a limit is refused at once for this long (the rest of a preparation)


class TemplateError(Exception):
    """The template raised while rendering (a Jinja error, raise_exception): as transformers' own render would."""


class TemplateLimitError(UserError):
    """The template ran past a limit (time, memory, output size): a user must change it."""


_FIX = "Fix the chat template or choose a built-in one (e.g. chatml)."


class TemplateSandbox:
    """One child process rendering one template with a tokenizer's special tokens (bos_token, eos_token, ...)."""

    def __init__(self, template: str, tokens: dict[str, Any]) -> None:
        self.template, self.tokens = template, tokens
        self.lock = threading.Lock()  # the UI's handlers run in threads; one request at a time per child
        self.buffer = b""
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import template_sandbox; template_sandbox.serve()"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        ready = self._reply(STARTUP_TIMEOUT_S, "start")
        if ready.get("ready") is not True:
            self.close()
            raise TemplateLimitError("The chat template renderer could not start; try again.")

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        request = {
            "template": self.template,
            "tokens": self.tokens,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        with self.lock:
            try:
                self.process.stdin.write(json.dumps(request).encode("ascii") + b"\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                raise TemplateLimitError(f"The chat template renderer ended unexpectedly. {_FIX}") from None
            reply = self._reply(RENDER_TIMEOUT_S, "render")
        if "text" in reply:
            return reply["text"]
        if "limit" in reply:
            raise TemplateLimitError(f"The chat template {reply['limit']}. {_FIX}")
        raise TemplateError(reply.get("error", "unknown error"))

    def _reply(self, timeout: float, what: str) -> dict[str, Any]:
        """The child's next JSON line, or TemplateLimitError (the child killed) when none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        stdout = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            readable = select.select([stdout], [], [], max(0.0, remaining))[0] if remaining > 0 else []
            if not readable:
                self.close()
                if what == "start":
                    raise TemplateLimitError("The chat template renderer did not start in time; try again.")
                raise TemplateLimitError(
                    f"The chat template took more than {RENDER_TIMEOUT_S:g} s to render one conversation (a loop "
                    f"that does not end?). {_FIX}"
                )
            chunk = os.read(stdout, 1 << 20)
            if not chunk:
                self.close()
                raise TemplateLimitError(
                    f"The chat template renderer ended while rendering (more than {MEMORY_CAP_BYTES >> 20} MiB of "
                    f"memory?). {_FIX}"
                )
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


# (process id, template, special tokens) -> its child: a forked worker (datasets' num_proc) starts its own.
_children: dict[tuple[int, str, str], TemplateSandbox] = {}
_refused: dict[str, tuple[str, float]] = {}  # template -> (the limit it hit, when)
_children_lock = threading.Lock()


def render(template: str, tokens: dict[str, Any], messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` rendered by `template` (with the special tokens `tokens`) in a child process under the limits;
    TemplateError when the template raises, TemplateLimitError when it runs past a limit."""
    message, when = _refused.get(template, ("", -REFUSED_FOR_S))
    if time.monotonic() - when < REFUSED_FOR_S:
        raise TemplateLimitError(message)
    key = (os.getpid(), template, json.dumps(tokens, sort_keys=True))
    with _children_lock:
        child = _children.pop(key, None)
        if child is None:
            # Only this process's own children: a forked worker inherits its parent's entries, not their processes.
            own = [other for other in _children if other[0] == key[0]]
            for old in own[: max(0, len(own) - KEPT_CHILDREN + 1)]:
                _children.pop(old).close()
            child = TemplateSandbox(template, tokens)
        _children[key] = child  # most recently used last
    try:
        return child.render(messages, add_generation_prompt)
    except TemplateLimitError as exc:
        _refused[template] = (str(exc), time.monotonic())
        with _children_lock:
            if _children.get(key) is child:
                del _children[key]
        child.close()
        raise


@atexit.register
def close_all() -> None:
    """End every child of this process (they would end anyway when their pipe closes)."""
    with _children_lock:
        for key in [key for key in _children if key[0] == os.getpid()]:
            _children.pop(key).close()


def serve() -> None:
    """The child: cap this process, then render one JSON request per line of stdin, one JSON reply per line."""
    from transformers.utils.chat_template_utils import render_jinja_template

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_CAP_S, CPU_CAP_S))
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            rendered, _ = render_jinja_template(
                conversations=[request["messages"]],
                chat_template=request["template"],
                add_generation_prompt=request["add_generation_prompt"],
                **request["tokens"],
            )
            text = rendered[0]
            if len(text) > MAX_RENDERED_CHARS:
                reply = {"limit": f"rendered one conversation into more than {MAX_RENDERED_CHARS:,} characters"}
            else:
                reply = {"text": text}
        except MemoryError:
            reply = {"limit": f"needs more than {MEMORY_CAP_BYTES >> 20} MiB of memory to render one conversation"}
        except Exception as exc:  # jinja2 raises several types; the parent raises them as TemplateError
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            encoded = json.dumps(reply).encode("ascii")
        except MemoryError:
            encoded = b'{"limit": "rendered a conversation too large to return"}'
        out.write(encoded + b"\n")
        out.flush()
