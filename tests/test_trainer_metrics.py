"""The trainer's metrics endpoint while it trains: the contract's metrics (step, loss, tokens per
second, the last checkpoint, the last validation, checkpoint requests served) and its own (time
blocked by saves, gradient norm, skipped steps, peak memory, MFU), scraped over HTTP as Prometheus
does, with values that follow the run. Under the operator, the pod's grace period is served beside
the save time, and a save outlasting it is logged once.

    .venv/bin/python -m pytest tests/test_trainer_metrics.py -q
"""

from __future__ import annotations

import math
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.operator_fixture import free_port, has_ipv6_loopback
from pretrain_operator import contract as c
from tests.trainer_util import cmd, env, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def scrape_until(port: int, proc: subprocess.Popen, name: str, at_least: float, timeout: float = 120) -> dict[str, float]:
    """Scrape the running trainer until metric `name` reaches `at_least`; the last scrape."""
    deadline, m = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and m.get(name, 0) < at_least:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            m = scrape(port)
        except OSError:
            pass  # not serving yet
        time.sleep(0.05)
    assert m.get(name, 0) >= at_least, m
    return m


@pytest.mark.parametrize("ip", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not has_ipv6_loopback(), reason="this host has no IPv6 loopback (the server then serves IPv4 alone)"))])
def test_the_operator_reads_a_trainers_metrics_at_an_ipv4_or_ipv6_pod_ip(ip):
    # An IPv6-only cluster's pods have IPv6 IPs alone: the trainer serves both families, and the
    # operator's URL brackets the address (http://fd00::5:9400 names no port).
    from pretrain_operator.controller import read_trainer_metrics
    from pretrain_trainer.metrics import Metrics
    m = Metrics()
    m.set(**{c.METRIC_STEP: 7, c.METRIC_LOSS: 2.5})
    srv = m.serve(free_port())
    try:
        read = read_trainer_metrics(ip, srv.server_address[1], timeout=5)
        assert read[c.METRIC_STEP] == 7 and read[c.METRIC_LOSS] == 2.5
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_training_run_serves_its_progress_gradient_norm_and_peak_memory(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, steps=3000, interval=5,
                       extra={"validation": {"everySteps": 5, "batches": 1}, "training": {"steps": 3000, "logEverySteps": 1}})
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "annotations").write_text('other="x"\n')
    proc = subprocess.Popen(cmd(cfg, 1, tmp_path / "losses.txt"), env={**env(podinfo), "PRETRAIN_METRICS_PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        m = scrape_until(port, proc, "pretrain_validation_step", 10)
        assert m[c.METRIC_CHECKPOINT_REQUESTS_SERVED] == 0
        assert m["pretrain_checkpoint_blocked_seconds_total"] > 0 and m["pretrain_checkpoint_save_seconds"] > 0  # sync saves block
        assert m["pretrain_step"] >= m["pretrain_validation_step"] and m["pretrain_total_steps"] == 3000
        assert 0 < m["pretrain_loss"] < 10 and 0 < m["pretrain_validation_loss"] < 10
        assert m["pretrain_last_checkpoint_step"] >= 5 and m["pretrain_last_checkpoint_step"] % 5 == 0
        assert m["pretrain_tokens_per_second"] > 0 and m["pretrain_mfu"] > 0
        assert 0 < m["pretrain_grad_norm"] < 1000 and m["pretrain_skipped_steps_total"] == 0
        assert m["pretrain_memory_peak_bytes"] > 100 * 2**20  # a process with torch and a model: more than 100 MiB
        assert math.isnan(m["pretrain_termination_grace_seconds"])  # no operator: no grace period known
        first = m["pretrain_step"]
        time.sleep(0.5)
        assert scrape(port)["pretrain_step"] > first  # it follows the run
        (podinfo / "annotations").write_text(f'{c.ANN_CHECKPOINT_REQUEST}="notice-1"\nother="x"\n')
        m = scrape_until(port, proc, c.METRIC_CHECKPOINT_REQUESTS_SERVED, 1)
        assert m[c.METRIC_CHECKPOINT_REQUESTS_SERVED] == 1
    finally:
        proc.kill()
        proc.wait()


def test_under_the_operator_a_save_longer_than_the_pods_grace_period_is_served_and_logged_once(tmp_path):
    # A grace period of 0 s: every save outlasts it, as a large model's would a short grace.
    port = free_port()
    cfg = write_config(tmp_path, steps=3000, interval=5, extra={"template": {"terminationGracePeriodSeconds": 0}})
    proc = subprocess.Popen(cmd(cfg, 1, tmp_path / "losses.txt"),
                            env={**env(), "PRETRAIN_METRICS_PORT": str(port), c.ENV_JOB_UID: "u1", c.ENV_ATTEMPT: "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        m = scrape_until(port, proc, "pretrain_last_checkpoint_step", 10)
        assert m["pretrain_termination_grace_seconds"] == 0 and m["pretrain_checkpoint_save_seconds"] > 0
    finally:
        proc.kill()
        err = proc.communicate()[1]
    warned = [ln for ln in err.splitlines() if "more than spec.template.terminationGracePeriodSeconds (0 s)" in ln]
    assert len(warned) == 1 and "checkpoint step 5 took" in warned[0], warned


def test_a_scrape_while_moe_layers_first_stats_are_set_is_served_whole_one_family_at_a_time():
    # The server thread rendered the dict as training added each MoE layer's first samples: that
    # scrape failed (dictionary changed size during iteration). Many new layers make the race sure;
    # each family stays together under one TYPE line whatever order its layers came in.
    import threading
    from pretrain_trainer.metrics import Metrics
    m, errors, done = Metrics(), [], threading.Event()

    def scrape_all():
        while not done.is_set():
            try:
                m.render()
            except RuntimeError as e:
                errors.append(e)
                return

    t = threading.Thread(target=scrape_all)
    t.start()
    for i in range(20000):
        m.set_router_stats({str(i): {"load": [0.5, 0.5], "dropped": 0.0, "aux": 0.01}})
    done.set()
    t.join()
    assert not errors
    families = {f.name: len(f.samples) for f in text_string_to_metric_families(m.render().decode())}
    assert families[c.METRIC_STEP] == 1 and [n for n, k in families.items() if k == 20000 * 2] == ["pretrain_moe_expert_load"]
