"""Hand an export to a running Ollama in one step, through the official `ollama` SDK: upload the GGUF (and the LoRA
adapter) as blobs, create the model with the Modelfile's TEMPLATE, stop tokens and parameters, then ask it one
question to prove it answers. OLLAMA_HOST chooses the server, as it does for the `ollama` command itself."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workspace import UserError

log = logging.getLogger(__name__)

HOST_ENV = "OLLAMA_HOST"
DEFAULT_HOST = "http://127.0.0.1:11434"
PROBE_QUESTION = "What is the capital of France?"
PROBE_TOKENS = 32
# Ollama's model names: [namespace/]model[:tag], letters, digits, '.', '_', '-'.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:[A-Za-z0-9][A-Za-z0-9._-]*)?$")
MODELFILES = ("Modelfile", "Modelfile.lora")  # the merged model; the base model + ADAPTER


@dataclass
class ModelfileSpec:
    """What /api/create needs from a Modelfile this app wrote: the GGUF, the adapter, TEMPLATE and PARAMETERs."""

    model_file: str
    adapter_file: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def ollama_host() -> str:
    return os.environ.get(HOST_ENV) or DEFAULT_HOST


def manual_command(gguf_dir: Path, name: str, modelfile: str = "Modelfile") -> str:
    return f"cd {gguf_dir} && ollama create {name} -f {modelfile}"


def parse_modelfile(text: str) -> ModelfileSpec:
    """The FROM / ADAPTER files, the TEMPLATE and the PARAMETERs (stop collected into a list) of an export's
    Modelfile; other instructions are not written by the export and are refused."""
    spec, rest = None, text
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    if template:
        rest = text[: template.start()] + text[template.end() :]
    adapter, parameters = None, {}
    for line in rest.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, value = line.partition(" ")
        instruction, value = instruction.upper(), value.strip()
        if instruction == "FROM":
            spec = value.removeprefix("./")
        elif instruction == "ADAPTER":
            adapter = value.removeprefix("./")
        elif instruction == "PARAMETER":
            key, _, raw = value.partition(" ")
            parsed = json.loads(raw)
            if key == "stop":
                parameters.setdefault("stop", []).append(parsed)
            else:
                parameters[key] = parsed
        else:
            raise UserError(f"The Modelfile has an instruction this app does not hand to Ollama: {line[:80]}")
    if not spec:
        raise UserError("The Modelfile has no FROM line; export the run again.")
    return ModelfileSpec(spec, adapter, template.group(1) if template else None, parameters)


def add_to_ollama(
    gguf_dir: str | Path,
    name: str,
    modelfile: str = "Modelfile",
    host: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Create model `name` in the Ollama at `host` (default $OLLAMA_HOST) from an export's files and ask it one
    question; returns what happened (host, statuses, question, reply). UserError when no Ollama answers."""
    import httpx

    gguf_dir = Path(gguf_dir)
    name = (name or "").strip()
    if not NAME_PATTERN.match(name):
        raise UserError(
            f"'{name}' is not an Ollama model name: use letters, digits, '.', '_' and '-', optionally "
            "namespace/ before and :tag after (e.g. my-model or me/my-model:q8_0)."
        )
    if modelfile not in MODELFILES or not (gguf_dir / modelfile).exists():
        raise UserError(f"No {modelfile} in {gguf_dir}: export the run first.")
    spec = parse_modelfile((gguf_dir / modelfile).read_text(encoding="utf-8"))
    host = host or ollama_host()
    say = progress or (lambda message: None)
    client = open_client(host, f"or create the model by hand: {manual_command(gguf_dir, name, modelfile)}")
    import ollama

    try:
        say(f"uploading {spec.model_file} to Ollama at {host}")
        files = {spec.model_file: client.create_blob(_existing(gguf_dir, spec.model_file))}
        adapters = None
        if spec.adapter_file:
            say(f"uploading {spec.adapter_file}")
            adapters = {spec.adapter_file: client.create_blob(_existing(gguf_dir, spec.adapter_file))}
        say(f"creating {name}")
        statuses = []
        for part in client.create(
            model=name,
            files=files,
            adapters=adapters,
            template=spec.template,
            parameters=spec.parameters or None,
            stream=True,
        ):
            statuses.append(part.status)
            log.info("ollama create: %s", part.status)
        if not statuses or statuses[-1] != "success":
            raise UserError(f"Ollama did not finish creating {name}: its last status was {statuses[-1:]}.")
        say(f"asking {name} one question")
        answer = client.chat(
            model=name,
            messages=[{"role": "user", "content": PROBE_QUESTION}],
            options={"num_predict": PROBE_TOKENS},
        )
    except (ConnectionError, httpx.TransportError):
        raise UserError(
            f"No Ollama answers at {host}. Start it (`ollama serve`) or set {HOST_ENV} to where it runs, then try "
            f"again; or create the model by hand: {manual_command(gguf_dir, name, modelfile)}"
        ) from None
    except ollama.ResponseError as exc:
        raise UserError(f"Ollama at {host} refused to create {name}: {exc.error}") from None
    finally:
        client.close()
    reply = (answer.message.content or "").strip()
    if not reply:
        raise UserError(f"Ollama created {name}, but it answered nothing to '{PROBE_QUESTION}'.")
    return {
        "model": name,
        "host": host,
        "modelfile": modelfile,
        "files": files,
        "adapters": adapters or {},
        "statuses": statuses,
        "question": PROBE_QUESTION,
        "reply": reply,
    }


def open_client(host: str, by_hand: str):
    """The SDK's client for `host`; UserError (with `by_hand`, what to do instead) when it is no address."""
    try:
        # Importing the SDK builds its default client from $OLLAMA_HOST, so a bad value fails the import too.
        import ollama

        return ollama.Client(host=host)
    except ValueError as exc:  # the address is parsed here: a bad port, an unclosed [IPv6 bracket
        raise UserError(
            f"{HOST_ENV} '{host}' is not an address ({exc}); set it to host:port, e.g. 127.0.0.1:11434, {by_hand}"
        ) from None


def check_reachable(host: str | None = None) -> None:
    """UserError with the manual command's hint when no Ollama answers at `host`, before a long export starts."""
    import httpx

    host = host or ollama_host()
    by_hand = (
        "or leave out --ollama and create the model by hand after the export: ollama create NAME -f Modelfile in the "
        "run's gguf/ folder."
    )
    client = open_client(host, by_hand)
    import ollama

    try:
        client.list()
    except (ConnectionError, httpx.TransportError):
        raise UserError(
            f"No Ollama answers at {host}. Start it (`ollama serve`) or set {HOST_ENV} to where it runs; {by_hand}"
        ) from None
    except ollama.ResponseError as exc:
        raise UserError(
            f"The server at {host} answered HTTP {exc.status_code} to Ollama's model list, so it is not an Ollama (or "
            f"not one this app can use). Set {HOST_ENV} to where Ollama runs; {by_hand}"
        ) from None
    except ValueError:  # a 200 that is not Ollama's JSON (a web page): json and pydantic errors are ValueErrors
        raise UserError(
            f"The server at {host} answered, but not as Ollama does (its reply to the model list is not Ollama's "
            f"JSON). Set {HOST_ENV} to where Ollama runs; {by_hand}"
        ) from None
    finally:
        client.close()


def _existing(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise UserError(f"The Modelfile names {name}, which is not in {folder}: export the run again.")
    return path
