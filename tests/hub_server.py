"""An in-memory Hugging Face Hub for tests, on 127.0.0.1 at a random port.

Why our own: PyPI has no maintained Hub server that runs offline (`hf-local-hub` 3.0.0 is a client that
starts a Go binary its wheel does not ship), and huggingface_hub has none. This one answers exactly the
HTTP calls that huggingface_hub 1.33 makes for `medcot.push` (read from its hf_api.py and _commit_api.py):

    GET  /api/whoami-v2                                   token -> user, orgs, token role / fine-grained scopes
    POST /api/repos/create                                {name, organization, visibility}
    GET  /api/models/{repo}[/revision/{rev}]              repo info with siblings
    POST /api/models/{repo}/preupload/{rev}               every file "regular": no LFS or Xet storage needed
    POST /api/models/{repo}/paths-info/{rev}              form-encoded paths -> size and git oid
    POST /api/models/{repo}/commit/{rev}                  ndjson: header, file (base64), deletedFile/Folder
    POST /api/validate-yaml                               model card front matter must parse
    GET|HEAD /{repo}/resolve/{rev}/{path}                 file bytes with X-Repo-Commit and ETag

Anything else is answered 501 naming the route, so a huggingface_hub upgrade that calls something new
fails loudly. `fail_commits` injects errors: {2: 500} answers the 2nd commit request with a 500 and
changes nothing. Use it as a context manager and point huggingface_hub at `server.url` (HF_ENDPOINT in a
subprocess, or `endpoint=`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


def git_oid(data: bytes) -> str:
    """git's blob sha1, which the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Commit:
    oid: str
    summary: str
    paths: list[str]  # files added or changed by this commit


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    created_at: str = field(default_factory=_now)

    @property
    def sha(self) -> str:
        return self.commits[-1].oid

    def commit(self, summary: str, added: dict[str, bytes], deleted: list[str] = ()) -> Commit:
        for path in deleted:
            self.files = {p: b for p, b in self.files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        self.files.update(added)
        parent = self.commits[-1].oid if self.commits else ""
        oid = hashlib.sha1(json.dumps([parent, summary, sorted(added), len(self.commits)]).encode()).hexdigest()
        commit = Commit(oid=oid, summary=summary, paths=sorted(added))
        self.commits.append(commit)
        return commit


class _Answer(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


class HubServer:
    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}  # token -> whoami-v2 payload
        self.repos: dict[str, Repo] = {}
        self.fail_commits: dict[int, int] = {}  # n-th commit request (1-based, all repos) -> status to answer
        self.commit_requests = 0
        self.requests: list[str] = []  # "METHOD /path", in order
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- test setup -------------------------------------------------------------------------------

    def add_token(self, token: str, user: str, *, role: str = "write", orgs: dict[str, str] | None = None,
                  scoped: list[dict[str, Any]] | None = None, global_permissions: list[str] | None = None) -> None:
        """A token of `user` with `role` read/write/fineGrained; `orgs` maps org name -> roleInOrg;
        `scoped` are fine-grained entries like {"entity": {"type": "org", "name": "lab"}, "permissions": [...]}."""
        access: dict[str, Any] = {"displayName": f"{role}-token", "role": role, "createdAt": _now()}
        if role == "fineGrained":
            access["fineGrained"] = {"canReadGatedRepos": False, "global": list(global_permissions or []),
                                     "scoped": list(scoped or [])}
        self.tokens[token] = {
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
            "fullname": user.title(), "email": f"{user}@example.org", "emailVerified": True, "isPro": False,
            "orgs": [{"type": "org", "name": name, "fullname": name, "roleInOrg": r} for name, r in (orgs or {}).items()],
            "auth": {"type": "access_token", "accessToken": access},
        }

    def seed_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        """A repo that someone else made, with its own files."""
        repo = Repo(repo_id=repo_id, private=private)
        repo.commit("initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        repo.commit("Upload files", dict(files))
        self.repos[repo_id] = repo
        return repo

    # ---- permissions, as the Hub applies them -------------------------------------------------------

    def _who(self, headers: Any) -> dict[str, Any] | None:
        auth = headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        return self.tokens.get(token) if token else None

    @staticmethod
    def can_write(who: dict[str, Any] | None, repo_id: str) -> bool:
        if who is None:
            return False
        namespace = repo_id.split("/")[0]
        access = who["auth"]["accessToken"]
        if access["role"] == "fineGrained":
            grants = access["fineGrained"]
            return "repo.write" in grants["global"] or any(
                "repo.write" in s["permissions"] and s["entity"]["name"] in (namespace, repo_id) for s in grants["scoped"]
            )
        orgs = {o["name"]: o["roleInOrg"] for o in who["orgs"]}
        member = namespace == who["name"] or orgs.get(namespace) in ("admin", "write", "contributor")
        return access["role"] in ("write", "admin") and member

    @staticmethod
    def can_read(who: dict[str, Any] | None, repo: Repo) -> bool:
        if not repo.private:
            return True
        namespace = repo.repo_id.split("/")[0]
        return who is not None and (namespace == who["name"] or namespace in {o["name"] for o in who["orgs"]})

    def _repo(self, repo_id: str, who: dict[str, Any] | None, rev: str | None = None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or not self.can_read(who, repo):
            raise _Answer(404, "Repository not found", "RepoNotFound")
        if rev is not None and unquote(rev) not in ("main", repo.sha):
            raise _Answer(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return repo

    def _writable_repo(self, repo_id: str, who: dict[str, Any] | None, rev: str) -> Repo:
        repo = self._repo(repo_id, who, rev)
        if not self.can_write(who, repo_id):
            raise _Answer(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---- routes -----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(f"{method} {path}")
            who = self._who(headers)
            for pattern, handler_method, handler in self._routes:
                match = re.fullmatch(pattern, path)
                if match and method in handler_method:
                    try:
                        return handler(self, who, body, method=method, **match.groupdict())
                    except _Answer as a:
                        extra = {"X-Error-Message": a.message}
                        if a.error_code:
                            extra["X-Error-Code"] = a.error_code
                        return _json(a.status, {"error": a.message}, extra)
            return _json(501, {"error": f"{method} {path} is not implemented by tests/hub_server.py"})

    def _whoami(self, who, body, **_):
        if who is None:
            raise _Answer(401, "Invalid credentials in Authorization header")
        return _json(200, who)

    def _create(self, who, body, **_):
        if who is None:
            raise _Answer(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or who['name']}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise _Answer(400, "tests/hub_server.py serves model repos only")
        if not self.can_write(who, repo_id):
            raise _Answer(403, f"You don't have the rights to create a model under the namespace \"{repo_id.split('/')[0]}\"")
        if repo_id in self.repos:
            raise _Answer(409, "You already created this model repo")
        repo = Repo(repo_id=repo_id, private=payload.get("visibility") == "private")
        repo.commit("initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self.repos[repo_id] = repo
        return _json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo.sha[:24]})

    def _info(self, who, body, repo, rev=None, **_):
        r = self._repo(repo, who, rev)
        return _json(200, {
            "id": r.repo_id, "modelId": r.repo_id, "author": r.repo_id.split("/")[0], "sha": r.sha,
            "private": r.private, "disabled": False, "gated": False, "createdAt": r.created_at,
            "lastModified": _now(), "tags": [], "siblings": [{"rfilename": p} for p in sorted(r.files)],
        })

    def _preupload(self, who, body, repo, rev, **_):
        r = self._writable_repo(repo, who, rev)
        files = json.loads(body)["files"]
        return _json(200, {"commitOid": r.sha, "files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_oid(r.files[f["path"]]) if f["path"] in r.files else None}
            for f in files
        ]})

    def _paths_info(self, who, body, repo, rev, **_):
        r = self._repo(repo, who, rev)
        form = parse_qs(body.decode())
        return _json(200, [
            {"type": "file", "path": p, "size": len(r.files[p]), "oid": git_oid(r.files[p])}
            for p in form.get("paths", []) if p in r.files
        ])

    def _commit(self, who, body, repo, rev, **_):
        self.commit_requests += 1
        if self.commit_requests in self.fail_commits:
            raise _Answer(self.fail_commits[self.commit_requests], "injected failure (tests/hub_server.py)")
        r = self._writable_repo(repo, who, rev)
        summary, added, deleted = "", {}, []
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _Answer(400, f"commit op {item['key']!r}: this test Hub takes regular files only")
        commit = r.commit(summary, added, deleted)
        return _json(200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.url}/{r.repo_id}/commit/{commit.oid}",
                           "hookOutput": ""})

    def _validate_yaml(self, who, body, **_):
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        if match is None:
            return _json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            return _json(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _resolve(self, who, body, repo, rev, path, method, **_):
        r = self._repo(repo, who, rev)
        data = r.files.get(unquote(path))
        if data is None:
            raise _Answer(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": r.sha, "ETag": f'"{git_oid(data)}"', "Content-Length": str(len(data)),
                   "Content-Type": "application/octet-stream"}
        return 200, headers, b"" if method == "HEAD" else data

    _routes = [
        (r"/api/whoami-v2", ("GET",), _whoami),
        (r"/api/repos/create", ("POST",), _create),
        (r"/api/validate-yaml", ("POST",), _validate_yaml),
        (rf"/api/models/{_REPO}(?:/revision/{_REV})?", ("GET",), _info),
        (rf"/api/models/{_REPO}/preupload/{_REV}", ("POST",), _preupload),
        (rf"/api/models/{_REPO}/paths-info/{_REV}", ("POST",), _paths_info),
        (rf"/api/models/{_REPO}/commit/{_REV}", ("POST",), _commit),
        (rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", ("GET", "HEAD"), _resolve),
    ]


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, headers, payload = server.handle(self.command, urlsplit(self.path).path, self.headers, body)
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(payload)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:  # requests are kept in server.requests
            pass

    return Handler
