"""A small Hugging Face Hub stand-in on 127.0.0.1 for the push tests: the HTTP endpoints that
huggingface_hub's create_repo, create_branch and upload_folder use, storing commits in memory."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubState:
    def __init__(self, fail_with: int | None = None):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.fail_with = fail_with
        self.requests: list[str] = []
        self.authorization: list[str | None] = []


def make_handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, code: int, payload=None):
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _handle(self):
            state.requests.append(f"{self.command} {self.path}")
            state.authorization.append(self.headers.get("Authorization"))
            body = self._body() if self.command in ("POST", "PUT") else b""
            if state.fail_with:
                return self._send(state.fail_with, {"error": "internal error"})
            path = self.path.split("?")[0]
            if self.command == "POST" and path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request.get('organization') or 'user'}/{request['name']}" if "/" not in request["name"] else request["name"]
                private = request.get("private") is True or request.get("visibility") == "private"
                state.repos.setdefault(repo_id, {"private": private, "branches": {"main": {}}})
                return self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
            if self.command == "POST" and path == "/api/validate-yaml":  # model card metadata check
                return self._send(200, {"errors": [], "warnings": []})
            parts = path.split("/")
            if path.startswith("/api/models/") and len(parts) >= 6:
                repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:]) or "main"
                repo = state.repos.get(repo_id)
                if repo is None:
                    return self._send(404, {"error": "repo not found"})
                if action == "branch":
                    repo["branches"].setdefault(revision, dict(repo["branches"]["main"]))
                    return self._send(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if action == "commit":
                    branch = repo["branches"].setdefault(revision.replace("%2F", "/"), {})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            branch[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    url = f"http://{self.headers['Host']}/{repo_id}/commit/0123456789abcdef"
                    return self._send(200, {"commitUrl": url, "commitOid": "0123456789abcdef0123456789abcdef01234567"})
            return self._send(404, {"error": f"not implemented: {self.command} {path}"})

        do_GET = do_POST = do_PUT = do_HEAD = _handle

    return Handler


class HubServer:
    def __init__(self, fail_with: int | None = None):
        self.state = HubState(fail_with)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
