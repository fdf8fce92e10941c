"""LLM provider clients through the official SDKs: OpenAI (and any OpenAI-compatible server via base_url), Anthropic
and Ollama, for the synthetic-data stage, the GRPO judge and the arena's judge.

One call, `Client.complete(prompt, system, schema)`, asks for one reply with the same guards for every provider: a
whole-reply timeout, a response-size cap, no cross-origin redirects, JSON checked before the SDK reads it, retries
on 429 / 5xx / timeouts / dropped connections with backoff and Retry-After, errors a user can act on, and the API
key cut out of every server message. Adding a provider is one Client subclass (its SDK's client, check and send),
its name in PROVIDERS and CLIENTS, and its default URL (and key variable) in DEFAULT_URLS (and KEY_ENV).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

from settings import check, option
from workspace import UserError

log = logging.getLogger(__name__)

PROVIDERS = ("openai", "anthropic", "ollama")
RESPONSE_FORMATS = ("json_schema", "json_object", "none")
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
OFFICIAL_HOSTS = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}
OLLAMA_DEFAULT_URL = "http://localhost:11434"
DEFAULT_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "ollama": OLLAMA_DEFAULT_URL,
}
# Local OpenAI-compatible servers ignore the key, but the SDK refuses to start without one.
NO_KEY = "no-key"
RETRY_STATUSES = (408, 409, 429)  # and every 5xx: timeouts, lock conflicts, rate limits, server trouble
MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer pause ends the run (resume later) instead of idling
MAX_BACKOFF_S = 60.0
CHECK_TIMEOUT_S = 10.0  # connecting and the model check: a wrong base_url fails in seconds, not timeout_s
CHECK_TOO_SLOW = f"sent no complete reply to the model check within {CHECK_TIMEOUT_S:g} s; is base_url right?"
# A reply holds at most max_tokens tokens (a few hundred KB even for long ones) and a model list about 1 MB
# (OpenRouter's); a body past this is a server sending garbage without end, which would otherwise fill memory.
MAX_RESPONSE_BYTES = 16 * 2**20
# A provider's error message goes into status.json, progress.json, log.txt and the page: one screen line or so.
MAX_MESSAGE_CHARS = 300
REDACTED = "[redacted]"
DEFAULT_PORTS = {"http": 80, "https": 443}
T = TypeVar("T")


@dataclass
class ClientConfig:
    """Which server and model to ask, how, and how patiently. The API key is never a field here."""

    provider: str = option(
        "openai",
        help="openai also covers vLLM, llama.cpp server and LM Studio (set the base URL).",
        choices=PROVIDERS,
        label="Provider",
    )
    model: str = option("", help="The model to ask, e.g. gpt-4o-mini, claude-sonnet-4-5 or llama3.2.", label="Model")
    base_url: str = option("", help="Empty: the provider's own API (Ollama: http://localhost:11434).", label="Base URL")
    # How replies are held to the caller's JSON schema (the prompt always asks for it too):
    # json_schema: structured output (OpenAI, vLLM, LM Studio, llama.cpp's llama-server, Anthropic, Ollama);
    # json_object: JSON mode with the schema attached (`python -m llama_cpp.server`; Ollama's format="json";
    # Anthropic: the prompt alone); none: the prompt alone, for servers that support neither.
    response_format: str = option(
        "json_schema",
        help="json_object for python -m llama_cpp.server; none for servers without JSON modes.",
        choices=RESPONSE_FORMATS,
        label="Response format",
    )
    temperature: float = option(
        0.8,
        help="OpenAI-compatible servers and Ollama; Anthropic's messages API has none.",
        minimum=0,
        maximum=2,
        label="Temperature",
    )
    max_tokens: int = option(1024, help="Per reply.", minimum=1, label="Max tokens per reply")
    timeout_s: float = option(
        60.0, help="Per request, the whole reply.", minimum=0, exclusive_minimum=True, label="Request timeout (s)"
    )
    max_retries: int = option(
        5,
        help="Retries per request on 429 / 5xx / timeouts / connection errors.",
        minimum=0,
        maximum=100,
        label="Retries",
    )
    backoff_s: float = option(
        1.0,
        help="First retry delay; doubles each retry, with jitter; a Retry-After header wins.",
        minimum=0,
        label="First retry delay (s)",
    )

    @property
    def key_env(self) -> str | None:
        """The environment variable holding the provider's API key; None for Ollama, which has none."""
        return KEY_ENV.get(self.provider)

    @property
    def url(self) -> str:
        """The server asked: base_url, else the provider's own API."""
        return self.base_url or DEFAULT_URLS[self.provider]

    @property
    def official(self) -> bool:
        """Whether the server is the provider's own API (OpenAI's and Anthropic's take other options than local ones)."""
        return not self.base_url or urlparse(self.base_url).hostname == OFFICIAL_HOSTS.get(self.provider)

    def validate(self) -> None:
        """Raise UserError for the first value that cannot work."""
        check(self)
        if not str(self.model).strip():
            raise UserError("No model given. Name the model to ask, e.g. gpt-4o-mini, claude-sonnet-4-5 or llama3.2.")
        check_base_url(self.base_url)


def check_base_url(base_url: str) -> None:
    """UserError for a base_url that is not an http(s) address."""
    if base_url and urlparse(base_url).scheme not in ("http", "https"):
        raise UserError(f"base_url '{base_url}' must start with http:// or https://, e.g. http://localhost:8000/v1.")


@dataclass
class Reply:
    text: str
    tokens_in: int
    tokens_out: int


# ---------------------------------------------------------------- keys


def resolve_api_key(config: ClientConfig, api_key: str | None = None) -> str | None:
    """The key to send: the argument, else OPENAI_API_KEY / ANTHROPIC_API_KEY; None for Ollama, which has none.

    The provider's own API needs a key; a local server given by base_url gets a placeholder when none is set.
    """
    if config.key_env is None:
        return None
    key = (api_key or os.environ.get(config.key_env) or "").strip()
    if key:
        return key
    if config.official:
        raise UserError(
            f"No API key for {config.provider}. Set {config.key_env} in the environment "
            "(or type the key in the app); it is passed to the job and never saved."
        )
    return NO_KEY


def job_env(config: ClientConfig, api_key: str | None = None) -> dict[str, str]:
    """Environment for jobs.start_job carrying the key to the job's process (never written to the run folder)."""
    key = resolve_api_key(config, api_key)
    return {config.key_env: key} if key and key != NO_KEY else {}


def redact(text: str, api_key: str | None) -> str:
    """`text` without the job's API key, which some servers quote back in their error messages."""
    return text.replace(api_key, REDACTED) if api_key and api_key != NO_KEY else text


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters with a note of how many were left off."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def quiet_http_logs() -> None:
    """The SDKs' HTTP library logs every request at INFO: thousands of lines in a job's log."""
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------- replies refused before the SDK reads them


class BadReply(Exception):
    """A reply refused before the SDK parses it (too slow, too big, not JSON, redirected elsewhere).

    The message continues "The <provider> server at <url> ..."; `retry` says whether asking again may help.
    """

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class ServerBusy(UserError):
    """The server kept failing or asks for a long pause: asking again later may work (the caller says what is kept)."""


def _bad_reply(exc: BaseException | None) -> BadReply | None:
    """The BadReply behind `exc`, which an SDK may have wrapped in an error of its own."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BadReply):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


async def _within(seconds: float, awaitable: Awaitable[T], message: str, retry: bool) -> T:
    """`awaitable`'s result, or BadReply(message) when it takes longer than `seconds` all told.

    The SDKs' timeouts bound each read, so a server trickling a byte a second would hold a request forever.
    """
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise BadReply(message, retry) from None


def _origin(url: Any) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


async def _ask_for_plain_bodies(request: Any) -> None:
    # A compressed body would be expanded past MAX_RESPONSE_BYTES after the check (a gzip bomb).
    request.headers["Accept-Encoding"] = "identity"


async def _read_body(response: Any) -> bytes:
    """The raw body, refused once it passes MAX_RESPONSE_BYTES."""
    too_large = BadReply(
        f"sent a reply larger than {MAX_RESPONSE_BYTES / 2**20:g} MiB, which no chat reply is; is base_url the API "
        "endpoint?",
        retry=False,
    )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in response.stream:
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise too_large
        chunks.append(chunk)
    await response.stream.aclose()
    return b"".join(chunks)


def _check_json(response: Any, body: bytes) -> None:
    """Refuse a success whose body is not a JSON object: a web page is fatal, a cut-off body worth another try."""
    try:
        data = json.loads(body)
    except ValueError:
        kind = response.headers.get("content-type", "no content type").split(";")[0].strip()
        if "html" in kind or body.lstrip()[:1] == b"<":
            raise BadReply(
                f"answered {response.status_code} with {kind}, not JSON — is base_url the API endpoint?", retry=False
            ) from None
        began = body[:60].decode("utf-8", errors="replace")
        raise BadReply(f"answered {response.status_code} with invalid JSON (began: {began!r})", retry=True) from None
    if not isinstance(data, dict):
        raise BadReply(
            f"answered {response.status_code} with a JSON {type(data).__name__}, not an object — is base_url the API "
            "endpoint?",
            retry=False,
        )


def not_a_chat_reply(field: str) -> BadReply:
    # Valid JSON without the reply in it is a server speaking another API: asking again gets the same.
    return BadReply(
        f"answered 200 with JSON that is not a chat reply (no '{field}'); does base_url point to its chat API?",
        retry=False,
    )


def openai_reply(response: Any) -> Reply:
    """An OpenAI chat completion's text and token counts."""
    # The SDK builds its objects without validating them: JSON of another shape leaves fields None or odd.
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        raise not_a_chat_reply("choices")
    text = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
    usage = getattr(response, "usage", None)
    return Reply(
        text if isinstance(text, str) else "",
        getattr(usage, "prompt_tokens", 0) or 0,
        getattr(usage, "completion_tokens", 0) or 0,
    )


def anthropic_reply(response: Any) -> Reply:
    """An Anthropic message's text blocks and token counts (built without validation, like OpenAI's)."""
    content = getattr(response, "content", None)
    if not isinstance(content, list):
        raise not_a_chat_reply("content")
    text = "".join(str(getattr(block, "text", "")) for block in content if getattr(block, "type", "") == "text")
    usage = getattr(response, "usage", None)
    return Reply(text, getattr(usage, "input_tokens", 0) or 0, getattr(usage, "output_tokens", 0) or 0)


# ---------------------------------------------------------------- the clients


class Client:
    """One SDK's async client: check() (server, key and model, once), complete(...) (one reply, retried), close().

    A subclass per provider opens its SDK and has `check` and `send` (one request, no retries). The openai and
    anthropic SDKs share their error classes' shapes, which http_error and connection_error read; only the SDK in use
    is imported, so a job never pays for loading the other two.
    """

    def __init__(
        self,
        config: ClientConfig,
        api_key: str | None,
        sdk: Any,
        httpx_module: Any,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.api_key = api_key
        self.sdk = sdk
        self.httpx = httpx_module  # the HTTP library under the SDK: httpx2 for openai and anthropic, httpx for ollama
        self.on_retry = on_retry or (lambda: None)  # the caller's retry counter

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return self.config.url

    def timeout(self, timeout_class: type) -> Any:
        """The timeout of each read, with connecting cut short so that a wrong address fails in seconds."""
        return timeout_class(self.config.timeout_s, connect=min(self.config.timeout_s, CHECK_TIMEOUT_S))

    def http_options(self) -> dict[str, Any]:
        """Options for the SDK's HTTP client: every response passes check_response before the SDK reads it."""
        return {"event_hooks": {"request": [_ask_for_plain_bodies], "response": [self.check_response]}}

    async def check_response(self, response: Any) -> None:
        """Refuse a redirect to another origin; read the body within MAX_RESPONSE_BYTES; a success must be JSON.

        httpx calls this for every response, redirects included, before following one or reading the body.
        """
        if response.has_redirect_location:
            target = response.request.url.join(response.headers["location"])
            if _origin(target) != _origin(response.request.url):
                # The key belongs to the address the user gave. (Following it, httpx drops the key on the way and the
                # other server's 401 blames the key instead of base_url.)
                raise BadReply(f"redirected to {target}; set base_url to the final address", retry=False)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise BadReply(f"compressed its reply ({encoding}) although asked not to", retry=False)
        body = await _read_body(response)
        response.stream = self.httpx.ByteStream(body)
        if response.is_success:
            _check_json(response, body)

    def clean(self, text: str) -> str:
        """A server's text as it may be stored and shown: without the key, and short."""
        return shorten(redact(str(text), self.api_key))

    def user_error(self, message: str) -> UserError:
        """UserError for `message`, which continues "The <provider> server at <url> ..."."""
        text = f"The {self.config.provider} server at {self.url} {self.clean(message)}"
        return UserError(text if text.endswith(("?", ".")) else text + ".")

    def http_error(self, exc: BaseException) -> tuple[int, str, Any] | None:
        """(status, the server's message cleaned, headers) when `exc` is an HTTP error reply, else None."""
        if not isinstance(exc, self.sdk.APIStatusError):
            return None
        error = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return exc.status_code, self.clean(message or exc.message), exc.response.headers

    def connection_error(self, exc: BaseException) -> bool:
        """Whether `exc` means no reply arrived: refused, dropped, timed out."""
        return isinstance(exc, (self.sdk.APIConnectionError, asyncio.TimeoutError))

    async def close(self) -> None:
        await self.client.close()

    async def complete(
        self, prompt: str, system: str, schema: dict[str, Any] | None = None, schema_name: str = "reply"
    ) -> Reply:
        """One reply to `prompt` under the `system` prompt, held to `schema` (a JSON schema named `schema_name`) as
        config.response_format says; plain text when `schema` is None.

        Retries on 429 / 5xx / timeouts / connection errors / cut-off bodies, calling on_retry for each; other
        errors are UserError at once, ServerBusy when the retries run out or the server asks for a long pause.
        """
        config = self.config
        too_slow = f"sent no complete reply within timeout_s = {config.timeout_s:g} s"
        for attempt in range(config.max_retries + 1):
            try:
                return await _within(
                    config.timeout_s, self.send(prompt, system, schema, schema_name), too_slow, retry=True
                )
            except Exception as exc:
                bad = _bad_reply(exc)
                if bad is not None and not bad.retry:
                    raise self.user_error(str(bad)) from None
                status = self.http_error(exc) if bad is None else None
                if status is not None and status[0] not in RETRY_STATUSES and status[0] < 500:
                    raise _fatal_status(status[0], status[1], self) from None
                if bad is None and status is None and not self.connection_error(exc):
                    raise
                if bad is not None:
                    problem = self.clean(str(bad))
                elif status is not None:
                    problem = f"{status[0]}: {status[1]}"  # cleaned already: a second cut would eat the length note
                else:
                    problem = self.clean(_describe(exc))
                retry_after = retry_after_seconds(status[2]) if status else None
                if retry_after is not None and retry_after > MAX_RETRY_AFTER_S:
                    raise ServerBusy(
                        f"The server asks to wait {retry_after:.0f} s before the next request ({problem})."
                    ) from None
                if attempt == config.max_retries:
                    raise ServerBusy(
                        f"The {config.provider} server at {self.url} kept failing after {attempt} retries ({problem})."
                    ) from None
                delay = backoff_delay(attempt, config.backoff_s, retry_after)
                self.on_retry()
                log.info("retry %d/%d in %.2f s after %s", attempt + 1, config.max_retries, delay, problem)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


class OpenAIClient(Client):
    def __init__(self, config: ClientConfig, api_key: str | None, on_retry: Callable[[], None] | None = None) -> None:
        import httpx2
        import openai

        super().__init__(config, api_key, openai, httpx2, on_retry)
        # max_retries=0: retries are ours, so they are counted and share one backoff policy across providers.
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=config.base_url or None,
            timeout=self.timeout(openai.Timeout),
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(**self.http_options()),
        )

    async def check(self) -> None:
        try:
            page = await _within(
                CHECK_TIMEOUT_S, self.client.models.list(timeout=CHECK_TIMEOUT_S), CHECK_TOO_SLOW, retry=False
            )
        except self.sdk.NotFoundError:
            return  # a server without a model list: the first request will tell
        except Exception as exc:
            _raise_if_fatal_at_check(exc, self)
            return
        served = [model.id for model in page.data]
        if served and self.config.model not in served:
            raise UserError(
                f"Model '{self.config.model}' is not served at {self.url}; it serves: "
                f"{', '.join(served[:20])}{' …' if len(served) > 20 else ''}. Check the model name."
            )

    async def send(self, prompt: str, system: str, schema: dict[str, Any] | None, schema_name: str) -> Reply:
        config = self.config
        # OpenAI's own API wants max_completion_tokens (its reasoning models refuse max_tokens); compatible servers
        # (vLLM, llama.cpp, LM Studio) know max_tokens.
        options: dict[str, Any] = {"max_completion_tokens" if config.official else "max_tokens": config.max_tokens}
        if schema is not None and config.response_format == "json_schema":
            options["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": True},
            }
        elif schema is not None and config.response_format == "json_object":
            # llama-cpp-python's server turns an attached schema into a grammar; OpenAI's API takes no such key.
            options["response_format"] = {"type": "json_object", **({} if config.official else {"schema": schema})}
        response = await self.client.chat.completions.create(
            model=config.model,
            temperature=config.temperature,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            **options,
        )
        return openai_reply(response)


class AnthropicClient(Client):
    def __init__(self, config: ClientConfig, api_key: str | None, on_retry: Callable[[], None] | None = None) -> None:
        import anthropic
        import httpx2

        super().__init__(config, api_key, anthropic, httpx2, on_retry)
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=config.base_url or None,
            timeout=self.timeout(anthropic.Timeout),
            max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(**self.http_options()),
        )

    async def check(self) -> None:
        try:
            await _within(
                CHECK_TIMEOUT_S,
                self.client.models.retrieve(self.config.model, timeout=CHECK_TIMEOUT_S),
                CHECK_TOO_SLOW,
                retry=False,
            )
        except Exception as exc:
            _raise_if_fatal_at_check(exc, self)

    async def send(self, prompt: str, system: str, schema: dict[str, Any] | None, schema_name: str) -> Reply:
        # The messages API takes no temperature any more; structured output goes through output_config (unnamed).
        options: dict[str, Any] = {}
        if schema is not None and self.config.response_format == "json_schema":
            options["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        response = await self.client.messages.create(
            model=self.config.model,
            max_tokens=self.config.max_tokens,
            system=system,
            messages=[{"role": "user", "content": prompt}],
            **options,
        )
        return anthropic_reply(response)


class OllamaClient(Client):
    def __init__(self, config: ClientConfig, api_key: str | None, on_retry: Callable[[], None] | None = None) -> None:
        import httpx
        import ollama

        super().__init__(config, api_key, ollama, httpx, on_retry)
        self.client = ollama.AsyncClient(host=self.url, timeout=self.timeout(httpx.Timeout), **self.http_options())

    def http_error(self, exc: BaseException) -> tuple[int, str, Any] | None:
        if isinstance(exc, self.sdk.ResponseError):
            return exc.status_code, self.clean(exc.error), {}  # the SDK keeps no headers: no Retry-After from Ollama
        return None

    def connection_error(self, exc: BaseException) -> bool:
        # ollama turns a refused connection into the builtin ConnectionError and lets other httpx errors through.
        return isinstance(exc, (self.httpx.TransportError, ConnectionError, asyncio.TimeoutError))

    async def check(self) -> None:
        try:
            await _within(CHECK_TIMEOUT_S, self.client.show(self.config.model), CHECK_TOO_SLOW, retry=False)
        except Exception as exc:
            _raise_if_fatal_at_check(exc, self)

    async def send(self, prompt: str, system: str, schema: dict[str, Any] | None, schema_name: str) -> Reply:
        import pydantic

        output_format = None
        if schema is not None:
            output_format = {"json_schema": schema, "json_object": "json", "none": None}[self.config.response_format]
        try:
            response = await self.client.chat(
                model=self.config.model,
                stream=False,
                format=output_format,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                options={"temperature": self.config.temperature, "num_predict": self.config.max_tokens},
            )
        except pydantic.ValidationError:  # the SDK validates the reply's JSON against its model
            raise not_a_chat_reply("message") from None
        return Reply(response.message.content or "", response.prompt_eval_count or 0, response.eval_count or 0)


CLIENTS: dict[str, type[Client]] = {"openai": OpenAIClient, "anthropic": AnthropicClient, "ollama": OllamaClient}


def open_client(config: ClientConfig, api_key: str | None, on_retry: Callable[[], None] | None = None) -> Client:
    """The client of config.provider, sending `api_key` (resolved already: see resolve_api_key); use `async with`."""
    return CLIENTS[config.provider](config, api_key, on_retry)


async def cancel_and_close(pending, client: Client) -> None:
    """The end of a job's request loop (done, stopped or failed): the requests still in flight cancelled and waited
    for, then the client's connections closed."""
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await client.close()


def check_server(config: ClientConfig, api_key: str | None) -> None:
    """UserError now when the server cannot answer: nothing listening, a refused key, an unknown model."""

    async def check() -> None:
        async with open_client(config, api_key) as client:
            await client.check()

    asyncio.run(check())


# ---------------------------------------------------------------- errors and retries


def _describe(exc: BaseException) -> str:
    """The innermost cause of a connection error, e.g. '[Errno 111] Connection refused' (not yet cleaned)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc) or type(exc).__name__


def _fatal_status(status: int, message: str, client: Client) -> UserError:
    config = client.config
    if status in (401, 403):
        key = f" Check {config.key_env}." if config.key_env else ""
        return UserError(
            f"The {config.provider} server at {client.url} refused the request ({status}: {message}).{key}"
        )
    if status == 404:
        hint = (
            f" Pull it with `ollama pull {config.model}`."
            if config.provider == "ollama"
            else " Check the model name, and base_url (OpenAI-compatible servers usually end in /v1)."
        )
        return UserError(f"Model '{config.model}' was not found at {client.url} ({message}).{hint}")
    return UserError(f"The {config.provider} server at {client.url} refused the request ({status}: {message}).")


def _raise_if_fatal_at_check(exc: BaseException, client: Client) -> None:
    """At the start: unreachable server, bad key, unknown model are errors now; a busy server is left to retries."""
    bad = _bad_reply(exc)
    if bad is not None and bad.retry:
        log.warning("model check: the server %s; going on", client.clean(str(bad)))
        return
    if bad is not None:
        raise client.user_error(str(bad)) from None
    if client.connection_error(exc):
        raise UserError(
            f"Cannot reach the {client.config.provider} server at {client.url}: {client.clean(_describe(exc))}. "
            "Is it running, and is base_url right?"
        ) from None
    status = client.http_error(exc)
    if status is None:
        raise exc
    if status[0] == 429 or status[0] >= 500:
        log.warning("model check got %s (%s); going on", status[0], status[1])
        return
    raise _fatal_status(status[0], status[1], client) from None


def retry_after_seconds(headers: Any) -> float | None:
    """Retry-After (seconds or an HTTP date) or retry-after-ms, as seconds; None when absent or unreadable."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_delay(attempt: int, backoff_s: float, retry_after: float | None) -> float:
    """Seconds before retry number `attempt` (0-based): exponential with jitter, or the server's Retry-After."""
    if retry_after is not None:
        return retry_after + random.uniform(0, 0.1 + 0.1 * retry_after)  # never earlier than asked
    return min(MAX_BACKOFF_S, backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
