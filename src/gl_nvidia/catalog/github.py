"""Open or update the pull request of `gl-nvidia update --pr` through GitHub's REST API.

No git checkout is needed: the files are committed with the Git Data API (tree + commit on top of the
base branch), the branch ref is created or moved, and the one open pull request from that branch is
updated, or opened when there is none, so daily runs never duplicate it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

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
        self._http = client or httpx.Client(timeout=30.0)
        self._base = api_url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }

    def _call(self, method: str, path: str, json: Any = None, params: dict[str, str] | None = None,
              ok_404: bool = False) -> Any:
        url = f"{self._base}/repos/{self.repo}{path}"
        try:
            resp = self._http.request(method, url, json=json, params=params, headers=self._headers)
        except httpx.HTTPError as exc:
            raise UserError(f"GitHub API unreachable: {method} {url}: {exc}", "check GITHUB_API_URL and the network") from exc
        log.debug("%s %s -> %d", method, url, resp.status_code)
        if resp.status_code == 404 and ok_404:
            return None
        if resp.status_code in (401, 403):
            raise UserError(f"GitHub refused {method} /repos/{self.repo}{path} (HTTP {resp.status_code})",
                            "the token needs contents and pull-requests write permission")
        if resp.status_code >= 400:
            message = resp.json().get("message", "") if resp.headers.get("content-type", "").startswith("application/json") else ""
            raise UserError(f"GitHub API {method} /repos/{self.repo}{path} failed with HTTP {resp.status_code}: {message}".rstrip(": "))
        return resp.json()

    def propose(self, branch: str, files: dict[str, str], title: str, body: str, base: str | None = None) -> PullRequest:
        """Commit `files` (repository path -> text) on `branch` from `base` and open or update its PR."""
        base = base or self._call("GET", "")["default_branch"]
        base_sha = self._call("GET", f"/git/ref/heads/{base}")["object"]["sha"]
        base_tree = self._call("GET", f"/git/commits/{base_sha}")["tree"]["sha"]
        tree = self._call("POST", "/git/trees", json={
            "base_tree": base_tree,
            "tree": [{"path": p, "mode": "100644", "type": "blob", "content": text} for p, text in sorted(files.items())],
        })["sha"]
        commit = self._call("POST", "/git/commits", json={"message": title, "tree": tree, "parents": [base_sha]})["sha"]
        if self._call("GET", f"/git/ref/heads/{branch}", ok_404=True) is None:
            self._call("POST", "/git/refs", json={"ref": f"refs/heads/{branch}", "sha": commit})
        else:
            # The branch is this tool's: each run replaces it with one commit on the current base.
            self._call("PATCH", f"/git/refs/heads/{branch}", json={"sha": commit, "force": True})
        owner = self.repo.split("/", 1)[0]
        open_prs = self._call("GET", "/pulls", params={"state": "open", "head": f"{owner}:{branch}", "base": base})
        if open_prs:
            pr = self._call("PATCH", f"/pulls/{open_prs[0]['number']}", json={"title": title, "body": body})
            return PullRequest(pr["number"], pr["html_url"], created=False)
        pr = self._call("POST", "/pulls", json={"title": title, "head": branch, "base": base, "body": body})
        return PullRequest(pr["number"], pr["html_url"], created=True)
