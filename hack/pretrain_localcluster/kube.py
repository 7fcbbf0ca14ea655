"""A small JSON client for the API server (urllib3, client certificates), used by the node agent
and the drills: dicts in, dicts out, watches as generators. The tests use the official client."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import urllib3


class KubeError(RuntimeError):
    def __init__(self, status: int, body: str, what: str = ""):
        self.status = status
        self.body = body
        try:
            self.message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.message = body
        super().__init__(f"{what}: HTTP {status}: {self.message}")


class Kube:
    def __init__(self, server: str, ca: str, cert: str, key: str, maxsize: int = 16):
        self.server = server.rstrip("/")
        self.http = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED", ca_certs=ca, cert_file=cert, key_file=key, maxsize=maxsize, block=False
        )

    def request(self, method: str, path: str, body=None, params: dict | None = None,
                content_type: str = "application/json", timeout: float = 30.0) -> dict:
        url = self.server + path + (("?" + urlencode(params)) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        r = self.http.request(method, url, body=data, headers={"Content-Type": content_type, "Accept": "application/json"},
                              timeout=urllib3.Timeout(connect=5.0, read=timeout), retries=False)
        if r.status >= 400:
            raise KubeError(r.status, r.data.decode(errors="replace"), f"{method} {path}")
        return json.loads(r.data) if r.data else {}

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params or None)

    def get_or_none(self, path: str, timeout: float = 30.0) -> dict | None:
        try:
            return self.request("GET", path, timeout=timeout)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def create_or_exists(self, path: str, body: dict) -> dict | None:
        try:
            return self.create(path, body)
        except KubeError as e:
            if e.status == 409:
                return None
            raise

    def patch(self, path: str, body: dict, strategic: bool = True, timeout: float = 30.0) -> dict:
        ct = "application/strategic-merge-patch+json" if strategic else "application/merge-patch+json"
        return self.request("PATCH", path, body, content_type=ct, timeout=timeout)

    def delete(self, path: str, body: dict | None = None, missing_ok: bool = True) -> dict | None:
        try:
            return self.request("DELETE", path, body)
        except KubeError as e:
            if e.status == 404 and missing_ok:
                return None
            raise

    def watch(self, path: str, resource_version: str, timeout_s: int = 300, **params):
        """Yield watch events until the server closes the stream; raises KubeError(410) when expired."""
        q = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": str(timeout_s),
             "allowWatchBookmarks": "true", **params}
        r = self.http.request("GET", self.server + path + "?" + urlencode(q), preload_content=False,
                              timeout=urllib3.Timeout(connect=5.0, read=timeout_s + 30), retries=False)
        try:
            if r.status >= 400:
                raise KubeError(r.status, r.read().decode(errors="replace"), f"WATCH {path}")
            buf = b""
            for chunk in r.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    if ev.get("type") == "ERROR":
                        obj = ev.get("object", {})
                        raise KubeError(obj.get("code", 500), json.dumps(obj), f"WATCH {path}")
                    yield ev
        finally:
            r.release_conn()
