"""`main.py export --ollama`'s check before the export: a server that is not Ollama, or OLLAMA_HOST that is no
address, is one error line, and no run folder is made. The servers here are real local HTTP servers."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import main
import runfolder


@contextmanager
def web_server(status: int, body: bytes) -> Iterator[str]:
    """A local HTTP server answering every GET with `status` and `body`; yields its host:port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def export_error(workspace, monkeypatch, capsys, host: str) -> str:
    monkeypatch.setenv("OLLAMA_HOST", host)
    assert main.main(["--workspace", str(workspace), "export", "trained", "--ollama", "mine"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not runfolder.runs_dir(workspace).exists() or not any(runfolder.runs_dir(workspace).iterdir())
    return lines[0]


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (404, b"404 page not found", "answered HTTP 404 to Ollama's model list, so it is not an Ollama"),
        (200, b"<html><body>Welcome to nginx</body></html>", "answered, but not as Ollama does"),
    ],
)
def test_a_server_that_is_not_ollama_is_one_error_line(workspace, monkeypatch, capsys, status, body, message):
    with web_server(status, body) as host:
        line = export_error(workspace, monkeypatch, capsys, host)
    assert message in line and "ollama create NAME -f Modelfile" in line


@pytest.mark.parametrize("host", ["http://[::1", "http://127.0.0.1:99999", "::::"])
def test_an_ollama_host_that_is_no_address_is_one_error_line(workspace, monkeypatch, capsys, host):
    assert f"OLLAMA_HOST '{host}' is not an address" in export_error(workspace, monkeypatch, capsys, host)
