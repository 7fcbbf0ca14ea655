"""A real Prometheus beside the local cluster finds the operator and a job's pods through
Kubernetes service discovery and scrapes them; PromQL answers for a job's step, loss and
preemptions; the chart's alert rules, rendered by helm, pass `promtool check rules` and their unit
tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pretrain_localcluster import binaries
from pretrain_localcluster.monitoring import CHART, Prometheus, loss_curve, plot_loss, register_host_operator, render_rules
from tests.helpers import promql_metric_names, wait_for
from tests.jobs import Jobs, job_manifest

UNIT_TESTS = Path(__file__).parent / "prometheus_alerts_test.yml"


@pytest.fixture(scope="module")
def prometheus(cluster):
    p = Prometheus(cluster)
    p.up()
    yield p
    p.down()


def _promtool() -> str:
    return str(binaries.ensure(["prometheus"])["prometheus"].parent / "promtool")


def test_the_charts_alert_rules_pass_promtool_check_and_their_unit_tests(tmp_path):
    rules = render_rules(tmp_path / "rules.yml")
    check = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 10 rules found" in check.stdout
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    unit = subprocess.run([_promtool(), "test", "rules", UNIT_TESTS.name], cwd=tmp_path, capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def _value(prom: Prometheus, q: str) -> float | None:
    r = prom.query(q)
    return float(r[0]["value"][1]) if r else None


def test_prometheus_discovers_the_operator_and_the_pods_and_answers_for_step_loss_and_preemptions(
        cluster, prometheus, operator, api, namespace, tmp_path):
    t0 = time.time()
    register_host_operator(cluster, operator.metrics_port)
    jobs = Jobs(api, namespace)
    jobs.create(job_manifest("watched", steps=600, step_s=0.1))
    jobs.wait_phase("watched", "Running", timeout=60)
    jobs.wait("watched", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) >= 5, what="a first checkpoint")
    sel = f'namespace="{namespace}", pretrain_job="watched"'
    wait_for(lambda: (_value(prometheus, f'count_over_time(pretrain_step{{{sel}, attempt="1", node_rank="0"}}[5m])') or 0) >= 4,
             timeout=30, what="attempt 1's pods discovered and scraped a few times")
    jobs.core.delete_namespaced_pod("watched-a1-n1", namespace)  # a pod deleted by someone else: a preemption
    jobs.wait_phase("watched", "Running", timeout=90, attempt=2)

    wait_for(lambda: _value(prometheus, 'up{job="pretrain-operator-metrics", namespace="pretrain-system"}') == 1, timeout=30, what="the operator scraped")
    wait_for(lambda: (_value(prometheus, f"pretrain_operator_job_preemptions{{{sel}}}") or 0) >= 1, timeout=30,
             what="the job's preemptions in Prometheus")
    wait_for(lambda: {t["labels"].get("pod") for t in prometheus.targets()
                      if t["labels"].get("pretrain_job") == "watched" and t["health"] == "up"} >= {"watched-a2-n0", "watched-a2-n1"},
             timeout=30, what="the attempt-2 pods discovered and scraped")
    wait_for(lambda: (_value(prometheus, f'max(pretrain_step{{{sel}, attempt="2"}})') or 0) > 0, timeout=30,
             what="attempt 2's step")
    loss = _value(prometheus, f"max(pretrain_loss{{{sel}}})")
    assert loss is not None and loss > 0
    # What make demo tells users to run (the Go-built Prometheus has no web UI) answers too.
    r = subprocess.run(prometheus.query_command(f"pretrain_loss{{{sel}}}"), shell=True, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and 'pretrain_job="watched"' in r.stdout and "=>" in r.stdout, r.stdout + r.stderr
    assert _value(prometheus, f"pretrain_operator_job_failures{{{sel}}}") == 0
    # The operator's last scrape may predate attempt 2's Running (the preemptions came sooner): wait for one after it.
    wait_for(lambda: _value(prometheus, f'pretrain_operator_job_phase{{{sel}, phase="Running"}}') == 1, timeout=30,
             what="the job's phase Running in Prometheus")
    # What the preemption cost: attempt 1's time up is in status, and the gauge goes on from it.
    st = jobs.status("watched")
    assert st["runningSeconds"] >= 1 and st["restart"]["fromAttempt"] == 1
    assert _value(prometheus, f"pretrain_operator_job_lost_steps{{{sel}}}") == st.get("lostSteps", 0)
    wait_for(lambda: (_value(prometheus, f"pretrain_operator_job_running_seconds{{{sel}}}") or 0) > st["runningSeconds"],
             timeout=30, what="the time running to go on in attempt 2")
    # Both attempts are in the history: the step series of attempt 1 and of attempt 2.
    attempts = {r["metric"]["attempt"] for r in prometheus.query(f"max by (attempt) (max_over_time(pretrain_step{{{sel}}}[10m]))")}
    assert attempts == {"1", "2"}
    # make demo's plot: loss against step per attempt, from range queries.
    def both_attempts():
        c = loss_curve(prometheus, namespace, "watched", t0, time.time(), 1.0)
        return c if set(c) == {"1", "2"} and all(len(v) >= 3 for v in c.values()) else None
    curves = wait_for(both_attempts, timeout=30, what="loss against step of both attempts from range queries")
    assert max(s for s, _ in curves["1"]) < max(s for s, _ in curves["2"])
    # The held-out losses at the steps they validated (the stand-in validates at each checkpoint).
    held_out = loss_curve(prometheus, namespace, "watched", t0, time.time(), 1.0,
                          loss="pretrain_validation_loss", step="pretrain_validation_step")
    assert held_out.get("1") and all(s % 5 == 0 and abs(lo - (10.0 / (1 + s) + 1.0)) < 1e-3 for s, lo in held_out["1"])
    png = plot_loss(curves, tmp_path / "loss.png", "watched", preempt_step=max(s for s, _ in curves["1"]), held_out=held_out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # Every metric the chart's Grafana dashboard queries is one Prometheus has scraped.
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    queried = {n for p in dash["panels"] for t in p.get("targets", []) for n in promql_metric_names(t["expr"])}
    scraped = prometheus.metric_names()
    assert queried and queried <= scraped, sorted(queried - scraped)
    jobs.custom.delete_namespaced_custom_object("pretrain.dev", "v1alpha1", namespace, "pretrainjobs", "watched")
    wait_for(lambda: _value(prometheus, f"pretrain_operator_job_preemptions{{{sel}}}") is None, timeout=60,
             what="the deleted job's series to go")
