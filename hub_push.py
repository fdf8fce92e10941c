"""Pushing a finished run to the Hugging Face Hub: its adapter, its merged safetensors and/or its GGUF files, with a
model card made from the run (model_card), through huggingface_hub's own upload API, as a job with progress.

Before a byte is sent, one message for each thing that would stop the upload: no token, a token that cannot write,
a namespace the token's account does not own, a repo name the Hub refuses, no network. The token is huggingface_hub's
(HF_TOKEN, else the one `hf auth login` saved); this module never writes one. A push that is killed or stopped
resumes: files the repo already holds with the same content are skipped, and large files uploaded before the stop
are in the Hub's storage already (its LFS batch answer says so, and the client skips them).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import model_card
import runfolder
import stages
from runfolder import JobContext, TrainedModel
from settings import check, option
from workspace import UserError, config_from_dict, write_json

log = logging.getLogger(__name__)

PARTS = ("adapter", "merged", "gguf")
REPORT_EVERY_S = 0.5


@dataclass
class PushConfig:
    """Which run goes to which Hub repo, and which of its files."""

    run: str = option("", help="The finished training run to push (its name or folder).", label="Training run")
    repo_id: str = option(
        "", help="The Hub repo to push to, OWNER/NAME (yours or an organization's you can write to).", label="Hub repo"
    )
    private: bool = option(
        False, help="Create the repo private (an existing repo keeps its visibility).", label="Private"
    )
    # No `choices`: settings.check compares the whole list with them; validate() checks each item.
    what: list[str] = option(
        default_factory=lambda: ["adapter"],
        help="What to push (also as 'adapter,gguf'): adapter (the LoRA adapter), merged (16-bit safetensors: a full "
        "fine-tune's, or merged/ from an export), gguf (the exported GGUF files and Modelfile).",
        label="Push",
    )

    def __post_init__(self) -> None:
        what = self.what.split(",") if isinstance(self.what, str) else list(self.what or [])
        self.what = [str(part).strip().lower() for part in what if str(part).strip()]

    def validate(self) -> None:
        check(self)
        if not str(self.run).strip():
            raise UserError("No training run chosen. Give the name of a finished training run to push.")
        check_repo_name(self.repo_id)
        if not self.what:
            raise UserError(f"Nothing to push: choose one or more of {', '.join(PARTS)}.")
        unknown = [part for part in self.what if part not in PARTS]
        if unknown:
            raise UserError(f"Unknown part(s) to push: {', '.join(unknown)}; choose among {', '.join(PARTS)}.")
        if len(set(self.what)) != len(self.what):
            raise UserError(f"A part to push is listed twice: {', '.join(self.what)}.")


def push_config_from_dict(data: dict[str, Any]) -> PushConfig:
    return config_from_dict(PushConfig, data, "push config")


def push_run_name(run: str) -> str:
    """The push job's own run-folder name (jobs adds -2, -3 … when it exists)."""
    return f"push-{Path(str(run)).name}"[:80]


def check_repo_name(repo_id: str) -> str:
    """UserError for a repo id the Hub refuses, with its rule (huggingface_hub's validate_repo_id holds the Hub's
    rules: OWNER/NAME of letters, digits, '-', '_' and '.', at most 96 characters, no '--' or '..', no '.git' end)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = str(repo_id or "").strip()
    if repo_id.count("/") != 1:
        raise UserError(f"'{repo_id}' is not a Hub repo id; it has the form OWNER/NAME, e.g. alice/my-model.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"The Hub refuses the repo id '{repo_id}': {str(exc).splitlines()[0]}") from None
    return repo_id


# ---------------------------------------------------------------- what goes where


def push_source(config: PushConfig, workspace: str | Path | None = None) -> TrainedModel:
    run_dir = runfolder.run_path(config.run, workspace)
    return stages.causal_lm(run_dir)


def plan_files(model: TrainedModel, what: list[str]) -> dict[str, Path]:
    """path in the repo → local file. The merged weights (or the adapter, when no merged weights go) sit at the
    repo's root, so transformers / PEFT load the repo by its id; the adapter beside merged weights goes to adapter/;
    GGUF files and the Modelfile at the root (llama.cpp's and Ollama's hf.co/OWNER/NAME:QUANT look there)."""
    run_dir, files = model.run_dir, {}
    if "merged" in what:
        merged = run_dir / "merged"
        if not (merged / "config.json").is_file() or not list(merged.glob("*.safetensors")):
            raise UserError(
                f"Run '{run_dir.name}' has no merged safetensors yet: export it first (the GGUF export writes "
                "merged/), or push the adapter."
            )
        files.update(_folder(merged, "", skip={".merge_stamp.json"}))
    if "adapter" in what:
        if model.kind != "adapter":
            raise UserError(f"Run '{run_dir.name}' is a full fine-tune: it has no adapter; push merged instead.")
        files.update(_folder(model.path, "adapter/" if "merged" in what else "", skip={"README.md"}))
    if "gguf" in what:
        report = gguf_report(run_dir)
        if report is None:
            raise UserError(f"Run '{run_dir.name}' has no GGUF files: export it first (Export tab, or main.py export).")
        names = [entry["file"] for entry in report["files"]]
        if report.get("lora"):
            names += [report["lora"]["file"], report["lora"]["base_file"], "Modelfile.lora"]
        for name in [*names, "Modelfile"]:
            path = run_dir / "gguf" / name
            if path.is_file():
                files[name] = path
    return files


def _folder(folder: Path, prefix: str, skip: set[str]) -> dict[str, Path]:
    return {
        prefix + path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in skip and not path.name.startswith(".")
    }


def gguf_report(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "gguf" / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- may this token write there?


def check_access(repo_id: str) -> str:
    """The token's account name, after UserError for a missing or read-only token, a namespace it cannot write to,
    HF_HUB_OFFLINE or a Hub that cannot be reached."""
    import httpx
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE=1 keeps this app off the Hub, so it cannot push. Unset it and try again.")
    token = get_token()
    if not token:
        raise UserError(
            "No Hugging Face token: pushing needs one that can write. Set HF_TOKEN in the environment the app runs "
            "in, or run `hf auth login` once on this machine (a token with the write role, from "
            "https://huggingface.co/settings/tokens)."
        )
    try:
        me = HfApi().whoami(token=token)
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            raise UserError(
                "The Hub does not accept this token (HF_TOKEN takes precedence over `hf auth login`): make a new one "
                "with the write role and set it again."
            ) from None
        raise UserError(
            f"The Hub answered {exc.response.status_code if exc.response is not None else '?'} when "
            f"asked who this token belongs to: {str(exc).splitlines()[0]}. Try again later."
        ) from None
    except (httpx.TransportError, ConnectionError, OSError):
        raise UserError(
            f"The Hugging Face Hub ({constants.ENDPOINT}) cannot be reached: check the network (or a proxy, or "
            "HF_ENDPOINT) and try again. Nothing was uploaded."
        ) from None
    owner = repo_id.split("/")[0]
    writable = writable_namespaces(me)
    if not can_write(me, owner):
        raise UserError(
            f"The repo '{repo_id}' belongs to '{owner}', where this token cannot write: it can push to "
            f"{', '.join(writable) or 'no namespace (it is read-only)'}. Choose one of those as the owner."
        )
    return me["name"]


def token_role(me: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    token = (me.get("auth") or {}).get("accessToken") or {}
    return token.get("role", "write"), token.get("fineGrained") or {}


def writable_namespaces(me: dict[str, Any]) -> list[str]:
    """The user and organizations the whoami answer lets this token create repos and commit in."""
    candidates = [me["name"], *[org["name"] for org in me.get("orgs", []) if org.get("roleInOrg") != "read"]]
    return [name for name in candidates if can_write(me, name)]


def can_write(me: dict[str, Any], owner: str) -> bool:
    role, fine = token_role(me)
    if role == "read":
        return False
    if owner != me["name"]:
        orgs = {org["name"]: org.get("roleInOrg") for org in me.get("orgs", [])}
        if owner not in orgs or orgs[owner] == "read":
            return False
    if role == "fineGrained":  # a fine-grained token writes only where a scope grants repo.write
        return any(
            scope.get("entity", {}).get("name") == owner and "repo.write" in scope.get("permissions", [])
            for scope in fine.get("scoped", [])
        )
    return True


def check_destination(repo_id: str) -> str:
    """The repo name, then the token and the owner: the token's account name, or UserError."""
    return check_access(check_repo_name(repo_id))


def check_push(config: PushConfig, workspace: str | Path | None = None) -> TrainedModel:
    """Everything that can be refused before a job starts: options, the run's files, the token and the owner."""
    config.validate()
    model = push_source(config, workspace)
    plan_files(model, config.what)
    check_destination(config.repo_id)
    return model


# ---------------------------------------------------------------- uploading


class Stopped(Exception):
    """Raised from inside a read of the upload when the user asked to stop."""


class CountingReader(io.BufferedReader):
    """A file read by huggingface_hub's upload, each read counted once `counting` is on. A buffered reader, not a
    path: the client then takes its HTTP upload (LFS), where the bytes it sends are the bytes read here (its Xet
    upload reads paths in its own native code, whose bytes this app could not count)."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None]) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.on_bytes, self.counting = on_bytes, False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.counting:
            self.on_bytes(len(data))
        return data


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content, as the Hub lists a regular (non-LFS) file."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def already_there(api, repo_id: str, files: dict[str, Path]) -> set[str]:
    """The paths the repo holds with the same content already (a re-run after a stop skips them)."""
    from huggingface_hub.hf_api import RepoFile

    remote = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True) if isinstance(entry, RepoFile)}
    same = set()
    for name, path in files.items():
        entry = remote.get(name)
        if entry is None or entry.size != path.stat().st_size:
            continue
        if entry.lfs is not None and entry.lfs.sha256 == runfolder.file_sha256(path):
            same.add(name)
        elif entry.lfs is None and entry.blob_id == git_blob_sha1(path):
            same.add(name)
    return same


def upload(
    repo_id: str,
    files: dict[str, Path],
    private: bool,
    message: str,
    report: Callable[[int, int, float], None],
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Create the repo (kept as it is when it exists), then upload what it lacks in one commit: report(bytes done,
    bytes total, bytes per second) at most twice a second. Returns what was sent and skipped, and the commit."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except HfHubHTTPError as exc:
        raise UserError(f"The Hub would not create '{repo_id}': {str(exc).splitlines()[0]}") from None
    skipped = already_there(api, repo_id, files)
    to_send = {name: path for name, path in files.items() if name not in skipped}
    total = sum(path.stat().st_size for path in to_send.values())
    sent, started, last = 0, time.monotonic(), float("-inf")
    lock = threading.Lock()  # the client uploads several large files at once

    def on_bytes(count: int) -> None:
        nonlocal sent, last
        if stop():
            raise Stopped
        with lock:
            sent += count
            now = time.monotonic()
            if now - last < REPORT_EVERY_S:
                return
            last = now
        report(min(sent, total), total, sent / max(now - started, 1e-6))

    log.info("Pushing %d files (%d bytes) to %s; %d already there", len(to_send), total, repo_id, len(skipped))
    report(0, total, 0.0)
    readers = [CountingReader(path, on_bytes) for path in to_send.values()]
    try:
        operations = [CommitOperationAdd(name, reader) for name, reader in zip(to_send, readers, strict=True)]
        for operation, reader in zip(operations, readers, strict=True):
            operation.upload_info.sha256  # noqa: B018 (hashed now, so that only the upload's reads count)
            reader.counting = True
        commit = None
        if operations:
            api.preupload_lfs_files(repo_id, operations)  # large files: the HTTP upload, counted as it reads
            commit = api.create_commit(repo_id, operations, commit_message=message)  # small files travel inline
    except Stopped:
        raise
    except HfHubHTTPError as exc:
        raise UserError(f"The Hub refused the upload to '{repo_id}': {str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:  # the client wraps a failed file upload so
        if isinstance(exc.__cause__, Stopped):
            raise Stopped from None
        raise UserError(f"Uploading to '{repo_id}' failed: {exc} ({exc.__cause__}). Push again to resume.") from None
    finally:
        for reader in readers:
            reader.close()
    report(total, total, 0.0)
    return {
        "repo_id": repo_id,
        "url": str(url),
        "commit": commit.oid if commit else None,
        "uploaded": sorted(to_send),
        "skipped": sorted(skipped),
        "bytes_uploaded": total,
    }


def size_text(count: float) -> str:
    """Bytes as a user reads them: 812 B, 4.9 MB, 1.2 GB (powers of 1000, as the Hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def progress_reporter(ctx: JobContext, repo_id: str) -> Callable[[int, int, float], None]:
    """upload's `report` as progress events with the download job's fields: bytes, rate and ETA."""

    def report(done: int, total: int, rate: float) -> None:
        left = (total - done) / rate if rate > 0 else None
        text = f"Pushing to {repo_id}: {size_text(done)} of {size_text(total)}" + (
            f" at {size_text(rate)}/s" if rate else ""
        )
        ctx.reporter.progress(
            done,
            total,
            text,
            force=done >= total,
            bytes_done=done,
            bytes_total=total,
            rate_bytes_per_s=round(rate, 1),
            eta_s=round(left, 1) if left is not None else None,
        )

    return report


def push_job(config: PushConfig, ctx: JobContext) -> str:
    """The push job: checks, the model card into the job's folder, then the upload; returns "done" or "stopped"."""
    ctx.reporter.start(0, None, f"Checking the token and '{config.repo_id}'…")
    model = check_push(config, ctx.workspace)
    files = plan_files(model, config.what)
    card_dir = ctx.run_dir / "card"
    files.update(model_card.write_card(model, config.repo_id, files, card_dir))
    try:
        result = upload(
            config.repo_id,
            files,
            config.private,
            f"Upload {', '.join(config.what)} of run {model.run_dir.name} (LLM Finetuner)",
            progress_reporter(ctx, config.repo_id),
            ctx.stop,
        )
    except Stopped:
        log.info("push stopped; pushing again skips what the Hub holds already")
        return "stopped"
    write_json(ctx.run_dir / "push.json", result)
    ctx.reporter.progress(ctx.reporter.latest.step, ctx.reporter.latest.total, f"Pushed to {result['url']}", force=True)
    log.info(
        "pushed %s: %d files uploaded, %d already there", result["url"], len(result["uploaded"]), len(result["skipped"])
    )
    return "done"
