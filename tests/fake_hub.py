"""A local server speaking the Hugging Face Hub's HTTP API, for `huggingface_hub` and `datasets` via HF_ENDPOINT.

Why not a package: `hf-local-hub` (PyPI 3.0.0, the one maintained candidate) is a thin Python wrapper whose
server is a Go binary missing from its wheel, so `serve_background()` cannot start here; it also has no gated
repos. This serves exactly the endpoints the installed clients call (found by logging every request they made):

- GET  /api/{models|datasets}/<repo>[/revision/<rev>]      repo_info / model_info / dataset_info
- GET  /api/{models|datasets}/<repo>/tree/<rev>[/<path>]   list_repo_tree (snapshot_download, HfFileSystem)
- POST /api/{models|datasets}/<repo>/paths-info/<rev>      HfFileSystem.info
- HEAD/GET [/datasets]/<repo>/resolve/<rev>/<file>         file metadata and bytes, with Range (resumed downloads)

and the upload endpoints, as huggingface_hub's HfApi calls them (create_repo, preupload_lfs_files, create_commit):

- GET  /api/whoami-v2                                      who a token belongs to (`users`: token → answer)
- POST /api/repos/create                                   a repo in the token's namespace or one of its orgs
- POST /api/models/<repo>/preupload/<rev>                  upload mode per file: lfs for weights, regular (inline)
- POST /<repo>.git/info/lfs/objects/batch                  LFS "basic" transfer: an upload URL here, or no action
                                                           for an object stored already (the client skips it)
- PUT  /lfs-upload/<oid>                                   the object's bytes, checked against its SHA-256
- POST /api/models/<repo>/commit/<rev>                     the ndjson commit: inline files and stored LFS objects

Writes need a token whose user may write to the repo's owner (403 otherwise), as on the Hub; a repo name the Hub
refuses gets its 400. `lfs_uploads` lists the objects whose bytes arrived, `commits` each commit's paths.

Errors carry the Hub's `X-Error-Code` header (RepoNotFound, GatedRepo, EntryNotFound), which is what the client
turns into RepositoryNotFoundError, GatedRepoError and EntryNotFoundError; as on the Hub, a gated repo's metadata
is public and its files need a granted token. `rate` slows file bodies (bytes per second) so a test can watch
progress or kill a download half-way; `ranged` lists the file requests that asked for a byte range (a resume).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".gguf")


@dataclass
class Repo:
    folder: Path
    kind: str = "model"  # "model" or "dataset"
    gated: bool = False  # files served only to a request with one of FakeHub.tokens
    extra_info: dict = field(default_factory=dict)  # merged into the repo_info answer (e.g. safetensors totals)

    def files(self) -> list[Path]:
        return sorted(path for path in self.folder.rglob("*") if path.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FakeHub:
    """Serve repos on 127.0.0.1 in a thread; `url` is what HF_ENDPOINT takes."""

    def __init__(
        self,
        rate: float | None = None,
        tokens: tuple[str, ...] = (),
        users: dict[str, dict] | None = None,
        storage: Path | None = None,
    ) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.rate = rate
        self.tokens = tokens
        self.users = users or {}  # token → the whoami-v2 answer (see `user`)
        self.storage = Path(storage or tempfile.mkdtemp(prefix="fake-hub-"))  # created repos and LFS objects
        self.requests: list[str] = []
        self.ranged: list[str] = []  # paths of the file requests that asked for a Range (a resumed file)
        self.lfs_uploads: list[str] = []  # oids whose bytes were PUT
        self.commits: list[list[str]] = []  # the paths of each commit
        self.fail_commits = 0  # answer this many commits with a 500, as a Hub outage would (the uploads stay)
        self._hashes: dict[tuple[Path, int, int], str] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_POST(self) -> None:
                hub._handle(self, body=True)

            def do_PUT(self) -> None:
                hub._handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo_id: str, folder: Path, kind: str = "model", gated: bool = False, **extra_info) -> None:
        self.repos[(kind, repo_id)] = Repo(Path(folder), kind, gated, extra_info)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------ answers

    def _sha(self, path: Path, git: bool = False) -> str:
        """The file's SHA-256, or its git blob id (a pushed file may replace it: keyed by its mtime and size too)."""
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size, git)
        if key not in self._hashes:
            if git:
                self._hashes[key] = hashlib.sha1(b"blob %d\0" % stat.st_size + path.read_bytes()).hexdigest()
            else:
                self._hashes[key] = _sha256(path)
        return self._hashes[key]

    def _entry(self, repo: Repo, path: Path) -> dict:
        relative = path.relative_to(repo.folder).as_posix()
        size = path.stat().st_size
        entry = {"type": "file", "oid": self._sha(path, git=True), "size": size, "path": relative}
        if path.suffix in LFS_SUFFIXES:
            entry["lfs"] = {"oid": self._sha(path), "size": size, "pointerSize": 134}
        return entry

    def _info(self, repo_id: str, repo: Repo) -> dict:
        siblings = []
        for path in repo.files():
            entry = self._entry(repo, path)
            sibling = {"rfilename": entry["path"], "size": entry["size"], "blobId": entry["oid"]}
            if "lfs" in entry:
                sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": repo_id,
            "id": repo_id,
            "sha": COMMIT,
            "private": repo.extra_info.get("private", False),
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "tags": [],
            "siblings": siblings,
            "cardData": {},
            **repo.extra_info,
        }

    def _handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{request.command} {request.path}")
        parsed = urlparse(request.path)
        parts = [unquote(part) for part in parsed.path.strip("/").split("/")]
        query = parse_qs(parsed.query)
        if parts == ["api", "whoami-v2"]:
            user = self.users.get(self._token(request))
            if user is None:
                return self._error(request, 401, "Unauthorized", "Invalid credentials in Authorization header")
            return self._json(request, user, body)
        if parts == ["api", "repos", "create"]:
            return self._create_repo(request)
        if parts == ["api", "validate-yaml"]:  # create_commit asks it about a README.md's metadata header
            return self._validate_yaml(request, json.loads(self._body(request))["content"])
        if parts[:1] == ["lfs-upload"] and request.command == "PUT":
            return self._lfs_put(request, parts[1])
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(request, f"{parts[0]}/{parts[1].removesuffix('.git')}")
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            kind, repo_id = parts[1][:-1], "/".join(parts[2:4])
            repo = self._repo(request, kind, repo_id, files=False)
            if repo is None or not self._may_write(request, repo_id):
                return None
            payload = self._body(request)
            if parts[4] == "preupload":
                return self._preupload(request, json.loads(payload))
            return self._commit(request, repo_id, repo, payload)
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            # /api/models/<repo> (no revision) is the info of the default branch
            kind, repo_id = parts[1][:-1], "/".join(parts[2:4])
            action, rest = (parts[4], parts[5:]) if len(parts) > 4 else ("revision", [])
            repo = self._repo(request, kind, repo_id, files=False)
            if repo is None:
                return
            if action == "revision":
                return self._json(request, self._info(repo_id, repo), body)
            if action == "tree":
                prefix = "/".join(rest[1:])
                return self._json(request, self._tree(repo, prefix, "recursive" in query), body)
            if action == "paths-info":
                length = int(request.headers.get("Content-Length") or 0)
                form = parse_qs(request.rfile.read(length).decode()) if length else {}
                wanted = form.get("paths", [])
                return self._json(request, self._paths_info(repo, wanted), body)
            return self._error(request, 404, "EntryNotFound", f"No such endpoint {parsed.path}")
        kind = "model"
        if parts[:1] == ["datasets"]:
            kind, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            repo = self._repo(request, kind, repo_id, files=True)
            if repo is None:
                return
            return self._file(request, repo, "/".join(parts[4:]), body)
        self._error(request, 404, "RepoNotFound", f"Not found: {parsed.path}")

    # ------------------------------------------------------------ uploads

    @staticmethod
    def _token(request) -> str:
        return (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()

    def _body(self, request) -> bytes:
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(request.rfile.readline().strip() or b"0", 16):
                data += request.rfile.read(size)
                request.rfile.readline()
            request.rfile.readline()
            return data
        return request.rfile.read(int(request.headers.get("Content-Length") or 0))

    def _may_write(self, request, repo_id: str) -> bool:
        """Whether the request's token may write to the repo's owner (a 403 / 401 answer otherwise, as the Hub's)."""
        user = self.users.get(self._token(request))
        if user is None:
            self._error(request, 401, "Unauthorized", "Invalid credentials in Authorization header")
            return False
        owner = repo_id.split("/")[0]
        orgs = {org["name"]: org.get("roleInOrg") for org in user.get("orgs", [])}
        role = user.get("auth", {}).get("accessToken", {}).get("role", "write")
        if role == "read" or (owner != user["name"] and orgs.get(owner, "read") == "read"):
            self._error(request, 403, "Forbidden", f"You don't have the rights to write to {repo_id}")
            return False
        return True

    def _create_repo(self, request) -> None:
        payload = json.loads(self._body(request))
        owner = payload.get("organization") or (self.users.get(self._token(request)) or {}).get("name", "")
        repo_id, name = f"{owner}/{payload['name']}", payload["name"]
        if not self._may_write(request, repo_id):
            return None
        if not re.fullmatch(r"[\w.-]{1,96}", name) or "--" in name or ".." in name or name.endswith(".git"):
            return self._error(request, 400, "BadRequest", "Invalid repo name")
        if ("model", repo_id) in self.repos:  # the Hub's 409 names the repo's URL, which create_repo returns
            answer = {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            return self._json(request, answer, True, status=409)
        folder = self.storage / "repos" / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        self.add(repo_id, folder, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._json(request, {"url": f"{self.url}/{repo_id}", "name": repo_id}, True)

    def _validate_yaml(self, request, content: str) -> None:
        """The card's metadata header must be a YAML mapping whose list fields are lists (the Hub checks more)."""
        import yaml

        try:
            header = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
        except (yaml.YAMLError, IndexError) as exc:
            return self._json(request, {"errors": [{"message": f"Invalid YAML: {exc}"}]}, True, status=400)
        if not isinstance(header, dict):
            return self._json(request, {"errors": [{"message": "The metadata is not a mapping"}]}, True, status=400)
        errors = [
            {"message": f"'{key}' must be a list"}
            for key in ("tags", "datasets")
            if key in header and not isinstance(header[key], list)
        ]
        if errors:
            return self._json(request, {"errors": errors}, True, status=400)
        return self._json(request, {"errors": [], "warnings": []}, True)

    def _preupload(self, request, payload: dict) -> None:
        files = [
            {
                "path": item["path"],
                "uploadMode": "lfs" if item["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for item in payload["files"]
        ]
        return self._json(request, {"files": files, "commitOid": COMMIT}, True)

    def _lfs_batch(self, request, repo_id: str) -> None:
        if self._repo(request, "model", repo_id, files=False) is None or not self._may_write(request, repo_id):
            return None
        payload = json.loads(self._body(request))
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if not (self.storage / "lfs" / item["oid"]).is_file():  # stored already: no action, nothing to send
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}", "header": {}}}
            objects.append(entry)
        return self._json(request, {"transfer": "basic", "objects": objects}, True)

    def _lfs_put(self, request, oid: str) -> None:
        data = self._body(request)
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(request, 400, "BadRequest", "The uploaded content does not match its SHA-256")
        (self.storage / "lfs").mkdir(parents=True, exist_ok=True)
        (self.storage / "lfs" / oid).write_bytes(data)
        self.lfs_uploads.append(oid)
        request.send_response(200)
        request.send_header("Content-Length", "0")
        request.end_headers()
        return None

    def _commit(self, request, repo_id: str, repo: Repo, payload: bytes) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            return self._error(request, 500, "InternalError", "Internal Error - We're working hard to fix this")
        lines = [json.loads(line) for line in payload.splitlines() if line.strip()]
        paths = []
        for line in lines:
            value = line["value"]
            if line["key"] not in ("file", "lfsFile"):
                continue
            if line["key"] == "file":
                content = base64.b64decode(value["content"])
            else:
                blob = self.storage / "lfs" / value["oid"]
                if not blob.is_file():
                    return self._error(request, 400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                content = blob.read_bytes()
            target = repo.folder / value["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            paths.append(value["path"])
        self.commits.append(paths)
        oid = hashlib.sha1(payload).hexdigest()
        answer = {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        return self._json(request, answer, True)

    def _repo(self, request, kind: str, repo_id: str, files: bool) -> Repo | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            # Like the Hub: an anonymous request for a repo that does not exist gets 401 RepoNotFound.
            self._error(request, 401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and files:  # like the Hub: a gated repo's metadata is public, its files are not
            token = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if token not in self.tokens:
                code = 401 if not token else 403
                self._error(
                    request,
                    code,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                )
                return None
        return repo

    def _tree(self, repo: Repo, prefix: str, recursive: bool) -> list[dict]:
        base = repo.folder / prefix if prefix else repo.folder
        if recursive:
            paths = [path for path in base.rglob("*")]
        else:
            paths = list(base.iterdir()) if base.is_dir() else []
        entries = []
        for path in sorted(paths):
            if path.is_dir():
                entries.append(
                    {"type": "directory", "oid": "0" * 40, "size": 0, "path": path.relative_to(repo.folder).as_posix()}
                )
            else:
                entries.append(self._entry(repo, path))
        return entries

    def _paths_info(self, repo: Repo, wanted: list[str]) -> list[dict]:
        entries = []
        for name in wanted:
            path = repo.folder / name
            if path.is_file():
                entries.append(self._entry(repo, path))
            elif path.is_dir():
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": name})
        return entries

    def _file(self, request, repo: Repo, name: str, body: bool) -> None:
        path = repo.folder / name
        if not path.is_file() or ".." in Path(name).parts:
            return self._error(request, 404, "EntryNotFound", f"{name} does not exist on this revision")
        size = path.stat().st_size
        entry = self._entry(repo, path)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        start, status = 0, 200
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes="):
            self.ranged.append(request.path)
            first = ranged.removeprefix("bytes=").split("-")[0]
            start, status = int(first or 0), 206
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Length": str(size - start),
            "Content-Type": "application/octet-stream",
        }
        if "lfs" in entry:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(size)
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        if not body:
            return
        chunk = 64 * 1024
        with open(path, "rb") as handle:
            handle.seek(start)
            try:
                while block := handle.read(chunk):
                    request.wfile.write(block)
                    if self.rate:
                        time.sleep(len(block) / self.rate)
            except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-download
                return

    def _json(self, request, data, body: bool, status: int = 200) -> None:
        payload = json.dumps(data).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if body:
            request.wfile.write(payload)

    def _error(self, request, code: int, error_code: str, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        request.send_response(code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        request.send_header("X-Error-Code", error_code)
        request.send_header("X-Error-Message", message)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)


def user(name: str, orgs: dict[str, str] | None = None, role: str = "write") -> dict:
    """A whoami-v2 answer: the user, its organizations (name → roleInOrg) and the token's role (write, read)."""
    return {
        "type": "user",
        "name": name,
        "orgs": [{"type": "org", "name": org, "roleInOrg": org_role} for org, org_role in (orgs or {}).items()],
        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
    }


def small_model(demo_model: Path, folder: Path) -> Path:
    """A repo to serve that trains in a second: the demo model's tokenizer and chat template on a two-layer model
    with random weights (25 MB of safetensors, so the client reports its bytes a few times on the way). Made once
    into `folder`; tests of several modules share it."""
    import shutil

    if (folder / "model.safetensors").exists():
        return folder

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(demo_model)
    config.update(
        {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
        | {"num_key_value_heads": 1, "head_dim": 64}
    )
    torch.manual_seed(0)
    partial = folder.with_name(folder.name + ".partial")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(partial)
    for path in demo_model.iterdir():
        if path.name.startswith("tokenizer") or path.suffix == ".jinja":
            shutil.copy(path, partial / path.name)
    partial.rename(folder)
    return folder


def serve_forever(folders: dict[str, str], rate: float | None = None) -> None:
    """`python tests/fake_hub.py OWNER/NAME=FOLDER …` serves folders (a `datasets:` prefix for a dataset repo)."""
    hub = FakeHub(rate=rate)
    for repo_id, folder in folders.items():
        kind = "dataset" if repo_id.startswith("datasets:") else "model"
        hub.add(repo_id.removeprefix("datasets:"), Path(folder), kind)
    with hub:
        print(hub.url, flush=True)
        hub.thread.join()


if __name__ == "__main__":
    import sys

    serve_forever(dict(item.split("=", 1) for item in sys.argv[1:]))
