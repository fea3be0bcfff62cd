"""`gl-nvidia update --pr` against a local server speaking the GitHub REST endpoints it uses."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from gl_nvidia.cli import main
from tests.fixtures.aptrepo import SigningKey, sign_repo

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "catalog"
OWNER, NAME, TOKEN = "gardenlinux", "gardenlinux-nvidia-installer", "ghs_test_token"


class FakeGitHub:
    """State of one repository; responses follow GitHub's documented shapes and status codes."""

    def __init__(self) -> None:
        self.base_url = ""
        self.commits: dict[str, dict[str, Any]] = {}
        self.trees: dict[str, dict[str, str]] = {}  # sha -> path -> content
        root_tree = self._sha("tree", "")
        self.trees[root_tree] = {"README.md": "# gl-nvidia\n"}
        main_sha = self._sha("commit", "initial")
        self.commits[main_sha] = {"tree": root_tree, "parents": [], "message": "initial"}
        self.refs: dict[str, str] = {"heads/main": main_sha}
        self.pulls: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        # (method, path below the repository) -> what that call answers instead: (status, raw body)
        self.answers: dict[tuple[str, str], tuple[int, bytes]] = {}

    @staticmethod
    def _sha(kind: str, text: str) -> str:
        return hashlib.sha1(f"{kind}:{text}".encode()).hexdigest()

    def api(self, path: str) -> str:
        return f"{self.base_url}/repos/{OWNER}/{NAME}{path}"

    def ref_body(self, name: str) -> dict[str, Any]:
        sha = self.refs[name]
        return {"ref": f"refs/{name}", "node_id": "REF_x", "url": self.api(f"/git/refs/{name}"),
                "object": {"sha": sha, "type": "commit", "url": self.api(f"/git/commits/{sha}")}}

    def pull_body(self, pr: dict[str, Any]) -> dict[str, Any]:
        return {"url": self.api(f"/pulls/{pr['number']}"), "id": 1000 + pr["number"], "number": pr["number"],
                "state": pr["state"], "title": pr["title"], "body": pr["body"],
                "html_url": f"https://github.com/{OWNER}/{NAME}/pull/{pr['number']}",
                "head": {"label": f"{OWNER}:{pr['head']}", "ref": pr["head"], "sha": self.refs[f"heads/{pr['head']}"]},
                "base": {"label": f"{OWNER}:{pr['base']}", "ref": pr["base"], "sha": self.refs[f"heads/{pr['base']}"]}}

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        prefix = f"/repos/{OWNER}/{NAME}"
        if not path.startswith(prefix):
            return 404, {"message": "Not Found"}
        rest = path[len(prefix):]
        self.calls.append((method, rest))
        if (method, rest) in self.answers:
            return self.answers[(method, rest)]
        if method == "GET" and rest == "":
            return 200, {"id": 1, "name": NAME, "full_name": f"{OWNER}/{NAME}", "default_branch": "main"}
        if method == "GET" and (m := re.fullmatch(r"/git/ref/(heads/.+)", rest)):
            if m.group(1) not in self.refs:
                return 404, {"message": "Not Found", "documentation_url": "https://docs.github.com/rest/git/refs"}
            return 200, self.ref_body(m.group(1))
        if method == "GET" and (m := re.fullmatch(r"/git/commits/([0-9a-f]{40})", rest)):
            c = self.commits[m.group(1)]
            return 200, {"sha": m.group(1), "message": c["message"],
                         "tree": {"sha": c["tree"], "url": self.api(f"/git/trees/{c['tree']}")},
                         "parents": [{"sha": p} for p in c["parents"]]}
        if method == "POST" and rest == "/git/trees":
            files = dict(self.trees[body["base_tree"]])
            for entry in body["tree"]:
                assert entry["mode"] == "100644" and entry["type"] == "blob"
                files[entry["path"]] = entry["content"]
            sha = self._sha("tree", json.dumps(files, sort_keys=True))
            self.trees[sha] = files
            return 201, {"sha": sha, "url": self.api(f"/git/trees/{sha}"), "tree": [], "truncated": False}
        if method == "POST" and rest == "/git/commits":
            sha = self._sha("commit", json.dumps(body, sort_keys=True))
            self.commits[sha] = {"tree": body["tree"], "parents": body["parents"], "message": body["message"]}
            return 201, {"sha": sha, "tree": {"sha": body["tree"]}, "parents": [{"sha": p} for p in body["parents"]],
                         "message": body["message"]}
        if method == "POST" and rest == "/git/refs":
            name = body["ref"].removeprefix("refs/")
            if name in self.refs:
                return 422, {"message": "Reference already exists"}
            self.refs[name] = body["sha"]
            return 201, self.ref_body(name)
        if method == "PATCH" and (m := re.fullmatch(r"/git/refs/(heads/.+)", rest)):
            if m.group(1) not in self.refs:
                return 422, {"message": "Reference does not exist"}
            self.refs[m.group(1)] = body["sha"]
            return 200, self.ref_body(m.group(1))
        if method == "GET" and rest == "/pulls":
            state = query.get("state", ["open"])[0]
            head = query.get("head", [None])[0]
            base = query.get("base", [None])[0]
            found = [p for p in self.pulls if p["state"] == state and (head is None or f"{OWNER}:{p['head']}" == head)
                     and (base is None or p["base"] == base)]
            return 200, [self.pull_body(p) for p in found]
        if method == "POST" and rest == "/pulls":
            if any(p["head"] == body["head"] and p["state"] == "open" for p in self.pulls):
                return 422, {"message": "Validation Failed",
                             "errors": [{"message": f"A pull request already exists for {OWNER}:{body['head']}."}]}
            pr = {"number": len(self.pulls) + 1, "state": "open", "title": body["title"], "body": body.get("body", ""),
                  "head": body["head"], "base": body["base"]}
            self.pulls.append(pr)
            return 201, self.pull_body(pr)
        if method == "PATCH" and (m := re.fullmatch(r"/pulls/(\d+)", rest)):
            pr = self.pulls[int(m.group(1)) - 1]
            pr.update({k: body[k] for k in ("title", "body") if k in body})
            return 200, self.pull_body(pr)
        return 404, {"message": "Not Found"}

    def branch_file(self, branch: str, path: str) -> str:
        return self.trees[self.commits[self.refs[f"heads/{branch}"]]["tree"]][path]


@pytest.fixture()
def github() -> Iterator[FakeGitHub]:
    state = FakeGitHub()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _serve(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                code, payload = 401, {"message": "Bad credentials"}
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                url = urlparse(self.path)
                code, payload = state.handle(self.command, url.path, parse_qs(url.query), body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, github: FakeGitHub, apt_key: SigningKey) -> Path:
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GITHUB_API_URL", github.base_url)
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_REPOSITORY", f"{OWNER}/{NAME}")
    for name in ("versions.yaml", "versions-history.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(DATA, tmp_path / "src")
    sign_repo(tmp_path / "src" / "gl-apt", apt_key)
    monkeypatch.setenv("GL_APT_KEYRING", str(apt_key.keyring))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def new_driver(workdir: Path, version: str) -> None:
    path = workdir / "src" / "nvidia-releases.json"
    data = json.loads(path.read_text())
    data[version.split(".")[0]]["driver_info"].insert(0, {"release_version": version, "release_date": "2026-11-20"})
    path.write_text(json.dumps(data))


def update_pr(workdir: Path) -> int:
    s = workdir / "src"
    return main(["update", "--pr", "--today", "2026-11-20",
                 "--glrd", str(s / "glrd-releases-major.json"), "--glrd", str(s / "glrd-releases-minor.json"),
                 "--nvidia", str(s / "nvidia-releases.json"), "--apt-repository", str(s / "gl-apt")])


def test_update_pr_opens_one_pull_request_then_updates_it(
    workdir: Path, github: FakeGitHub, capsys: pytest.CaptureFixture[str]
) -> None:
    new_driver(workdir, "580.105.10")
    assert update_pr(workdir) == 0
    assert "opened pull request #1: https://github.com/gardenlinux/gardenlinux-nvidia-installer/pull/1" in capsys.readouterr().err
    (pr,) = github.pulls
    assert pr["base"] == "main" and "new driver patch release 580.105.10 (was 580.105.08)" in pr["body"]
    branch = pr["head"]
    assert "version: 580.105.10" in github.branch_file(branch, "versions.yaml")
    assert "580.105.10" in github.branch_file(branch, "versions-history.yaml")
    assert github.branch_file(branch, "README.md") == "# gl-nvidia\n"  # the rest of the tree is kept
    first_head = github.refs[f"heads/{branch}"]

    new_driver(workdir, "575.57.10")
    assert update_pr(workdir) == 0
    assert "updated pull request #1" in capsys.readouterr().err
    assert len(github.pulls) == 1  # never a duplicate
    assert "new driver patch release 575.57.10" in github.pulls[0]["body"]
    assert github.refs[f"heads/{branch}"] != first_head
    # The branch is one commit on the current main, not a pile of commits.
    assert github.commits[github.refs[f"heads/{branch}"]]["parents"] == [github.refs["heads/main"]]
    assert "version: 575.57.10" in github.branch_file(branch, "versions.yaml")

    writes = len([c for c in github.calls if c[0] != "GET"])
    assert update_pr(workdir) == 0
    assert capsys.readouterr().out.strip() == "no changes"
    assert len([c for c in github.calls if c[0] != "GET"]) == writes  # nothing pushed


def test_update_pr_without_a_token_fails_before_touching_anything(
    workdir: Path, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GITHUB_TOKEN")
    new_driver(workdir, "580.105.10")
    before = (workdir / "versions.yaml").read_bytes()
    assert update_pr(workdir) == 2
    assert "gl-nvidia: error: no GitHub token" in capsys.readouterr().err
    assert (workdir / "versions.yaml").read_bytes() == before and github.calls == []


def test_a_rejected_token_is_one_clear_line(
    workdir: Path, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "expired")
    new_driver(workdir, "580.105.10")
    assert update_pr(workdir) == 2
    err = capsys.readouterr().err
    assert f"gl-nvidia: error: GitHub refused GET /repos/{OWNER}/{NAME} (HTTP 401)" in err
    assert github.pulls == []


def test_a_failed_pull_request_leaves_the_lock_so_a_rerun_proposes_the_change_again(
    workdir: Path, github: FakeGitHub, capsys: pytest.CaptureFixture[str]
) -> None:
    new_driver(workdir, "580.105.10")
    files = {name: (workdir / name).read_bytes() for name in ("versions.yaml", "versions-history.yaml")}
    github.answers[("POST", "/pulls")] = (500, b'{"message": "Server Error"}')
    assert update_pr(workdir) == 2
    captured = capsys.readouterr()
    assert f"GitHub API POST /repos/{OWNER}/{NAME}/pulls failed with HTTP 500: Server Error" in captured.err
    assert captured.out == ""  # nothing reported as changed: nothing was
    assert {name: (workdir / name).read_bytes() for name in files} == files
    del github.answers[("POST", "/pulls")]
    assert update_pr(workdir) == 0  # the rerun sees the same change, not "no changes"
    captured = capsys.readouterr()
    assert "new driver patch release 580.105.10" in captured.out and "opened pull request #1" in captured.err
    assert "version: 580.105.10" in (workdir / "versions.yaml").read_text()
    assert (workdir / "versions.yaml").read_text() == github.branch_file(github.pulls[0]["head"], "versions.yaml")


@pytest.mark.parametrize(("call", "body", "words"), [
    (("GET", ""), b"<html>Sign in</html>", f"GET /repos/{OWNER}/{NAME} answered with a body that is not JSON"),
    (("GET", ""), b'{"default_branch": 5}', "answered with no default_branch (str)"),
    (("GET", ""), b'{"default_branch": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "a body that is not JSON"),
    (("GET", ""), b'{"default_branch": "main", "id": ' + b"9" * 5000 + b"}", "a body that is not JSON"),
    (("GET", "/git/ref/heads/main"), b'{"object": "x"}', "answered with no object.sha (str)"),
    (("GET", "/git/ref/heads/main"), b'{"object": {"sha": "../../x"}}', "object.sha that is not a git object id"),
    (("GET", "/pulls"), b'{"items": []}', "/pulls answered with a body that is not a list"),
    (("GET", "/pulls"), b'[{"number": "1"}]', "answered with no number (int)"),
    (("POST", "/pulls"), b'{"number": 1}', "answered with no html_url (str)"),
], ids=["html", "branch-5", "deep", "5000-digits", "object-str", "sha-path", "pulls-object",
        "number-str", "no-url"])
def test_unexpected_github_answers_are_one_line(workdir: Path, github: FakeGitHub, capsys: pytest.CaptureFixture[str],
                                                 call: tuple[str, str], body: bytes, words: str) -> None:
    new_driver(workdir, "580.105.10")
    before = (workdir / "versions.yaml").read_bytes()
    github.answers[call] = (200, body)
    assert update_pr(workdir) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("gl-nvidia: error:") == 1, err
    assert "GITHUB_API_URL" in err
    assert (workdir / "versions.yaml").read_bytes() == before
