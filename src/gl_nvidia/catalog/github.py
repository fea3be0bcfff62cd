"""Open or update the pull request of `gl-nvidia update --pr` through GitHub's REST API.

No git checkout is needed: the files are committed with the Git Data API (tree + commit on top of the
base branch), the branch ref is created or moved, and the one open pull request from that branch is
updated, or opened when there is none, so daily runs never duplicate it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx

from gl_nvidia import net
from gl_nvidia.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullRequest:
    number: int
    url: str
    created: bool


class GitHub:
    def __init__(self, api_url: str, token: str, repo: str, client: httpx.Client | None = None) -> None:
        if not token:
            raise UserError("no GitHub token", "export GITHUB_TOKEN (a token that may push and open pull requests)")
        if repo.count("/") != 1:
            what = f"bad GitHub repository {repo!r}" if repo else "no GitHub repository"
            raise UserError(what, "pass --repo OWNER/NAME or set GITHUB_REPOSITORY")
        self.repo = repo
        self._http = client or net.client()
        self._base = api_url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }

    def _call(self, method: str, path: str, json: Any = None, params: dict[str, str] | None = None,
              ok_404: bool = False) -> Any:
        url = f"{self._base}/repos/{self.repo}{path}"
        what = f"{method} /repos/{self.repo}{path}"
        try:
            resp = self._http.request(method, url, json=json, params=params, headers=self._headers)
        except httpx.HTTPError as exc:
            raise UserError(f"GitHub API unreachable: {method} {url}: {exc}", "check GITHUB_API_URL and the network") from exc
        log.debug("%s %s -> %d", method, url, resp.status_code)
        if resp.status_code == 404 and ok_404:
            return None
        if resp.status_code in (401, 403):
            raise UserError(f"GitHub refused {what} (HTTP {resp.status_code})",
                            "the token needs contents and pull-requests write permission")
        if resp.status_code >= 400:
            body = _parse(resp)
            message = body.get("message") if isinstance(body, dict) else None
            message = message[:MAX_MESSAGE] if isinstance(message, str) else ""
            raise UserError(f"GitHub API {what} failed with HTTP {resp.status_code}: {message}".rstrip(": "))
        body = _parse(resp)
        if body is _NOT_JSON:
            raise _unexpected(what, "a body that is not JSON")
        return body

    def _get(self, what: str, answer: Any, *keys: str, kind: type = str) -> Any:
        """answer[keys[0]][keys[1]]...: a value of `kind`, or one line naming the call and the field."""
        value = answer
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
            raise _unexpected(f"{what} /repos/{self.repo}", f"no {'.'.join(keys)} ({kind.__name__})")
        if keys[-1] == "sha" and not _SHA.fullmatch(str(value)):
            raise _unexpected(f"{what} /repos/{self.repo}", f"{'.'.join(keys)} that is not a git object id")
        return value

    def propose(self, branch: str, files: dict[str, str], title: str, body: str, base: str | None = None) -> PullRequest:
        """Commit `files` (repository path -> text) on `branch` from `base` and open or update its PR."""
        base = base or self._get("GET", self._call("GET", ""), "default_branch")
        base_sha = self._get("GET", self._call("GET", f"/git/ref/heads/{base}"), "object", "sha")
        base_tree = self._get("GET", self._call("GET", f"/git/commits/{base_sha}"), "tree", "sha")
        tree = self._get("POST", self._call("POST", "/git/trees", json={
            "base_tree": base_tree,
            "tree": [{"path": p, "mode": "100644", "type": "blob", "content": text} for p, text in sorted(files.items())],
        }), "sha")
        commit = self._get("POST", self._call("POST", "/git/commits", json={
            "message": title, "tree": tree, "parents": [base_sha]}), "sha")
        if self._call("GET", f"/git/ref/heads/{branch}", ok_404=True) is None:
            self._call("POST", "/git/refs", json={"ref": f"refs/heads/{branch}", "sha": commit})
        else:
            # The branch is this tool's: each run replaces it with one commit on the current base.
            self._call("PATCH", f"/git/refs/heads/{branch}", json={"sha": commit, "force": True})
        owner = self.repo.split("/", 1)[0]
        open_prs = self._call("GET", "/pulls", params={"state": "open", "head": f"{owner}:{branch}", "base": base})
        if not isinstance(open_prs, list):
            raise _unexpected(f"GET /repos/{self.repo}/pulls", "a body that is not a list")
        if open_prs:
            number = self._get("GET", open_prs[0], "number", kind=int)
            pr = self._call("PATCH", f"/pulls/{number}", json={"title": title, "body": body})
            return PullRequest(number, self._get("PATCH", pr, "html_url"), created=False)
        pr = self._call("POST", "/pulls", json={"title": title, "head": branch, "base": base, "body": body})
        return PullRequest(self._get("POST", pr, "number", kind=int), self._get("POST", pr, "html_url"), created=True)


_NOT_JSON = object()
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
MAX_MESSAGE = 200  # of a GitHub error message quoted in our error line


def _parse(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except (ValueError, RecursionError):  # not JSON (a proxy's HTML page), a 5000-digit number, nesting past the stack
        return _NOT_JSON


def _unexpected(what: str, problem: str) -> UserError:
    return UserError(f"GitHub API {what} answered with {problem}",
                     "check GITHUB_API_URL: it must be GitHub's REST API (https://api.github.com or GHES's /api/v3)")
