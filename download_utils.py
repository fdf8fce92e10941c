"""Model downloads from the Hugging Face Hub: the files training needs, a free-disk check first, progress from
huggingface_hub's own progress bars, resume after a kill, and one clear message per Hub error.

Tokens follow huggingface_hub's conventions (HF_TOKEN, else the token `hf auth login` saved); this module never
writes one. HF_ENDPOINT and HF_HUB_OFFLINE apply as they do for every Hugging Face tool.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runfolder import JobContext, Reporter
from settings import check, option
from workspace import UserError, config_from_dict, shorten_path

log = logging.getLogger(__name__)

# What loading and training read: weights as safetensors, configs, tokenizer files (tokenizer.json, .model,
# vocab/merges .txt) and chat templates (.jinja). Pickled weights (.bin, .pt, .pth) are never fetched: loading one
# can run code, and the safetensors twin that most repos carry is what is loaded.
TRAINING_FILES = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")
# owner/name as the Hub spells them: ASCII letters, digits, '-', '_' and '.', each part starting and ending with a
# letter or digit (so never '.' or '..'), at most 96 characters each.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(f"{_HUB_PART}/{_HUB_PART}")
# Room left beside the files: the cache's metadata, and a disk that is not filled to its last byte.
DISK_MARGIN = 64 * 1024**2
REPORT_EVERY_S = 0.5


@dataclass
class DownloadConfig:
    """Which Hub model to bring into the local Hugging Face cache."""

    repo_id: str = option("", help="The model's Hub id, owner/name (e.g. unsloth/Qwen3-0.6B).", label="Hub id")
    revision: str = option("main", help="Branch, tag or commit to download.", label="Revision")

    def validate(self) -> None:
        check(self)
        check_hub_id(self.repo_id)
        if not str(self.revision).strip():
            raise UserError("No revision given; use main for the newest files.")


def download_config_from_dict(data: dict) -> DownloadConfig:
    return config_from_dict(DownloadConfig, data, "download config")


def check_hub_id(repo_id: str) -> str:
    """The id, trimmed; UserError (one line, the id shown escaped and cut) for anything but owner/name."""
    text = str(repo_id or "").strip()
    if not HUB_ID.fullmatch(text) or ".." in text:
        shown = shorten_path(text).encode("unicode_escape").decode("ascii")  # a newline stays on the error's line
        raise UserError(
            f"'{shown}' is not a Hub id; it has the form owner/name in ASCII letters, digits, '-', '_' and '.' "
            "(e.g. unsloth/Qwen3-0.6B)."
        )
    return text


def model_page(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def hub_error(exc: BaseException, repo_id: str, kind: str = "model") -> UserError:
    """One message a user can act on for whatever the Hub client raised."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = model_page(repo_id) if kind == "model" else f"{constants.ENDPOINT.rstrip('/')}/datasets/{repo_id}"
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, GatedRepoError) or isinstance(cause, GatedRepoError):
        return UserError(
            f"The {kind} '{repo_id}' is gated: its authors must grant you access first. Open {page}, log in and "
            "accept its terms (or request access), then give this app your token: set HF_TOKEN, or run "
            "`hf auth login` once on this machine, and try again."
        )
    if isinstance(exc, RepositoryNotFoundError) or isinstance(cause, RepositoryNotFoundError):
        return UserError(
            f"There is no {kind} '{repo_id}' on the Hub ({constants.ENDPOINT}): check the spelling (owner/name). "
            "If it is private, set HF_TOKEN or run `hf auth login` with an account that can see it."
        )
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"The {kind} '{repo_id}' has no such revision (branch, tag or commit); try main.")
    if constants.HF_HUB_OFFLINE or isinstance(exc, OfflineModeIsEnabled) or isinstance(cause, OfflineModeIsEnabled):
        return UserError(
            f"The {kind} '{repo_id}' is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps this app off "
            "the Hub. Unset HF_HUB_OFFLINE to download it, or choose a cached model or a local folder."
        )
    unreachable = (httpx.TransportError, LocalEntryNotFoundError, ConnectionError)
    if isinstance(exc, unreachable) or isinstance(cause, unreachable):
        return UserError(
            f"The Hugging Face Hub ({constants.ENDPOINT}) cannot be reached, and '{repo_id}' is not in the local "
            "cache. Check the network (or a proxy, or HF_ENDPOINT) and try again, or choose a local folder."
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return UserError(f"The Hub answered {status} for '{repo_id}': {str(exc).splitlines()[0]}. Try again later.")
    return UserError(f"Could not download '{repo_id}': {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- what to fetch and whether it fits


@dataclass(frozen=True)
class DownloadPlan:
    """The files a download takes, from the Hub's metadata."""

    repo_id: str
    commit: str
    total_bytes: int  # every file training needs
    missing_bytes: int  # those not complete in the cache yet
    files: int


def plan_download(repo_id: str, revision: str = "main") -> DownloadPlan:
    """Sizes from the Hub's metadata (a dry run of snapshot_download: no file is written)."""
    from huggingface_hub import snapshot_download

    try:
        infos = snapshot_download(repo_id, revision=revision, allow_patterns=list(TRAINING_FILES), dry_run=True)
    except Exception as exc:  # the Hub client raises many types; hub_error names each
        raise hub_error(exc, repo_id) from None
    sizes = [(info.file_size or 0, info.will_download) for info in infos]
    if not any(info.filename.endswith(".safetensors") for info in infos):
        raise UserError(
            f"'{repo_id}' has no .safetensors weights (only pickled .bin files, which are not loaded: they can run "
            "code). Choose a repo with safetensors, e.g. its Unsloth copy."
        )
    return DownloadPlan(
        repo_id,
        infos[0].commit_hash if infos else revision,
        sum(size for size, _ in sizes),
        sum(size for size, missing in sizes if missing),
        len(infos),
    )


def check_download(repo_id: str, revision: str = "main") -> DownloadPlan:
    """What a job that downloads `repo_id` would refuse, found before the job exists: offline mode, a missing or
    gated repo (the Hub's metadata answers for each file), a disk too small."""
    plan = plan_download(check_hub_id(repo_id), revision)
    check_disk(plan)
    return plan


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_disk(plan: DownloadPlan, folder: Path | None = None) -> None:
    """UserError with the numbers when the files do not fit on the disk of the cache."""
    folder = Path(folder or cache_dir())
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    free = shutil.disk_usage(existing).free
    if plan.missing_bytes + DISK_MARGIN > free:
        raise UserError(
            f"'{plan.repo_id}' needs {_size(plan.missing_bytes)} more on disk, but {existing} has only "
            f"{_size(free)} free. Free some space, or point HF_HOME (or HF_HUB_CACHE) at a larger disk."
        )


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


# ---------------------------------------------------------------- downloading


class Stopped(Exception):
    """Raised from inside a progress update when the user asked to stop; the partial files stay for a resume."""


def progress_bar_class(on_bytes: Callable[[int], None], stop: Callable[[], bool]):
    """A tqdm class for snapshot_download: huggingface_hub sums every file's bytes into its one byte bar (named
    "huggingface_hub.snapshot_download"), whose updates arrive here. It subclasses huggingface_hub's tqdm so that
    the bar's name is passed in; the terminal switches (HF_HUB_DISABLE_PROGRESS_BARS, no TTY) must not turn the
    job's reporting off, so nothing is drawn and every update counts."""
    import os

    from huggingface_hub.utils import tqdm as hub_tqdm
    from tqdm import tqdm as plain_tqdm

    class Bar(hub_tqdm):
        def __init__(self, *args, **kwargs):
            self.bytes_bar = kwargs.pop("name", None) == "huggingface_hub.snapshot_download"
            kwargs["disable"] = False
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the bar)
            plain_tqdm.__init__(self, *args, **kwargs)

        def update(self, n=1):
            if stop():
                raise Stopped
            result = super().update(n)
            if self.bytes_bar:
                on_bytes(int(self.n))
            return result

    return Bar


def download_model(
    repo_id: str,
    revision: str = "main",
    report: Callable[[int, int, float], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> str:
    """Download the files training needs into the Hugging Face cache; returns the snapshot folder.

    report(bytes done, bytes total, bytes per second) is called at most twice a second. A killed download resumes
    where it stopped (the partial `.incomplete` files stay in the cache). Raises Stopped when `stop()` turns true.
    """
    from huggingface_hub import snapshot_download

    repo_id = check_hub_id(repo_id)
    plan = plan_download(repo_id, revision)
    check_disk(plan)
    present = plan.total_bytes - plan.missing_bytes
    started, last = time.monotonic(), float("-inf")

    def on_bytes(fetched: int) -> None:
        nonlocal last
        if report is None or (time.monotonic() - last < REPORT_EVERY_S and fetched < plan.missing_bytes):
            return
        last = time.monotonic()
        rate = fetched / max(last - started, 1e-6)
        report(min(present + fetched, plan.total_bytes), plan.total_bytes, rate)

    log.info(
        "Downloading %s: %d files, %s (%s already here)", repo_id, plan.files, _size(plan.total_bytes), _size(present)
    )
    if report is not None:
        report(present, plan.total_bytes, 0.0)
    try:
        path = snapshot_download(
            repo_id,
            revision=plan.commit,
            allow_patterns=list(TRAINING_FILES),
            tqdm_class=progress_bar_class(on_bytes, stop),
        )
    except Stopped:
        raise
    except OSError as exc:
        if exc.errno == 28:
            raise UserError(
                f"The disk of {cache_dir()} filled up while downloading '{repo_id}'. Free some space and resume."
            ) from None
        raise hub_error(exc, repo_id) from None
    except Exception as exc:  # the Hub client raises many types; hub_error names each
        raise hub_error(exc, repo_id) from None
    remove_orphans(repo_id)
    if report is not None:
        report(plan.total_bytes, plan.total_bytes, 0.0)
    return path


def remove_orphans(repo_id: str) -> None:
    """Delete the partial files a killed download left beside blobs that are complete now.

    huggingface_hub writes each file to `<blob>.<random>.incomplete`, unique to the process, and deletes it on any
    error it sees; a kill -9 leaves it behind, never to be continued or reused (the next download starts that file
    from its first byte under a new name). Once the blob exists no download of it is running (huggingface_hub holds
    the blob's lock while it writes, and skips a blob that exists), so the partial copy is only wasted disk.
    """
    blobs = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "blobs"
    for partial in blobs.glob("*.incomplete"):
        if (blobs / partial.name.split(".")[0]).exists():
            log.info("Removing %s, left by a download that was killed", partial.name)
            partial.unlink(missing_ok=True)


def progress_reporter(reporter: Reporter, repo_id: str) -> Callable[[int, int, float], None]:
    """download_model's `report` as progress events: step / total are bytes done / total, with `bytes_done`,
    `bytes_total`, `rate_bytes_per_s` and `eta_s` (the download job and a training run that downloads its model
    write the same fields)."""

    def report(done: int, total: int, rate: float) -> None:
        left = (total - done) / rate if rate > 0 else None
        message = f"Downloading {repo_id}: {_size(done)} of {_size(total)}" + (f" at {_size(rate)}/s" if rate else "")
        reporter.progress(
            done,
            total,
            message,
            force=done >= total,
            bytes_done=done,
            bytes_total=total,
            rate_bytes_per_s=round(rate, 1),
            eta_s=round(left, 1) if left is not None else None,  # from the rate: bytes resumed are not this pace
        )

    return report


def download_for_job(repo_id: str, ctx: JobContext) -> str | None:
    """Download a model a job needs (training), its bytes in the job's own progress; None when stopped."""
    try:
        return download_model(repo_id, report=progress_reporter(ctx.reporter, repo_id), stop=ctx.stop)
    except Stopped:
        return None


def download_job(config: DownloadConfig, ctx: JobContext) -> str:
    """The download stage: bytes done / total, rate and ETA as progress events; stop keeps what was fetched."""
    config.validate()
    ctx.reporter.start(0, None, f"Asking the Hub about {config.repo_id}…")
    try:
        path = download_model(
            config.repo_id, config.revision, progress_reporter(ctx.reporter, config.repo_id), ctx.stop
        )
    except Stopped:
        return "stopped"
    ctx.reporter.progress(ctx.reporter.latest.step, ctx.reporter.latest.total, f"Ready in {path}", force=True)
    log.info("Downloaded %s to %s", config.repo_id, path)
    return "done"
