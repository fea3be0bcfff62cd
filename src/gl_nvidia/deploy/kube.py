"""The few Kubernetes API calls deploy needs, through the official client, with errors a user can act on.

Responses are read as the API's own JSON (plain dicts), so the rest of deploy works on the shapes
`kubectl get -o json` shows.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from gl_nvidia import net
from gl_nvidia.errors import UserError
from gl_nvidia.yamldoc import check_nesting

log = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_TIMEOUT_S = 15.0
# What an Authorization header may carry once trimmed: visible ASCII and inner spaces (RFC 9110 field
# values without obs-text). A CR or LF would end the header and start another.
_CREDENTIAL = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


class KubeAccessError(UserError):
    """The cluster could not be reached or refused us."""

    exit_code = 4


@dataclass
class Kube:
    """An API connection made from one kubeconfig (and optional context)."""

    kubeconfig: Path
    context: str | None = None

    def __post_init__(self) -> None:
        cfg = client.Configuration()
        try:
            check_nesting(self.kubeconfig.read_text(), f"kubeconfig {self.kubeconfig}")
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(self.kubeconfig), context=self.context, client_configuration=cfg,
                persist_config=False,
            )
        except UserError:
            raise
        except Exception as exc:  # the client trusts the file's shape: a malformed one raises anything
            raise UserError(
                f"cannot use kubeconfig {self.kubeconfig}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                "pass a kubeconfig that `kubectl --kubeconfig FILE get nodes` accepts",
            ) from exc
        self._clean_credential(cfg)
        # Before every request the client's hook puts the kubeconfig's credential back (to renew an
        # expiring exec or OIDC token) and installs itself again: clean it there too, and stay the hook.
        refresh = cfg.refresh_api_key_hook

        def clean_after_refresh(c: client.Configuration) -> None:
            if refresh is not None:
                refresh(c)
            c.refresh_api_key_hook = clean_after_refresh  # type: ignore[assignment]  # typed None
            self._clean_credential(c)
        cfg.refresh_api_key_hook = clean_after_refresh  # type: ignore[assignment]  # typed None
        cfg.retries = 1  # fail fast on an unreachable API server instead of urllib3's default retries
        self.server = cfg.host
        self.api = client.ApiClient(cfg)
        self.api.user_agent = net.USER_AGENT  # the Kubernetes client is urllib3's, not httpx's: the same name
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _clean_credential(self, cfg: client.Configuration) -> None:
        """Trim the credential as kubectl trims a tokenFile (`echo "$T" > f` ends it in a newline) and
        refuse one no HTTP header can carry, without showing it: it may be a token, or the lines of
        whatever file tokenFile names."""
        header = cfg.api_key.get("BearerToken")
        if header is None:
            return
        scheme, _, credential = str(header).partition(" ")
        credential = credential.strip()
        if not _CREDENTIAL.fullmatch(credential):
            raise UserError(
                f"kubeconfig {self.kubeconfig}: the user's token (or tokenFile) is "
                f"{'empty' if not credential else 'not one line of printable ASCII'}",
                "write the token alone into the kubeconfig or the token file",
            )
        cfg.api_key["BearerToken"] = f"{scheme} {credential}"

    def _call(self, what: str, fn: Callable[[], T], missing_ok: bool = False) -> T | None:
        """`fn`'s answer; None for a 404 when `missing_ok`; any other failure is one line, exit 4."""
        try:
            return fn()
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            if exc.status in (401, 403):
                raise KubeAccessError(
                    f"the cluster at {self.server} refused to {what} (HTTP {exc.status} "
                    f"{'Unauthorized' if exc.status == 401 else 'Forbidden'})",
                    "use a kubeconfig whose user may list nodes and clusterpolicies and manage pods",
                ) from exc
            # The reason phrase, never the body: a proxy in front of the API server may answer anything.
            raise KubeAccessError(
                f"the Kubernetes API at {self.server} answered HTTP {exc.status} {(exc.reason or '')[:100]}".rstrip()
                + f" to {what}",
                "check the API server's health (`kubectl get --raw /readyz`) and retry" if (exc.status or 0) >= 500
                else f"check that what the command names exists (a namespace, a node) and that the user may {what}",
            ) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise KubeAccessError(
                f"cannot reach the Kubernetes API at {self.server} to {what}: {type(exc).__name__}",
                "check the kubeconfig's server address and your network",
            ) from exc

    def _json(self, what: str, fn: Callable[[], Any], missing_ok: bool = False) -> dict[str, Any] | None:
        """The API object answered, as a dict; an answer that is not one is one line, exit 4."""
        resp = self._call(what, fn, missing_ok)
        if resp is None:
            return None
        try:
            data = json.loads(resp.data)
        except (ValueError, RecursionError) as exc:  # not JSON, a 5000-digit number, nesting past the stack
            raise self._malformed(what, "is not JSON the client can read") from exc
        if not isinstance(data, dict):
            raise self._malformed(what, "is not a JSON object")
        return data

    def _malformed(self, what: str, problem: str) -> KubeAccessError:
        return KubeAccessError(f"the Kubernetes API at {self.server} answered to {what} with a body that {problem}",
                               "check that the kubeconfig's server is a Kubernetes API server")

    def _items(self, what: str, data: dict[str, Any] | None) -> list[dict[str, Any]]:
        items = (data or {}).get("items") or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise self._malformed(what, "has items that are not a list of objects")
        return items

    def nodes(self) -> list[dict[str, Any]]:
        return self._items("list nodes", self._json("list nodes", lambda: self.core.list_node(
            _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S)))

    def cluster_policies(self) -> list[dict[str, Any]]:
        """[] when the CRD is not installed (404): no GPU Operator yet."""
        return self._items("list clusterpolicies", self._json(
            "list clusterpolicies", lambda: self.custom.list_cluster_custom_object(
                "nvidia.com", "v1", "clusterpolicies", _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S),
            missing_ok=True))

    def create_pod(self, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
        body = client.V1Pod.from_dict(pod)
        assert body is not None  # from_dict returns None only for None input
        return self._json("create pods", lambda: self.core.create_namespaced_pod(
            namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S)) or {}

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self._json("read pods", lambda: self.core.read_namespaced_pod(
            name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S)) or {}

    def pod_log(self, namespace: str, name: str) -> str:
        resp: Any = self._call("read pod logs", lambda: self.core.read_namespaced_pod_log(
            name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S))
        return bytes(resp.data).decode(errors="replace")

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete the pod; one already gone (404) is what we wanted."""
        self._call("delete pods", lambda: self.core.delete_namespaced_pod(
            name, namespace, grace_period_seconds=0, _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT_S), missing_ok=True)
