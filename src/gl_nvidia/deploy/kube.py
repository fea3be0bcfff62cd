"""The few Kubernetes API calls deploy needs, through the official client, with errors a user can act on.

Responses are read as the API's own JSON (plain dicts), so the rest of deploy works on the shapes
`kubectl get -o json` shows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from gl_nvidia.errors import UserError
from gl_nvidia.yamldoc import check_nesting

log = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_TIMEOUT_S = 15.0


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
        cfg.retries = 1  # fail fast on an unreachable API server instead of urllib3's default retries
        self.server = cfg.host
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ApiException as exc:
            if exc.status in (401, 403):
                raise KubeAccessError(
                    f"the cluster at {self.server} refused to {what} (HTTP {exc.status} "
                    f"{'Unauthorized' if exc.status == 401 else 'Forbidden'})",
                    "use a kubeconfig whose user may list nodes and clusterpolicies and manage pods",
                ) from exc
            raise
        except urllib3.exceptions.HTTPError as exc:
            raise KubeAccessError(
                f"cannot reach the Kubernetes API at {self.server} to {what}: {type(exc).__name__}",
                "check the kubeconfig's server address and your network",
            ) from exc

    def _json(self, what: str, fn: Callable[[], Any]) -> Any:
        resp = self._call(what, fn)
        return json.loads(resp.data)

    def nodes(self) -> list[dict[str, Any]]:
        data = self._json("list nodes", lambda: self.core.list_node(
            _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S))
        return list(data.get("items") or [])

    def cluster_policies(self) -> list[dict[str, Any]]:
        def call() -> Any:
            return self.custom.list_cluster_custom_object(
                "nvidia.com", "v1", "clusterpolicies", _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_S)
        try:
            data = self._json("list clusterpolicies", call)
        except ApiException as exc:
            if exc.status == 404:  # the CRD is not installed: no GPU Operator yet
                return []
            raise
        return list(data.get("items") or [])

    def create_pod(self, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
        body = client.V1Pod.from_dict(pod)
        assert body is not None  # from_dict returns None only for None input
        result: dict[str, Any] = self._json("create pods", lambda: self.core.create_namespaced_pod(
            namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S))
        return result

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("read pods", lambda: self.core.read_namespaced_pod(
            name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S))
        return result

    def pod_log(self, namespace: str, name: str) -> str:
        resp: Any = self._call("read pod logs", lambda: self.core.read_namespaced_pod_log(
            name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S))
        return bytes(resp.data).decode(errors="replace")

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self._call("delete pods", lambda: self.core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=0, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_S))
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise
