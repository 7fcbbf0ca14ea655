"""The trainer's Prometheus metrics (names from the operator/trainer contract), served by the
first rank of each pod on the contract's port."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pretrain_operator import contract as c


class Metrics:
    def __init__(self):
        self.values: dict[str, float] = {
            c.METRIC_STEP: 0, c.METRIC_TOTAL_STEPS: 0, c.METRIC_LOSS: float("nan"), c.METRIC_TOKENS_PER_SECOND: 0,
            c.METRIC_LAST_CHECKPOINT_STEP: 0, c.METRIC_LAST_CHECKPOINT_TIME: 0, c.METRIC_CHECKPOINT_REQUESTS_SERVED: 0,
            "pretrain_mfu": 0, "pretrain_checkpoint_save_seconds": 0, "pretrain_checkpoint_blocked_seconds_total": 0,
        }

    def set(self, **kw: float) -> None:
        self.values.update(kw)

    def render(self) -> bytes:
        return "".join(f"# TYPE {k} gauge\n{k} {v}\n" for k, v in self.values.items()).encode()

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        metrics = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        srv = ThreadingHTTPServer((host, port), H)
        threading.Thread(target=srv.serve_forever, daemon=True, name="metrics").start()
        return srv
