"""Process nodes run pods for real: each pod is local processes in its own network and mount
namespace, with the kubelet's status, lifecycle, volumes, DNS and logs."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from pathlib import Path

import pytest
from kubernetes import client, watch

from pretrain_localcluster import binaries, nodes
from pretrain_localcluster.config import REPO_ROOT
from pretrain_localcluster.volumes import VolumeBuilder

from tests.helpers import wait_for
from tests.kubeutil import RESTRICTED_POD, create_pod, kubectl, logs, phase, pod_manifest, restricted, wait_gone, wait_phase



def test_a_pods_exit_code_and_reason_reach_its_status(core, namespace):
    create_pod(core, namespace, pod_manifest("fails", ["sh", "-c", "echo bye; exit 7"]))
    create_pod(core, namespace, pod_manifest("ok", ["true"]))
    p = wait_phase(core, namespace, "fails", "Failed")
    t = p.status.container_statuses[0].state.terminated
    assert (t.exit_code, t.reason) == (7, "Error")
    p = wait_phase(core, namespace, "ok", "Succeeded")
    t = p.status.container_statuses[0].state.terminated
    assert (t.exit_code, t.reason) == (0, "Completed")
    assert p.status.pod_ip and p.status.pod_ip.startswith("10.")


def test_a_containers_termination_message_reaches_its_status_and_its_dev_stays_its_own(core, namespace):
    create_pod(core, namespace, pod_manifest("told", ["sh", "-c", "printf 'step 42 done' > /dev/termination-log"]))
    create_pod(core, namespace, pod_manifest("elsewhere", ["sh", "-c", "echo why > /var/log/why"],
                                             container={"terminationMessagePath": "/var/log/why"}))
    many_lines = "for i in $(seq 1 100); do echo line $i; done; exit 3"
    create_pod(core, namespace, pod_manifest("fallback", ["sh", "-c", many_lines],
                                             container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    create_pod(core, namespace, pod_manifest("silent", ["sh", "-c", many_lines]))

    def message(name, phase_):
        return wait_phase(core, namespace, name, phase_).status.container_statuses[0].state.terminated.message

    assert message("told", "Succeeded") == "step 42 done"
    assert message("elsewhere", "Succeeded") == "why\n"
    # The kubelet's fallback: the last 80 lines of a failed container's log.
    assert message("fallback", "Failed") == "\n".join(f"line {i}" for i in range(21, 101))
    assert message("silent", "Failed") is None  # policy File: the log is not a message
    # Each container wrote into a /dev of its own, not the host's.
    assert not Path("/dev/termination-log").exists()


def test_a_container_over_its_memory_limit_is_oomkilled(core, namespace):
    create_pod(core, namespace, pod_manifest(
        "hog", ["python", "-c", "x = bytearray(400 * 2**20); print('allocated')"],
        container={"resources": {"limits": {"memory": "64Mi"}}}))
    p = wait_phase(core, namespace, "hog", "Failed")
    t = p.status.container_statuses[0].state.terminated
    assert t.reason == "OOMKilled" and t.exit_code == 137


def test_a_deployment_gets_running_ready_pods(api, core, namespace):
    labels = {"app": "sleeper"}
    client.AppsV1Api(api).create_namespaced_deployment(namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sleeper"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": restricted({"terminationGracePeriodSeconds": 1,
                                                  "containers": [{"name": "c", "image": "local", "command": ["sleep", "600"],
                                                                  "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}}]})}}})
    wait_for(lambda: (client.AppsV1Api(api).read_namespaced_deployment("sleeper", namespace).status.ready_replicas or 0) == 2,
             timeout=60, what="2 ready replicas")
    pods = core.list_namespaced_pod(namespace, label_selector="app=sleeper").items
    assert {p.status.phase for p in pods} == {"Running"}
    assert len({p.status.pod_ip for p in pods}) == 2


def test_a_job_completes(api, namespace):
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "count"},
        "spec": {"completions": 2, "parallelism": 2, "backoffLimit": 0,
                 "template": {"spec": restricted({"restartPolicy": "Never",
                                                  "containers": [{"name": "c", "image": "local", "command": ["sh", "-c", "echo done"]}]})}}})
    wait_for(lambda: (batch.read_namespaced_job("count", namespace).status.succeeded or 0) == 2, timeout=60,
             what="the Job to complete")
    job = batch.read_namespaced_job("count", namespace)
    assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 29400)); s.listen()
while True:
    c, _ = s.accept(); c.sendall(("hello from " + socket.gethostname()).encode()); c.close()
"""

CLIENT = """
import socket, sys, time
for name in sys.argv[1:]:
    for _ in range(100):
        try:
            with socket.create_connection((name, 29400), timeout=2) as c:
                print(name, "->", c.recv(100).decode()); break
        except OSError as e:
            err = e
            time.sleep(0.2)
    else:
        sys.exit(f"cannot reach {name}: {err}")
"""


def test_pods_of_a_headless_service_talk_over_tcp_by_dns_names_while_a_third_listens_on_the_same_port(core, namespace):
    core.create_namespaced_service(namespace, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "gang"},
        "spec": {"clusterIP": "None", "selector": {"gang": "g"}, "publishNotReadyAddresses": True,
                 "ports": [{"port": 29400, "name": "rdzv"}]}})
    for i in range(2):
        create_pod(core, namespace, pod_manifest(f"r{i}", ["python", "-c", SERVER], hostname=f"r{i}", subdomain="gang",
                                                 metadata={"labels": {"gang": "g"}}, restart="Always"))
    # Not in the Service, same port: its own network namespace, so no conflict.
    create_pod(core, namespace, pod_manifest("third", ["python", "-c", SERVER], restart="Always"))
    third = wait_phase(core, namespace, "third", "Running")
    create_pod(core, namespace, pod_manifest("client", ["python", "-c", CLIENT, "r0.gang",
                                                        f"r1.gang.{namespace}.svc.cluster.local", third.status.pod_ip]))
    wait_phase(core, namespace, "client", "Succeeded", "Failed", timeout=90)
    out = logs(core, namespace, "client")
    assert phase(core, namespace, "client") == "Succeeded", out
    assert "r0.gang -> hello from r0" in out
    assert f"r1.gang.{namespace}.svc.cluster.local -> hello from r1" in out
    assert f"{third.status.pod_ip} -> hello from third" in out


def test_deletion_delivers_sigterm_and_respects_the_grace_period(cluster, core, namespace):
    # A child in the container's process group (a launcher's rank): the SIGTERM goes to the main
    # process only, as a runtime signals a container's first process (it went to the whole group,
    # and a launcher that forwarded nothing passed every test here); it goes with the container.
    script = ("import os, signal, sys, time\n"
              "if os.fork() == 0:\n"
              " signal.signal(signal.SIGTERM, lambda *_: (print('child got SIGTERM', flush=True), os._exit(0)))\n"
              " print('child ready', flush=True)\n"
              " while True: time.sleep(0.1)\n"
              "def term(*_):\n print('got SIGTERM', flush=True); time.sleep(1.5); print('cleaned up', flush=True); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, term)\nprint('ready', flush=True)\nwhile True: time.sleep(0.1)\n")
    create_pod(core, namespace, pod_manifest("graceful", ["python", "-c", script], terminationGracePeriodSeconds=10))
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)\n"
    create_pod(core, namespace, pod_manifest("stubborn", ["python", "-c", stubborn], terminationGracePeriodSeconds=2))
    for n in ("graceful", "stubborn"):
        wait_phase(core, namespace, n, "Running")
        wait_for(lambda n=n: "ready" in logs(core, namespace, n) and (n != "graceful" or "child ready" in logs(core, namespace, n)),
                 what=f"{n} to start")
    # Follow the logs from before the deletion: the pod object (and its logs) go once it ends.
    follow = subprocess.Popen([str(binaries.locate(["kubectl"])["kubectl"]), "--kubeconfig", str(cluster.cfg.kubeconfig),
                               "-n", namespace, "logs", "-f", "graceful"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    final = {}
    w = watch.Watch()
    t0 = time.monotonic()
    core.delete_namespaced_pod("graceful", namespace)
    core.delete_namespaced_pod("stubborn", namespace)
    gone = set()
    for ev in w.stream(core.list_namespaced_pod, namespace, timeout_seconds=30):
        p = ev["object"]
        cs = p.status.container_statuses or []
        if cs and cs[0].state.terminated:
            final[p.metadata.name] = (cs[0].state.terminated, time.monotonic() - t0)
        if ev["type"] == "DELETED":
            gone.add(p.metadata.name)
        if gone >= {"graceful", "stubborn"}:
            w.stop()
    out = follow.communicate(timeout=10)[0]
    assert "got SIGTERM" in out and "cleaned up" in out and "child got SIGTERM" not in out, out
    term, _ = final["graceful"]
    assert term.exit_code == 0
    term, took = final["stubborn"]
    assert term.exit_code == 137  # SIGKILL after its 2 s grace period
    assert 1.9 <= took < 6, took


def test_the_downward_api_annotations_file_changes_after_an_annotation_patch(core, namespace):
    create_pod(core, namespace, pod_manifest(
        "dw", ["sh", "-c", "while true; do cat /etc/podinfo/annotations; echo; echo ---; sleep 0.3; done"],
        metadata={"annotations": {"stage": "one"}},
        volumes=[{"name": "podinfo", "downwardAPI": {"items": [{"path": "annotations",
                                                               "fieldRef": {"fieldPath": "metadata.annotations"}}]}}],
        container={"volumeMounts": [{"name": "podinfo", "mountPath": "/etc/podinfo"}]}))
    wait_phase(core, namespace, "dw", "Running")
    wait_for(lambda: 'stage="one"' in logs(core, namespace, "dw"), what="the first annotation")
    core.patch_namespaced_pod("dw", namespace, {"metadata": {"annotations": {"stage": "two"}}})
    wait_for(lambda: 'stage="two"' in logs(core, namespace, "dw", tail_lines=5), timeout=20,
             what="the annotations file to change")


def test_a_pvcs_data_survives_its_pod(core, namespace):
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    vol = {"volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}],
           "container": {"volumeMounts": [{"name": "ckpt", "mountPath": "/checkpoints"}]}}
    create_pod(core, namespace, pod_manifest("writer", ["sh", "-c", "echo step-42 > /checkpoints/latest"], **vol))
    wait_phase(core, namespace, "writer", "Succeeded")
    core.delete_namespaced_pod("writer", namespace)
    wait_gone(core, namespace, "writer")
    create_pod(core, namespace, pod_manifest("reader", ["cat", "/checkpoints/latest"], **vol))
    wait_phase(core, namespace, "reader", "Succeeded")
    assert logs(core, namespace, "reader").strip() == "step-42"
    assert core.read_namespaced_persistent_volume_claim("ckpt", namespace).status.phase == "Bound"


def test_kubectl_logs_returns_a_pods_output_also_previous_and_follow(cluster, core, namespace):
    create_pod(core, namespace, pod_manifest(
        "talker", ["sh", "-c", "echo run-$(cat /proc/sys/kernel/random/uuid | cut -c1-4); for i in 1 2 3; do echo line $i; sleep 0.2; done; exit 1"],
        restart="OnFailure"))
    wait_for(lambda: (core.read_namespaced_pod("talker", namespace).status.container_statuses or [None])[0]
             and core.read_namespaced_pod("talker", namespace).status.container_statuses[0].restart_count >= 1,
             timeout=60, what="a restart")
    r = kubectl(cluster, "-n", namespace, "logs", "talker", "--previous")
    assert r.returncode == 0, r.stderr
    assert "line 3" in r.stdout and r.stdout.startswith("run-")
    r = kubectl(cluster, "-n", namespace, "logs", "-f", "talker", timeout=30)
    assert r.returncode == 0 and "line 3" in r.stdout
    r = kubectl(cluster, "-n", namespace, "logs", "talker", "--tail=1", "--timestamps", "--previous")
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "line 3" in r.stdout and r.stdout[:4].isdigit()


def test_a_pod_without_a_token_has_no_token_file_and_one_with_it_reaches_the_api(core, namespace):
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    create_pod(core, namespace, pod_manifest("notoken", ["sh", "-c", f"ls {sa_dir}/token 2>/dev/null && exit 1 || echo absent"],
                                             automountServiceAccountToken=False))
    check = ("import os, ssl, urllib.request, json\n"
             f"d = '{sa_dir}'\n"
             "tok = open(d + '/token').read(); ns = open(d + '/namespace').read()\n"
             "ctx = ssl.create_default_context(cafile=d + '/ca.crt')\n"
             "url = f\"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}/api/v1/namespaces/{ns}/pods\"\n"
             "req = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + tok})\n"
             "try:\n    urllib.request.urlopen(req, context=ctx)\nexcept urllib.error.HTTPError as e:\n    print('status', e.code)\n")
    create_pod(core, namespace, pod_manifest("withtoken", ["python", "-c", check]))
    wait_phase(core, namespace, "notoken", "Succeeded")
    assert logs(core, namespace, "notoken").strip().endswith("absent")
    wait_phase(core, namespace, "withtoken", "Succeeded")
    # Authenticated as the default ServiceAccount (TLS verified with the mounted CA), which RBAC forbids to list pods.
    assert logs(core, namespace, "withtoken").strip() == "status 403"


def test_a_projected_token_is_renewed_past_80_percent_of_its_lifetime(cluster, core, namespace, tmp_path):
    # The node's volume code against the real TokenRequest API, with the clock moved on (a token
    # lives at least 10 minutes; the agent calls refresh_tokens at every step of a pod).
    vol = {"name": "api", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 600}}]}}
    create_pod(core, namespace, pod_manifest("holder", ["sleep", "1"], volumes=[vol],
                                             nodeSelector={"pretrain.dev/no-such-node": "true"}))  # exists, never runs
    admin = nodes.admin_kube(cluster.state_dir)
    pod = admin.get(f"/api/v1/namespaces/{namespace}/pods/holder")
    vb = VolumeBuilder(admin, admin, pod, tmp_path, lambda: "10.244.0.250", "10.244.0.1", b"")
    token = Path(vb.build(vol)) / "token"
    first, t0 = token.read_text(), time.time()
    assert vb.refresh_tokens(now=t0 + 0.7 * 600) == [] and token.read_text() == first
    assert vb.refresh_tokens(now=t0 + 0.81 * 600) == ["api"]
    renewed = token.read_text()
    assert renewed != first
    review = admin.create("/apis/authentication.k8s.io/v1/tokenreviews",
                          {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": renewed}})
    assert review["status"]["authenticated"], review["status"]
    assert review["status"]["user"]["username"] == f"system:serviceaccount:{namespace}:default"


def test_a_restricted_compliant_pod_runs_as_non_root(core, namespace):
    # The namespace enforces restricted (conftest); runAsNonRoot with no user named: the node picks one.
    sc = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
          "seccompProfile": {"type": "RuntimeDefault"}}
    create_pod(core, namespace, pod_manifest("nonroot", ["sh", "-c", "id -u; touch /tmp/x && echo tmp-writable"],
                                             container={"securityContext": sc}, securityContext={}))
    wait_phase(core, namespace, "nonroot", "Succeeded")
    out = logs(core, namespace, "nonroot").split()
    assert out[0] != "0" and int(out[0]) > 0
    assert "tmp-writable" in out


def test_env_from_the_downward_api_configmaps_and_secrets_and_their_volumes_reach_the_container(core, namespace):
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"mode": "fast", "conf.yaml": "a: 1\n"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "sec"}, "stringData": {"password": "hunter2"}})
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
        {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
        {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "GREETING", "value": "mode=$(MODE)"},
    ]
    script = ("echo POD_NAME=$POD_NAME POD_NS=$POD_NS POD_IP=$POD_IP NODE=$NODE ROLE=$ROLE MEM_MI=$MEM_MI; "
              "echo MODE=$MODE PASS=$PASS GREETING=$GREETING PWD=$(pwd); cat /cfg/conf.yaml; cat /sec/password; echo; "
              "stat -c %g /data; id -G")
    create_pod(core, namespace, pod_manifest(
        "envy", ["sh", "-c", script], metadata={"labels": {"role": "worker"}},
        securityContext={**RESTRICTED_POD, "fsGroup": 2000},
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "sec", "secret": {"secretName": "sec"}},
                 {"name": "data", "emptyDir": {}}],
        container={"env": env, "workingDir": "/tmp", "resources": {"limits": {"memory": "256Mi"}},
                   "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}, {"name": "sec", "mountPath": "/sec", "readOnly": True},
                                    {"name": "data", "mountPath": "/data"}]}))
    p = wait_phase(core, namespace, "envy", "Succeeded", "Failed")
    out = logs(core, namespace, "envy")
    assert p.status.phase == "Succeeded", out
    assert (f"POD_NAME=envy POD_NS={namespace} POD_IP={p.status.pod_ip} NODE={p.spec.node_name} "
            "ROLE=worker MEM_MI=256") in out
    assert "MODE=fast PASS=hunter2 GREETING=mode=fast PWD=/tmp" in out
    assert "a: 1" in out and "hunter2" in out
    lines = out.strip().splitlines()
    assert lines[-2] == "2000"  # the emptyDir belongs to the fsGroup
    assert "2000" in lines[-1].split()


def test_a_container_whose_env_names_a_missing_secret_waits_saying_so_and_starts_once_it_exists(core, namespace):
    # As the kubelet does: waiting (CreateContainerConfigError), not a failed run, and tried again.
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    create_pod(core, namespace, pod_manifest("patient", ["sh", "-c", "echo TOKEN=$TOKEN"], container={"env": env}))

    def waiting():
        st = core.read_namespaced_pod("patient", namespace).status
        w = st.container_statuses and st.container_statuses[0].state.waiting
        return w if w and w.reason == "CreateContainerConfigError" else None
    w = wait_for(waiting, timeout=30, what="the container waiting on its Secret")
    assert "later" in w.message, w.message
    p = core.read_namespaced_pod("patient", namespace)
    assert p.status.phase == "Pending" and p.status.container_statuses[0].restart_count == 0
    core.create_namespaced_secret(namespace, {"metadata": {"name": "later"}, "stringData": {"token": "t0ken"}})
    assert wait_phase(core, namespace, "patient", "Succeeded", "Failed").status.phase == "Succeeded"
    assert "TOKEN=t0ken" in logs(core, namespace, "patient")


def test_readiness_probes_of_type_http_and_tcp_gate_the_ready_condition(core, namespace):
    # Answers 503 for its first 4 seconds, then 200.
    server = ("import http.server, time\n"
              "start = time.time()\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200 if time.time() - start > 4 else 503); self.end_headers()\n"
              "    def log_message(self, *a): pass\n"
              "http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()\n")
    create_pod(core, namespace, pod_manifest("web", ["python", "-c", server], restart="Always", container={
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1}}))
    create_pod(core, namespace, pod_manifest("tcp", ["python", "-c", server], restart="Always", container={
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}))

    def ready(name):
        p = core.read_namespaced_pod(name, namespace)
        return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])

    wait_for(lambda: ready("tcp"), what="the tcpSocket probe to pass")
    wait_phase(core, namespace, "web", "Running")
    assert not ready("web"), "the HTTP probe answers 503 for 4 s"
    wait_for(lambda: ready("web"), timeout=20, what="the httpGet probe to pass")


@pytest.mark.pod_security("privileged")  # a hostPath volume, which `restricted` forbids
def test_init_containers_run_in_order_before_the_containers_and_share_volumes(core, namespace, tmp_path):
    host = tmp_path / "host-dir"
    host.mkdir()
    (host / "from-host").write_text("hello from the host\n")
    host.chmod(0o777)
    vols = [{"name": "work", "emptyDir": {}}, {"name": "host", "hostPath": {"path": str(host), "type": "Directory"}}]
    mounts = [{"name": "work", "mountPath": "/work-dir"}, {"name": "host", "mountPath": "/host"}]
    init = [{"name": f"init-{i}", "image": "local", "command": ["sh", "-c", f"sleep 0.{3 - i}; echo init-{i} >> /work-dir/log"],
             "volumeMounts": mounts} for i in range(3)]
    body = pod_manifest("ordered", ["sh", "-c", "cat /work-dir/log /host/from-host; echo main > /host/from-pod"],
                        volumes=vols, container={"volumeMounts": mounts}, init=init,
                        securityContext={})  # as root: pytest's tmp_path is under root's private folder
    create_pod(core, namespace, body)
    p = wait_phase(core, namespace, "ordered", "Succeeded", "Failed")
    assert p.status.phase == "Succeeded"
    assert logs(core, namespace, "ordered").splitlines() == ["init-0", "init-1", "init-2", "hello from the host"]
    assert all(s.state.terminated.exit_code == 0 for s in p.status.init_container_statuses)
    assert any(c.type == "Initialized" and c.status == "True" for c in p.status.conditions)
    assert (host / "from-pod").read_text() == "main\n"


def test_a_pod_ip_is_not_handed_out_again_at_once(core, namespace):
    """As the CNI host-local IPAM: the next pod on a node gets the next free IP, not the one just
    freed, so a neighbour's ARP cache that still maps it to the old pod's MAC misleads nobody."""
    node = "ondemand-1"
    sleeper = ["python3", "-c", "import time; time.sleep(600)"]
    create_pod(core, namespace, pod_manifest("first", sleeper, node=node, terminationGracePeriodSeconds=0))
    first = wait_phase(core, namespace, "first", "Running").status.pod_ip
    core.delete_namespaced_pod("first", namespace, grace_period_seconds=0)
    wait_gone(core, namespace, "first")
    time.sleep(2)  # long after the agent has released the IP
    create_pod(core, namespace, pod_manifest("second", sleeper, node=node, terminationGracePeriodSeconds=0))
    second = wait_phase(core, namespace, "second", "Running").status.pod_ip
    assert second != first, (first, second)
    cidr = core.read_node(node).spec.pod_cidr
    assert ipaddress.ip_address(second) in ipaddress.ip_network(cidr)


def test_a_volume_mounted_over_the_checkout_leaves_this_machines_python_visible(core, namespace):
    # An emptyDir over the folder that holds the checkout and its virtualenv (as the chart's
    # operator mounts one at /tmp, over a clone in /tmp): the command still finds python and the
    # packages, read-only, and the volume itself is the pod's own empty folder.
    over = str(REPO_ROOT.parent)
    script = (f"import os, pretrain_operator; open({over!r} + '/mine', 'w').write('x'); "
              f"print('ok', sorted(os.listdir({over!r}))); "
              f"print('writable' if os.access({str(REPO_ROOT)!r}, os.W_OK) else 'read-only')")
    create_pod(core, namespace, pod_manifest("hidden", ["python", "-c", script], volumes=[{"name": "v", "emptyDir": {}}],
                                             container={"volumeMounts": [{"name": "v", "mountPath": over}]}))
    p = wait_phase(core, namespace, "hidden", "Succeeded", "Failed")
    out = logs(core, namespace, "hidden")
    assert p.status.phase == "Succeeded", out
    assert f"ok {sorted(['mine', REPO_ROOT.name])}" in out and "read-only" in out
    assert not (REPO_ROOT.parent / "mine").exists()  # written to the pod's emptyDir, not the host



def test_a_memory_emptydir_is_a_tmpfs_of_its_size_limit_shared_by_the_pods_containers_and_gone_with_it(core, namespace):
    # As the kubelet makes one (the operator mounts one at /dev/shm for async checkpoint staging).
    check = ("import errno, os\n"
             "st = os.statvfs('/dev/shm'); print('size', st.f_blocks * st.f_frsize)\n"
             "print('type', [l.split(' - ')[1].split()[0] for l in open('/proc/self/mountinfo') if l.split()[4] == '/dev/shm'][-1])\n"
             "print('from init:', open('/dev/shm/hello').read())\n"
             "try:\n    open('/dev/shm/big', 'wb').write(b'x' * 9 * 2**20); print('wrote 9 MiB')\n"
             "except OSError as e:\n    print('full', errno.errorcode[e.errno])\n")
    mount = {"volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}
    create_pod(core, namespace, pod_manifest(
        "shm", ["python", "-c", check], container=mount,
        init=[{"name": "init", "image": "local", "command": ["sh", "-c", "printf hi > /dev/shm/hello"], **mount}],
        volumes=[{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}}]))
    p = wait_phase(core, namespace, "shm", "Succeeded", "Failed")
    out = logs(core, namespace, "shm")
    assert p.status.phase == "Succeeded", out
    assert f"size {8 * 2**20}" in out and "type tmpfs" in out and "from init: hi" in out, out
    assert "full ENOSPC" in out, out
    # The pod is done: its tmpfs is unmounted on the host (its memory given back).
    wait_for(lambda: p.metadata.uid not in Path("/proc/self/mountinfo").read_text() or None, timeout=30,
             what="the pod's tmpfs unmounted")

BURN = """
import multiprocessing as mp, sys, time
def burn(until):
    while time.time() < until:
        pass
if __name__ == "__main__":
    print(open("/proc/self/cgroup").read(), flush=True)
    until = time.time() + float(sys.argv[1])
    procs = [mp.Process(target=burn, args=(until,)) for _ in range(int(sys.argv[2]))]
    [p.start() for p in procs]
    [p.join() for p in procs]
"""


def test_a_node_whose_pods_use_every_core_keeps_renewing_its_lease(api, core, namespace):
    # A kubelet's system-reserved CPU keeps a busy node's heartbeat alive; here the pods' processes
    # share one CPU cgroup weighted below the node agent and the control plane. Were the heartbeat
    # starved past the 8 s grace period, the node lifecycle controller would mark the node NotReady
    # and the operator would take the gang's pods for lost: a false preemption.
    burn_s, workers = 20, 12
    create_pod(core, namespace, pod_manifest("burn", ["python", "-c", BURN, str(burn_s), str(workers)]))
    node = wait_phase(core, namespace, "burn", "Running").spec.node_name
    leases = client.CoordinationV1Api(api)
    last_seen, changed_at, longest = None, time.monotonic(), 0.0
    end = time.monotonic() + burn_s - 2
    while time.monotonic() < end:
        renew = leases.read_namespaced_lease(node, "kube-node-lease").spec.renew_time
        t = time.monotonic()
        if renew != last_seen:
            last_seen, changed_at = renew, t
        longest = max(longest, t - changed_at)
        time.sleep(0.25)
    ready = next(c for c in core.read_node(node).status.conditions if c.type == "Ready")
    assert ready.status == "True", (ready.reason, ready.message)
    # The agent renews every 2 s; 5 s leaves room for a slow request, not for a starved heartbeat.
    assert longest < 5.0, f"node {node}'s lease went {longest:.1f} s without a renewal under load"
    assert "pretrain-local-kubepods" in logs(core, namespace, "burn")
