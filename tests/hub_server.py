"""A small Hub-compatible HTTP server on 127.0.0.1 for end-to-end tests of the real huggingface_hub client.

It implements the endpoints of ../shared/HUB_PROTOCOL.md (create repo, whoami, repo info, tree, preupload,
commit, resolve) with state per instance, token checks, and fault injection: `faults` is a list of
`Fault(method, path_contains, status | "drop" | "timeout", times)` consumed in order as requests match.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    """Answer matching requests with an HTTP `status`, or "drop" (close mid-request) or "timeout" (stall)."""

    method: str
    path_contains: str
    action: int | str
    times: int = 1


@dataclass
class Repo:
    private: bool = False
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    @property
    def head(self) -> tuple[str, dict[str, bytes]]:
        return self.commits[-1]


class HubState:
    def __init__(self, token: str | None = None, user: str = "tester"):
        self.token = token
        self.user = user  # whoami's name: the namespace of bare repo ids ("name" -> "tester/name")
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.counter = 0

    def new_sha(self, seed: str) -> str:
        self.counter += 1
        return hashlib.sha1(f"{seed}-{self.counter}-{time.time_ns()}".encode()).hexdigest()

    def create(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(private=private)
        repo.commits.append((self.new_sha(repo_id), {".gitattributes": b"*.safetensors filter=lfs\n"}))
        self.repos[repo_id] = repo
        return repo


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, *args):  # keep test output quiet
        pass

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict[str, str] | None = None, body: bytes | None = None):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.state.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _fault(self) -> bool:
        with self.state.lock:
            self.state.requests.append((self.command, self.path, dict(self.headers)))
            for fault in self.state.faults:
                if fault.times > 0 and fault.method == self.command and fault.path_contains in self.path:
                    fault.times -= 1
                    action = fault.action
                    break
            else:
                return False
        if action == "drop":
            self._body()
            self.close_connection = True
            self.connection.close()
            return True
        if action == "timeout":
            time.sleep(self.server.timeout_seconds)
            self.close_connection = True
            return True
        self._body()
        self._send(int(action), {"error": f"injected {action}"})
        return True

    # -- routing ---------------------------------------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        if self._fault():
            return
        url = urlparse(self.path)
        path = unquote(url.path)
        if path == "/api/whoami-v2":
            if not self._authorized() or self.state.token is None and not self.headers.get("Authorization"):
                return self._send(401, {"error": "Invalid credentials"})
            user = {"name": self.state.user, "type": "user", "orgs": [{"name": "org"}], "auth": {}}
            return self._send(200, user)
        if path.startswith("/api/models/"):
            return self._api_models_get(path[len("/api/models/") :], parse_qs(url.query))
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return self._send(404, {"error": "not found"})

    def do_POST(self):
        if self._fault():
            return
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials"})
        if path == "/api/repos/create":
            data = json.loads(body or b"{}")
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            url = f"{self.server.endpoint}/{repo_id}"
            with self.state.lock:
                if repo_id in self.state.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": url})
                private = bool(data.get("private")) or data.get("visibility") == "private"
                self.state.create(repo_id, private=private)
            return self._send(200, {"url": url, "name": repo_id})
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :].split("/")
            repo_id, action, _rev = "/".join(rest[:2]), rest[2] if len(rest) > 2 else "", "/".join(rest[3:])
            repo = self.state.repos.get(repo_id)
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "preupload":
                files = json.loads(body)["files"]
                current = repo.head[1]
                answer = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None,
                    }
                    for f in files
                ]
                return self._send(200, {"files": answer})
            if action == "commit":
                return self._commit(repo_id, repo, body)
        return self._send(404, {"error": "not found"})

    def _commit(self, repo_id: str, repo: Repo, body: bytes):
        files = dict(repo.head[1])
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
        with self.state.lock:
            sha = self.state.new_sha(repo_id)
            repo.commits.append((sha, files))
        return self._send(200, {"commitOid": sha, "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{sha}"})

    def _lookup(self, repo_id: str, rev: str):
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return None, None, None
        if repo.private and not self._authorized():
            return None, None, None
        for sha, files in reversed(repo.commits):
            if rev in ("main", sha):
                return repo, sha, files
        return repo, None, None

    def _api_models_get(self, rest: str, query: dict):
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        tail = parts[2:]
        rev = "main"
        if tail[:1] == ["revision"]:
            rev, tail = "/".join(tail[1:]), []
        elif tail[:1] == ["tree"]:
            rev = tail[1]
        repo, sha, files = self._lookup(repo_id, rev)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if sha is None:
            return self._send(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        if not tail:
            return self._send(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                    "tags": [],
                },
            )
        prefix = "/".join(tail[2:]).strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, dirs = [], set()
        for name in sorted(files):
            if prefix and not name.startswith(prefix + "/"):
                continue
            relative = name[len(prefix) + 1 :] if prefix else name
            if "/" in relative and not recursive:
                dirs.add((prefix + "/" if prefix else "") + relative.split("/")[0])
                continue
            if recursive:
                pieces = name.split("/")
                for i in range(1, len(pieces)):
                    d = "/".join(pieces[:i])
                    if not prefix or d.startswith(prefix + "/"):
                        dirs.add(d)
            data = files[name]
            entries.append({"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)})
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        return self._send(200, entries)

    def _resolve(self, repo_id: str, rev: str, path: str):
        repo, sha, files = self._lookup(repo_id, rev)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if sha is None:
            return self._send(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        if path not in files:
            return self._send(
                404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
            )
        data = files[path]
        return self._send(200, headers={"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'}, body=data)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0, token: str | None = None, timeout_seconds: float = 3.0):
        super().__init__(("127.0.0.1", port), Handler)
        self.state = HubState(token=token)
        self.timeout_seconds = timeout_seconds
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def reset(self, token: str | None = None) -> None:
        self.state = HubState(token=token)
