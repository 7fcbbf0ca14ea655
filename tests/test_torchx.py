"""The TorchX scheduler `pretrainjob` and the `pretrain` component, through the real `torchx` CLI
against the local cluster and the real operator. One test runs the real trainer (torch, from the
trainer extra); the others run the stand-in trainer through the component's `--command`, as the
operator's tests do, so they stay fast.

    .venv/bin/python -m pytest tests/test_torchx.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx import specs
from torchx.specs import AppState

from pretrain_operator import api
from pretrain_torchx.scheduler import AppDefError, Opts, app_state, app_to_job, create_scheduler
from pretrain_trainer.components import pretrain
from tests.helpers import wait_for
from tests.jobs import Jobs
from tests.operator_fixture import STANDIN

TORCHX = str(Path(sys.executable).parent / "torchx")
COMPONENT = "pretrain_trainer.components:pretrain"
SESSION_ID = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def jobs(api, namespace, operator) -> Jobs:
    return Jobs(api, namespace)


@pytest.fixture
def torchx(cluster, tmp_path):
    """`torchx ARGS...` as a user types it (KUBECONFIG set; TORCHXCONFIG empty: no .torchxconfig is read)."""
    env = dict(os.environ, KUBECONFIG=str(cluster.cfg.kubeconfig), TORCHX_INTERNAL_SESSION_ID=SESSION_ID,
               TORCHXCONFIG="")

    def run(*args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        r = subprocess.run([TORCHX, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"torchx {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r
    run.env = env
    run.cwd = tmp_path
    return run


@pytest.fixture
def follow(torchx):
    """`torchx log -t TARGET` running in the background; stopped at teardown if still running."""
    procs = []

    def start(target: str) -> subprocess.Popen:
        procs.append(subprocess.Popen([TORCHX, "log", "-t", target], cwd=torchx.cwd, env=torchx.env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return procs[-1]
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def standin_args(steps: int, step_s: float = 0.2, *extra: str, fail: str = "") -> list[str]:
    env = f"STANDIN_STEP_SECONDS={step_s}" + (f",STANDIN_FAIL={fail}" if fail else "")
    return [COMPONENT, "--nodes", "2", "--steps", str(steps), "--checkpoint_interval", "2",
            "--command", f"python {STANDIN}", "--env", env, *extra]


def handle_of(r: subprocess.CompletedProcess) -> str:
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("pretrainjob://"))
    return line.strip()


def name_of(handle: str) -> str:
    return handle.rsplit(":", 1)[1]


def make_claim(core, namespace: str, name: str = "ckpt") -> str:
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    return name


def test_torchx_run_of_the_component_reaches_succeeded_and_status_and_log_show_it(jobs, torchx, follow, api, core, namespace):
    make_claim(core, namespace)
    handle = handle_of(torchx("run", "-s", "pretrainjob", "-cfg", f"namespace={namespace}",
                              *standin_args(20, 0.2, "--checkpoint_claim", "ckpt")))
    assert handle.startswith(f"pretrainjob://torchx/{namespace}:pretrain-")
    name = name_of(handle)
    # Follow rank 0 from the start: the stream ends by itself when the job is done.
    tail = follow(f"{handle}/trainer/0")
    st = jobs.wait_phase(name, "Succeeded", timeout=90)
    assert st["attempt"] == 1 and st["lastCheckpoint"]["step"] == 20
    out, err = tail.communicate(timeout=60)
    assert tail.returncode == 0, err
    assert "trainer/0" in out and "resuming at step 0 of 20" in out and "done at step 20" in out, out
    job = jobs.get(name)
    assert job["spec"]["nodes"] == 2 and job["spec"]["checkpoint"]["claimName"] == "ckpt"
    assert job["spec"]["template"]["command"] == ["python", STANDIN]

    status = torchx("status", handle).stdout
    assert "SUCCEEDED" in status and "attempt 1" in status and "last checkpoint step 20" in status, status
    status_json = json.loads(torchx("status", "--json", handle).stdout)
    assert status_json["state"] == "SUCCEEDED" and status_json["app_id"] == f"{namespace}:{name}"

    logs = torchx("log", f"{handle}/trainer").stdout  # every replica of the role
    for rank in (0, 1):
        assert f"trainer/{rank}" in logs and f"attempt 1 rank {rank}: resuming at step 0 of 20" in logs, logs
    listed = torchx("list", "-s", "pretrainjob", "-cfg", f"namespace={namespace}").stdout
    assert f"{namespace}:{name}" in listed and "SUCCEEDED" in listed, listed

    # --since: the scheduler's log_iter keeps only what rank 0 wrote after the cut.
    pod = core.read_namespaced_pod(f"{name}-a1-n0", namespace)
    run = pod.status.container_statuses[0].state.terminated
    assert (run.finished_at - run.started_at).total_seconds() >= 3  # 20 steps of 0.2 s
    cut = run.started_at + (run.finished_at - run.started_at) / 2
    sched = create_scheduler("torchx", client=api)
    app_id = f"{namespace}:{name}"
    whole = "".join(sched.log_iter(app_id, "trainer", 0))
    later = "".join(sched.log_iter(app_id, "trainer", 0, since=cut))
    assert "resuming at step 0" in whole and "resuming at step 0" not in later and "done at step 20" in later, later
    upto = "".join(sched.log_iter(app_id, "trainer", 0, until=cut))
    assert "resuming at step 0" in upto and "done at step" not in upto, upto


def test_the_component_runs_the_real_trainer_to_succeeded(jobs, torchx, core, namespace):
    pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")
    handle = handle_of(torchx("run", "-s", "pretrainjob", "-cfg", f"namespace={namespace},max_failures=0", COMPONENT,
                              "--nodes", "2", "--steps", "4", "--seq_len", "32", "--global_batch_size", "4",
                              "--checkpoint_interval", "2", "--checkpoint_claim", make_claim(core, namespace)))
    name = name_of(handle)
    st = jobs.wait_phase(name, "Succeeded", "Failed", timeout=180)
    assert st["phase"] == "Succeeded", st.get("message")
    assert st["attempt"] == 1 and st["lastCheckpoint"]["step"] == 4, (st.get("restart"), st.get("lastCheckpoint"))
    assert jobs.get(name)["spec"]["template"]["command"] == []  # the operator's torchrun + trainer
    logs = torchx("log", f"{handle}/trainer/0").stdout
    assert "done: 4 steps" in logs, logs


def test_following_a_rank_s_log_carries_on_across_a_gang_restart(jobs, torchx, follow, core, namespace):
    # Rank 1 fails after 3 steps of attempt 1; the gang restarts from the checkpoint rank 0 saves on SIGTERM.
    handle = handle_of(torchx("run", "-s", "pretrainjob", "-cfg", f"namespace={namespace}",
                              *standin_args(40, 0.2, "--checkpoint_claim", make_claim(core, namespace), fail="1:1:3:1")))
    name = name_of(handle)
    tail = follow(f"{handle}/trainer/0")
    st = jobs.wait_phase(name, "Succeeded", timeout=90)
    assert st["attempt"] == 2 and st["failures"] == 1
    out, err = tail.communicate(timeout=60)
    assert tail.returncode == 0, err
    first = out.find("attempt 1 rank 0: resuming at step 0 of 40")
    saved = out.find(": checkpoint saved")
    second = out.find("attempt 2 rank 0: resuming at step")
    assert 0 <= first < saved < second < out.find("done at step 40"), out + err
    status = torchx("status", handle).stdout
    assert "attempt 2" in status and "failures 1" in status, status


def test_dryrun_prints_exactly_the_pretrainjob_that_run_creates(jobs, torchx, api, namespace):
    args = ["-s", "pretrainjob", "-cfg",
            f"namespace={namespace},queue=team-a,spot=True,max_failures=7,tolerations=dedicated:ml:NoSchedule;gpu",
            *standin_args(500, 0.5, "--cpu", "1", "--memMB", "512")]
    dry = torchx("run", "--dryrun", *args).stdout
    printed = yaml.safe_load(dry.split("=== SCHEDULER REQUEST ===", 1)[1])
    handle = handle_of(torchx("run", *args))
    name = name_of(handle)
    created = jobs.get(name)
    # Each run gets a fresh random suffix; everything else is the same object.
    expected = yaml.safe_load(yaml.safe_dump(printed).replace(printed["metadata"]["name"], name))
    assert created["spec"] == expected["spec"]
    assert created["metadata"]["labels"] == expected["metadata"]["labels"]
    assert created["metadata"]["namespace"] == expected["metadata"]["namespace"] == namespace
    spec = created["spec"]
    assert spec["scheduling"]["queueName"] == "team-a" and spec["failurePolicy"]["maxFailures"] == 7
    assert {"key": "cloud.google.com/gke-spot", "operator": "Exists", "effect": "NoSchedule", "value": ""} \
        in spec["scheduling"]["tolerations"]
    assert spec["scheduling"]["tolerations"][-2:] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "gpu", "operator": "Exists", "value": "", "effect": ""}]
    assert spec["resources"] == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}
    env = {e["name"]: e["value"] for e in spec["template"]["env"]}
    assert env["TORCHX_JOB_ID"] == f"pretrainjob://torchx/{namespace}:{name}"
    create_scheduler("torchx", client=api).cancel(f"{namespace}:{name}")


def test_cancel_leaves_no_pod_service_configmap_or_job(jobs, torchx, core, namespace):
    handle = handle_of(torchx("run", "-s", "pretrainjob", "-cfg", f"namespace={namespace}", *standin_args(500, 0.5)))
    name = name_of(handle)
    jobs.wait_phase(name, "Running", timeout=60)
    assert len(jobs.pods(name)) == 2
    assert "RUNNING" in torchx("status", handle).stdout
    torchx("cancel", handle)
    wait_for(lambda: jobs.get(name) is None and not jobs.pods(name, live=False)
             and not core.list_namespaced_service(namespace).items
             and not [m for m in core.list_namespaced_config_map(namespace).items if m.metadata.name == f"{name}-config"],
             timeout=60, what="the job and its pods, Service and ConfigMap to be gone")
    r = torchx("status", handle, check=False)
    assert r.returncode != 0 and "does not exist or has been removed" in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_spec_the_api_refuses_is_a_clear_error_before_anything_is_created(jobs, torchx, namespace):
    # 2 nodes x 1 process cannot hold 3-way tensor parallelism: the CRD's CEL rule says so, by name.
    r = torchx("run", "-s", "pretrainjob", "-cfg", f"namespace={namespace},checkpoint_claim=ckpt", COMPONENT,
               "--nodes", "2", "--tensor", "3", check=False)
    assert r.returncode != 0
    assert "parallelism.data x parallelism.tensor x parallelism.pipeline must equal nodes x nprocPerNode" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    # An unknown preset: the typed model names the field before the API server is asked.
    r = torchx("run", "-s", "pretrainjob", "--dryrun", "-cfg", f"namespace={namespace}", COMPONENT, "--preset", "huge",
               check=False)
    assert r.returncode != 0 and "model.preset" in r.stderr, r.stderr
    assert jobs.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)["items"] == []


def _app(**role) -> specs.AppDef:
    base = dict(name="trainer", image="img", entrypoint="python", args=["train.py"], num_replicas=2)
    return specs.AppDef("bad", roles=[specs.Role(**{**base, **role})])


@pytest.mark.parametrize("app, message", [
    (specs.AppDef("two", roles=[specs.Role("a", "img", entrypoint="x"), specs.Role("b", "img", entrypoint="x")]),
     "runs one role"),
    (_app(port_map={"tensorboard": 6006}), "port_map"),
    (_app(mounts=[specs.BindMount("/data", "/data")]), "bind mount /data is not supported"),
    (_app(mounts=[specs.DeviceMount("/dev/fuse", "/dev/fuse")]), "device mount /dev/fuse is not supported"),
    (_app(mounts=[specs.VolumeMount("a", "/a"), specs.VolumeMount("b", "/b")]), "2 volume mounts"),
    (_app(min_replicas=3), "min_replicas=3 must be from 1 to num_replicas=2"),
    (_app(max_retries=2, retry_policy=specs.RetryPolicy.REPLICA), "retry_policy REPLICA"),
    (_app(args=["--rank", specs.macros.replica_id]), "${replica_id} is not supported"),
    (_app(env={"PET_NNODES": "4"}), "['PET_NNODES'] belongs to the operator's contract"),
    (_app(metadata={"kubernetes": {"spec": {}}}), "metadata ['kubernetes'] is not for the pretrainjob scheduler"),
    (_app(metadata={"pretrainjob": {"nodes": 5}}), "disagrees with num_replicas=2"),
    (_app(metadata={"pretrainjob": {"nprocPerNode": 0}}), "nprocPerNode"),
    (pretrain(nodes=2), "2 nodes of the trainer need a shared checkpoint volume"),
])
def test_an_unsupported_appdef_feature_is_refused_naming_it(app, message):
    with pytest.raises(AppDefError, match=None) as e:
        create_scheduler("t").submit_dryrun(app, {"validate_spec": False})
    assert message in str(e.value), str(e.value)


def test_a_malformed_toleration_run_option_is_refused_naming_the_format():
    with pytest.raises(AppDefError, match="is not KEY, KEY:EFFECT or KEY:VALUE:EFFECT"):
        create_scheduler("t").submit_dryrun(_app(), {"validate_spec": False, "tolerations": ["gpu:Sometimes"]})


def test_an_appdef_maps_onto_nodes_resources_checkpoint_volume_and_scheduling():
    app = pretrain(nodes=3, nproc_per_node=4, tensor=2, preset="small", steps=50, cpu=8, gpu=4, memMB=65536,
                   checkpoint_claim="ckpt", checkpoint_path="/ckpt", env={"HF_HOME": "/tmp/hf"})
    app.roles[0].resource.capabilities["node.kubernetes.io/instance-type"] = "p4d.24xlarge"
    app.roles[0].resource.devices["vpc.amazonaws.com/efa"] = 4
    job = app_to_job(app, Opts(namespace="ml", tolerations=["dedicated:ml:NoSchedule", "gpu"]), "pretrain-abc123")
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    assert (spec.nodes, spec.nprocPerNode) == (3, 4)
    assert (spec.parallelism.data, spec.parallelism.tensor) == (6, 2)
    assert spec.resources.requests == {"cpu": "8", "memory": "65536Mi", "nvidia.com/gpu": "4", "vpc.amazonaws.com/efa": "4"}
    assert spec.resources.limits == {"memory": "65536Mi", "nvidia.com/gpu": "4", "vpc.amazonaws.com/efa": "4"}
    assert spec.scheduling.nodeSelector == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
    assert [t.model_dump(exclude_none=True) for t in spec.scheduling.tolerations] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "gpu", "operator": "Exists", "value": "", "effect": ""}]
    assert (spec.checkpoint.claimName, spec.checkpoint.path) == ("ckpt", "/ckpt")
    assert spec.template.command == []  # the trainer's own command: the operator's default
    assert {"name": "HF_HOME", "value": "/tmp/hf"} in [e.model_dump(exclude_none=True) for e in spec.template.env]
    assert spec.model.preset == "small" and spec.training.steps == 50 and spec.optimizer.warmupSteps == 10
    assert job["metadata"]["namespace"] == "ml"
    assert spec.elastic is None  # no min_nodes: always the whole gang


def test_min_replicas_below_num_replicas_is_an_elastic_gang():
    app = pretrain(nodes=4, min_nodes=2, global_batch_size=8, checkpoint_claim="ckpt")
    assert app.roles[0].min_replicas == 2
    spec = api.PretrainJobSpec.model_validate(app_to_job(app, Opts(namespace="ml"), "pretrain-abc123")["spec"])
    assert spec.nodes == 4 and spec.elastic.minNodes == 2
    # Any AppDef's role (TorchX's own `-j 2:4`), beside elastic options given in the role's metadata.
    app = _app(num_replicas=4, min_replicas=1, metadata={"pretrainjob": {"elastic": {"minNodes": 4, "regrowAfterSeconds": 3600}}})
    spec = api.PretrainJobSpec.model_validate(app_to_job(app, Opts(namespace="ml"), "bad-abc123")["spec"])
    assert spec.elastic.model_dump() == {"minNodes": 1, "regrowAfterSeconds": 3600}


@pytest.mark.parametrize("phase, state", [
    ("Pending", AppState.PENDING), ("Suspended", AppState.PENDING), ("Starting", AppState.RUNNING),
    ("Running", AppState.RUNNING), ("Restarting", AppState.RUNNING), ("Succeeded", AppState.SUCCEEDED),
    ("Failed", AppState.FAILED)])
def test_phases_map_to_torchx_states(phase, state):
    assert app_state({"metadata": {}, "status": {"phase": phase}}) == state


def test_torchx_finds_the_scheduler_and_its_run_options(torchx):
    out = torchx("runopts", "pretrainjob").stdout
    for opt in ("namespace", "image", "checkpoint_claim", "queue", "spot", "tolerations", "max_failures"):
        assert opt in out, out


def test_the_scheduler_and_the_component_import_without_torch():
    code = ("import sys, pretrain_torchx.scheduler, pretrain_trainer.components; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
