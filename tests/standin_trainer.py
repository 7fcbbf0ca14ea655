"""A stand-in trainer that honours the operator/trainer contract (pretrain_operator.contract)
without torch, for the operator's tests: it steps, checkpoints, serves the contract's metrics,
answers checkpoint requests from the annotations file, saves and exits EXIT_PREEMPTED on SIGTERM,
writes the final report as its termination message, and resumes from the newest committed checkpoint.

Knobs (environment): STANDIN_STEP_SECONDS (default 0.2); STANDIN_FAIL="<attempt>:<rank>:<n>:<code>"
exits with <code> after <n> steps of this attempt on node rank <rank> in attempt <attempt> (* means any).
STANDIN_NAN_LOSS_FROM=<step> serves a NaN loss from that step on (a diverging run), and a NaN
checkpoint time (a custom trainer's nonsense).
STANDIN_HANG="<attempt>:<step>" stops every rank at that step of that attempt, still serving metrics and
deaf to SIGTERM (a collective that never returns: the flag SIGTERM sets is read at a step boundary).
"""

import http.server
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from pretrain_operator import contract as c

cfg = yaml.safe_load(open(os.environ[c.ENV_CONFIG]))
steps = cfg["training"]["steps"]
interval = cfg["checkpoint"]["intervalSteps"]
ckpt = Path(os.environ[c.ENV_CHECKPOINT_DIR])
rank = int(os.environ["PET_NODE_RANK"])
attempt = int(os.environ[c.ENV_ATTEMPT])
step_s = float(os.environ.get("STANDIN_STEP_SECONDS", "0.2"))
fail = os.environ.get("STANDIN_FAIL", "")
nan_from = int(os.environ.get("STANDIN_NAN_LOSS_FROM", "1000000000"))  # the served loss is NaN from this step on
hang = os.environ.get("STANDIN_HANG", "")
term_s = float(os.environ.get("STANDIN_TERM_SECONDS", "0"))  # seconds its SIGTERM save takes
annotations = Path(os.environ[c.ENV_PODINFO]) / "annotations"

# The real trainer's layout check (train.check_layout): the config's ranks are torchrun's world.
par = cfg.get("parallelism") or {}
world = int(os.environ["PET_NNODES"]) * int(os.environ.get("PET_NPROC_PER_NODE", "1"))
if par.get("data", 1) * par.get("tensor", 1) * par.get("pipeline", 1) != world or cfg.get("nodes", 1) != int(os.environ["PET_NNODES"]):
    print(f"config layout {par} on {cfg.get('nodes')} node(s) does not match the world of {world} rank(s)", flush=True)
    sys.exit(85)

state = {"step": 0, "ckpt_step": 0, "ckpt_time": 0.0, "served": 0}


def latest() -> int:
    done = [int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if (p / "COMMITTED").exists()]
    return max(done, default=0)


def save(step: int) -> None:
    if rank != 0:
        return
    d = ckpt / f"step-{step:08d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    (d / "COMMITTED").write_text("ok")
    state["ckpt_step"], state["ckpt_time"] = step, time.time()


class Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "\n".join([
            f"{c.METRIC_STEP} {state['step']}", f"{c.METRIC_TOTAL_STEPS} {steps}",
            # No loss before the first step, as the real trainer serves it (metrics.py): NaN.
            f"{c.METRIC_LOSS} {loss(state['step']) if state['step'] and state['step'] < nan_from else float('nan'):.4f}",
            f"{c.METRIC_TOKENS_PER_SECOND} {1234.5 if state['step'] else 0}",
            f"{c.METRIC_LAST_CHECKPOINT_STEP} {state['ckpt_step']}",
            f"{c.METRIC_LAST_CHECKPOINT_TIME} {state['ckpt_time'] if state['step'] < nan_from else float('nan')}",
            f"{c.METRIC_CHECKPOINT_REQUESTS_SERVED} {state['served']}",
            # A validation at each checkpoint (as spec.validation would): none (NaN, step 0) before the first.
            f"{c.METRIC_VALIDATION_LOSS} {validation_loss(state['ckpt_step']) if state['ckpt_step'] else float('nan'):.4f}",
            f"{c.METRIC_VALIDATION_STEP} {state['ckpt_step']}",
            # The real trainer's own metrics too (trainer/pretrain_trainer/metrics.py), so dashboards
            # built on them can be checked against what Prometheus scrapes from stand-ins.
            "pretrain_mfu 0.01", "pretrain_checkpoint_save_seconds 0.01", "pretrain_checkpoint_blocked_seconds_total 0.0",
            f"pretrain_termination_grace_seconds {(cfg.get('template') or {}).get('terminationGracePeriodSeconds', 60)}",
            ""]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def loss(step: int) -> float:
    return 10.0 / (1 + step)


def validation_loss(step: int) -> float:
    return loss(step) + 1.0


def report() -> None:
    """The contract's final report, rank 0's termination message."""
    if rank == 0 and os.environ.get(c.ENV_TERMINATION_MESSAGE):
        Path(os.environ[c.ENV_TERMINATION_MESSAGE]).write_text(json.dumps(
            {"step": state["step"], "totalSteps": steps, "loss": loss(state["step"]), "checkpointStep": state["ckpt_step"]}))


def on_term(*_):
    time.sleep(term_s)  # a slow last checkpoint
    save(state["step"])
    report()
    print(f"SIGTERM at step {state['step']}: checkpoint saved", flush=True)
    os._exit(c.EXIT_PREEMPTED)


signal.signal(signal.SIGTERM, on_term)
srv = http.server.ThreadingHTTPServer(("0.0.0.0", c.METRICS_PORT), Metrics)
threading.Thread(target=srv.serve_forever, daemon=True).start()
state["step"] = state["ckpt_step"] = start = latest()
print(f"attempt {attempt} rank {rank}: resuming at step {state['step']} of {steps}", flush=True)
seen_request = None
while state["step"] < steps:
    time.sleep(step_s)
    state["step"] += 1
    s = state["step"]
    if fail:
        fa, fr, fs, code = fail.split(":")
        if (fa == "*" or int(fa) == attempt) and int(fr) == rank and int(fs) == s - start:
            print(f"failing at step {s} with exit code {code}", flush=True)
            sys.exit(int(code))
    if hang and hang == f"{attempt}:{s}":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"hanging at step {s}", flush=True)
        while True:
            time.sleep(60)
    req = next((ln for ln in annotations.read_text().splitlines() if ln.startswith(c.ANN_CHECKPOINT_REQUEST)), None) \
        if annotations.exists() else None
    if req and req != seen_request:
        seen_request = req
        save(s)
        state["served"] += 1
        print(f"checkpoint requested: saved step {s}", flush=True)
    elif s % interval == 0:
        save(s)
save(state["step"])  # the contract: exiting 0 means the last step is checkpointed
report()
print(f"done at step {state['step']}", flush=True)
