"""The trainer's Prometheus metrics (names from the operator/trainer contract), served by the
first rank of each pod on the contract's port.

MoE runs add router statistics per MoE layer, over all ranks, since the previous logged step:
`pretrain_moe_expert_load{layer,expert}` (fraction of the layer's token assignments),
`pretrain_moe_dropped_fraction{layer}` (assignments dropped by the capacity limit) and
`pretrain_moe_aux_loss{layer}` (the load-balancing loss, 1.0 when perfectly even)."""

from __future__ import annotations

import resource
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pretrain_operator import contract as c

MOE_EXPERT_LOAD = "pretrain_moe_expert_load"
MOE_DROPPED = "pretrain_moe_dropped_fraction"
MOE_AUX_LOSS = "pretrain_moe_aux_loss"
# The pod's spec.template.terminationGracePeriodSeconds, beside pretrain_checkpoint_save_seconds:
# a save longer than the grace would be killed before it commits (alert PretrainCheckpointOutlastsGrace).
GRACE = "pretrain_termination_grace_seconds"


def peak_memory_bytes(cuda: bool) -> int:
    """The most memory this rank has held: on a GPU what the caching allocator reserved (what
    decides an out-of-memory), on the CPU the process's peak resident size."""
    if cuda:
        import torch
        return torch.cuda.max_memory_reserved()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Metrics:
    def __init__(self):
        # The server's thread renders while training sets: a render iterating the dict as MoE
        # layers' first stats were added failed that scrape (dictionary changed size).
        self.lock = threading.Lock()
        self.values: dict[str, float] = {
            c.METRIC_STEP: 0, c.METRIC_TOTAL_STEPS: 0, c.METRIC_LOSS: float("nan"), c.METRIC_TOKENS_PER_SECOND: 0,
            c.METRIC_LAST_CHECKPOINT_STEP: 0, c.METRIC_LAST_CHECKPOINT_TIME: 0, c.METRIC_CHECKPOINT_REQUESTS_SERVED: 0,
            c.METRIC_VALIDATION_LOSS: float("nan"), c.METRIC_VALIDATION_STEP: 0,
            "pretrain_mfu": 0, "pretrain_grad_norm": 0, "pretrain_skipped_steps_total": 0, "pretrain_memory_peak_bytes": 0, "pretrain_checkpoint_save_seconds": 0, "pretrain_checkpoint_blocked_seconds_total": 0,
            GRACE: float("nan"),  # known under the operator only
        }

    def set(self, **kw: float) -> None:
        with self.lock:
            self.values.update(kw)

    def set_router_stats(self, stats: dict | None) -> None:
        with self.lock:
            for layer, s in (stats or {}).items():
                for e, v in enumerate(s["load"]):
                    self.values[f'{MOE_EXPERT_LOAD}{{layer="{layer}",expert="{e}"}}'] = v
                self.values[f'{MOE_DROPPED}{{layer="{layer}"}}'] = s["dropped"]
                self.values[f'{MOE_AUX_LOSS}{{layer="{layer}"}}'] = s["aux"]

    @staticmethod
    def router_summary(stats: dict | None) -> str:
        """One log line's worth: per layer the busiest expert's share, dropped fraction, aux loss."""
        return "; ".join(f"layer {k} max load {max(s['load']):.3f} dropped {s['dropped']:.3f} aux {s['aux']:.4f}"
                         for k, s in (stats or {}).items())

    def render(self) -> bytes:
        # Each family's samples together under one TYPE line, as the text format wants, whatever
        # order their keys were added in (a layer first seen after others came after their families).
        with self.lock:
            values = list(self.values.items())
        families: dict[str, list[str]] = {}
        for k, v in values:
            families.setdefault(k.split("{", 1)[0], []).append(f"{k} {v}\n")
        return "".join(f"# TYPE {name} gauge\n" + "".join(lines) for name, lines in families.items()).encode()

    def serve(self, port: int) -> ThreadingHTTPServer:
        """On every address of both families (an IPv6-only cluster's pod has no IPv4 address to
        scrape), or of IPv4 alone where the pod has no IPv6."""
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

        try:
            srv: ThreadingHTTPServer = _DualStackServer(("::", port), H)
        except OSError:  # no IPv6 in this pod (the kernel's or the sysctl's choice)
            srv = ThreadingHTTPServer(("0.0.0.0", port), H)
        threading.Thread(target=srv.serve_forever, daemon=True, name="metrics").start()
        return srv


class _DualStackServer(ThreadingHTTPServer):
    """IPv6's wildcard with IPv4 mapped onto it, whatever the host's net.ipv6.bindv6only says."""
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
