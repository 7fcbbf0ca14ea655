"""The kubelet's log endpoint, so `kubectl logs [-f] [--previous] [--since] [--tail] [--timestamps]`
works: the API server calls `https://<node InternalIP>:<kubeletEndpoint port>/containerLogs/NS/POD/CTR`
with its kubelet client certificate; we require a certificate signed by the cluster CA.

One listener serves every node of the agent (they share the gateway address)."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse


def _parse(line: bytes) -> tuple[str, bytes, bool] | None:
    """A CRI log line -> (timestamp, content, full line?)."""
    parts = line.rstrip(b"\n").split(b" ", 3)
    if len(parts) < 3:
        return None
    ts, tag = parts[0].decode(), parts[2]  # parts[1]: the stream (stdout, stderr)
    content = parts[3] if len(parts) > 3 else b""
    return ts, content, tag == b"F"


def _ts(s: str) -> float:
    return dt.datetime.strptime(s[:26].rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc).timestamp()


class LogHandler(BaseHTTPRequestHandler):
    agent = None  # set by serve_logs
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        u = urlparse(self.path)
        if u.path == "/healthz":
            return self._reply(200, b"ok")
        parts = u.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._reply(404, b"not found")
        ns, pod, ctr = parts[1:]
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        pod_dir = self._pod_dir(ns, pod)
        if pod_dir is None:
            return self._reply(404, f"pod {ns}/{pod} not found on this node".encode())
        log_dir = pod_dir / "logs" / ctr
        runs = sorted(int(p.stem) for p in log_dir.glob("*.log")) if log_dir.exists() else []
        if not runs:
            return self._reply(400, f'container "{ctr}" in pod "{pod}" is waiting to start'.encode())
        previous = q.get("previous") in ("true", "1")
        if previous and len(runs) < 2:
            return self._reply(400, f'previous terminated container "{ctr}" in pod "{pod}" not found'.encode())
        n = runs[-2] if previous else runs[-1]
        path = log_dir / f"{n}.log"
        exit_file = pod_dir / "containers" / ctr / str(n) / "exit.json"
        follow = q.get("follow") in ("true", "1") and not previous
        timestamps = q.get("timestamps") in ("true", "1")
        since = None
        if q.get("sinceSeconds"):
            since = time.time() - int(q["sinceSeconds"])
        elif q.get("sinceTime"):
            since = dt.datetime.fromisoformat(q["sinceTime"].replace("Z", "+00:00")).timestamp()
        tail = int(q["tailLines"]) if q.get("tailLines") else None
        limit = int(q["limitBytes"]) if q.get("limitBytes") else None

        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0

        def emit(raw_lines: list[bytes]) -> bool:
            nonlocal sent
            out = []
            for raw in raw_lines:
                p = _parse(raw)
                if p is None:
                    continue
                ts, content, full = p
                if since is not None and _ts(ts) < since:
                    continue
                out.append((ts.encode() + b" " if timestamps else b"") + content + (b"\n" if full else b""))
            data = b"".join(out)
            if limit is not None:
                data = data[: max(limit - sent, 0)]
            if data:
                self._chunk(data)
                sent += len(data)
            return limit is None or sent < limit

        try:
            with open(path, "rb") as f:
                lines = f.readlines()
                buf = b""
                if lines and not lines[-1].endswith(b"\n"):
                    buf = lines.pop()
                if tail is not None:
                    lines = lines[-tail:] if tail > 0 else []
                go_on = emit(lines)
                while follow and go_on:
                    chunk = f.readline()
                    if chunk:
                        buf += chunk
                        if buf.endswith(b"\n"):
                            go_on = emit([buf])
                            buf = b""
                        continue
                    # The stream ends when the container has exited, or when the agent
                    # has already removed the pod's folder (a deleted pod can be cleaned
                    # up between two polls, before we ever see its exit file).
                    if exit_file.exists() or not (pod_dir / "pod.json").exists():
                        rest = f.read()
                        if rest:
                            emit((buf + rest).splitlines(keepends=True))
                        break
                    time.sleep(0.1)
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _pod_dir(self, ns: str, pod: str) -> Path | None:
        for meta in self.agent.pods_dir.glob("*/pod.json"):
            try:
                m = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if m.get("ns") == ns and m.get("name") == pod:
                return meta.parent
        return None

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_logs(agent) -> ThreadingHTTPServer:
    gw = agent.state["gateway"]
    port = agent.state["ports"]["kubelet"]
    crt, key = agent.pki.issue("kubelet-serving", "system:node:local-process-nodes", ["system:nodes"],
                               server=True, client=False, ips=[gw, "127.0.0.1"], dns=["localhost"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    ctx.load_verify_locations(str(agent.pki.ca_crt))
    ctx.verify_mode = ssl.CERT_REQUIRED
    handler = type("Handler", (LogHandler,), {"agent": agent})
    srv = ThreadingHTTPServer((gw, port), handler)
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True, name="log-server").start()
    return srv
