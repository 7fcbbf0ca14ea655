"""The few Kubernetes API calls the operator makes, as plain JSON over the kubernetes client's
authenticated connection pool (kubeconfig or in-cluster token, refreshed by the client).

    kube = KubeAPI(api_client)
    pods = kube.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="pretrain.dev/job-uid=...")["items"]

Why not CoreV1Api: importing it builds validators for its hundreds of typed methods, 20 MiB of the
operator's memory (bench/gang_creation.py reports the operator's RSS), and its answers become
models the reconcile turns back into dicts. Errors are the client's `ApiException` (status, reason,
body), so callers handle them as before.
"""

from __future__ import annotations

import json

from kubernetes import client

from .metrics import API_REQUESTS

# (connect, read) seconds: a request the API server never answers (a half-open connection after
# its failover) raises instead of holding a reconcile worker, or the Lease's renewal, forever.
REQUEST_TIMEOUT = (10, 60)

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class KubeAPI:
    def __init__(self, api_client: client.ApiClient):
        self.api = api_client

    def request(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json",
                **query) -> dict | None:
        method, url, headers, data, post = self.api.param_serialize(
            method=method, resource_path=path, query_params=[(k, v) for k, v in query.items() if v is not None],
            header_params={"Content-Type": content_type, "Accept": "application/json"}, body=body,
            auth_settings=["BearerToken"])
        API_REQUESTS.labels(method).inc()
        resp = self.api.call_api(method, url, header_params=headers, body=data, post_params=post,
                                 _request_timeout=REQUEST_TIMEOUT)
        resp.read()
        if not 200 <= resp.status < 300:
            raise client.ApiException(http_resp=resp)
        return json.loads(resp.data) if resp.data else None

    def get(self, path: str, **query) -> dict:
        return self.request("GET", path, **query)

    def get_or_none(self, path: str) -> dict | None:
        try:
            return self.get(path)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def replace(self, path: str, body: dict) -> dict:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: dict, content_type: str = MERGE) -> dict:
        return self.request("PATCH", path, body, content_type)

    def delete(self, path: str, body: dict | None = None, missing_ok: bool = True) -> dict | None:
        try:
            return self.request("DELETE", path, body)
        except client.ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            raise


def api_message(e: client.ApiException) -> str:
    """What the API server said, from its Status body (the reason alone hides which field)."""
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return f"{e.status} {e.reason}"


def core_path(ns: str, plural: str, name: str = "") -> str:
    """/api/v1/namespaces/<ns>/<plural>[/<name>]"""
    return f"/api/v1/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")
