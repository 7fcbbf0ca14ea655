"""Elastic gangs (spec.elastic.minNodes): a gang that cannot all be placed within its start timeout
restarts on the nodes the scheduler found, with a smaller data-parallel degree and the same global
batch, and the attempt after tries every node again. The sizes against the CRD's own rules, then
reconcile.decide on observed state, then a gang on the local cluster whose fourth pod finds no room."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from pretrain_operator import api, cel, contract as c, elastic, reconcile, render
from tests.helpers import wait_for
from tests.jobs import Jobs, job_manifest, observed_gang


def _spec(nodes=4, nproc=1, minimum=1, **over) -> api.PretrainJobSpec:
    body = {"nodes": nodes, "nprocPerNode": nproc, "elastic": {"minNodes": minimum},
            "parallelism": {"data": nodes * nproc}, "data": {"globalBatchSize": 8 * nodes}}
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v}
    return api.PretrainJobSpec.model_validate(body)


LAYOUTS = [
    ("data parallel, a batch 3 does not divide", _spec(nodes=4, data={"globalBatchSize": 32})),
    ("tensor 2 over 2 ranks a node", _spec(nodes=4, nproc=2, parallelism={"data": 4, "tensor": 2}, data={"globalBatchSize": 24})),
    ("tensor 4 spanning 2 nodes of 2 ranks", _spec(nodes=6, nproc=2, minimum=2, parallelism={"data": 3, "tensor": 4},
                                                   data={"globalBatchSize": 12}, model={"preset": "small"})),
    ("experts over 2 data ranks", _spec(nodes=6, minimum=2, parallelism={"data": 6, "expert": 2}, data={"globalBatchSize": 48},
                                        model={"moe": {"experts": 4}})),
    ("DualPipeV needs 4 microbatches", _spec(nodes=4, nproc=2, minimum=2, parallelism={"data": 4, "pipeline": 2,
                                             "pipelineSchedule": "DualPipeV"}, data={"globalBatchSize": 16})),
]


def _at(spec: api.PretrainJobSpec, nodes: int) -> api.PretrainJobSpec | None:
    """The spec on `nodes` nodes, built by hand (None when tensor x pipeline does not divide the ranks)."""
    p = spec.parallelism
    ranks = nodes * spec.nprocPerNode
    if ranks % (p.tensor * p.pipeline):
        return None
    return spec.model_copy(update={"nodes": nodes, "parallelism": p.model_copy(update={"data": ranks // (p.tensor * p.pipeline)})})


def _trainer_refuses(spec: api.PretrainJobSpec) -> list[str]:
    """What the trainer's check of its config (the ConfigMap's, rendered from `spec`) finds."""
    return cel.violations(api.PretrainJobSpec.model_validate(yaml.safe_load(render.trainer_config(spec))))


@pytest.mark.parametrize("case,spec", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_the_node_counts_a_job_may_shrink_to_are_those_the_crds_rules_accept(case, spec):
    assert cel.violations(spec) == []
    for n in range(1, spec.nodes + 1):
        at = _at(spec, n)
        assert elastic.fits(spec, n) == (at is not None and _trainer_refuses(at) == []), (case, n)
        if elastic.fits(spec, n):
            assert elastic.resized(spec, n) == at
    assert elastic.fits(spec, spec.elastic.minNodes)  # the CRD's rule on minNodes (pipeline schedules' rules aside)


def test_explicit_pipeline_microbatches_keep_their_size_on_fewer_nodes():
    # 16 samples over 4 data ranks in 4 microbatches: 1 sample each. On 2 nodes (data 2): 8 of 1
    # sample, not 4 of 2 (twice the activations' memory).
    spec = _spec(nodes=4, nproc=2, minimum=2, parallelism={"data": 4, "pipeline": 2, "microbatches": 4}, data={"globalBatchSize": 16})
    assert elastic.microbatches(spec, 4) == 4 and elastic.microbatches(spec, 2) == 8
    assert elastic.resized(spec, 2).parallelism.microbatches == 8
    assert _trainer_refuses(elastic.resized(spec, 2)) == []
    # 24 samples in 2 microbatches of 3 on 4 data ranks: on 3 (data 3), 8 per rank is no whole count of 3.
    spec = _spec(nodes=4, nproc=2, minimum=2, parallelism={"data": 4, "pipeline": 2, "microbatches": 2}, data={"globalBatchSize": 24})
    assert elastic.microbatches(spec, 3) is None and not elastic.fits(spec, 3) and elastic.fits(spec, 2)


def test_counts_torch_s_pipeline_schedules_refuse_are_skipped():
    # Interleaved1F1B runs whole rounds of microbatches: 3 on 3 nodes (one round) is fine, 9 on
    # 1 node (4 rounds of 2, one left over) torch refuses, and 2 nodes do not divide the batch of 9.
    spec = _spec(nodes=3, nproc=2, parallelism={"data": 3, "pipeline": 2, "pipelineSchedule": "Interleaved1F1B"},
                 data={"globalBatchSize": 9})
    assert cel.violations(spec) == [] and elastic.fits(spec, 3)
    assert not elastic.fits(spec, 1) and not elastic.fits(spec, 2)
    assert elastic.shrink_to(spec, current=3, placed=1) is None
    # 1F1B needs a microbatch per stage at least: 2 microbatches for 4 stages do not run.
    spec = _spec(nodes=2, nproc=4, parallelism={"data": 1, "pipeline": 4, "microbatches": 1}, data={"globalBatchSize": 2},
                 model={"layers": 4})
    assert not elastic.fits(spec, 1)


def test_the_next_count_is_the_largest_that_fits_between_min_nodes_and_the_pods_placed():
    spec = LAYOUTS[0][1]  # 4 nodes, batch 32: 3 does not fit
    assert elastic.shrink_to(spec, current=4, placed=3) == 2
    assert elastic.shrink_to(spec, current=4, placed=0) == 1  # none placed: the fewest allowed
    assert elastic.shrink_to(spec, current=2, placed=1) == 1  # a shrunk attempt shrinks further
    assert elastic.shrink_to(spec, current=4, placed=4) is None  # all placed: capacity is not what is missing
    assert elastic.shrink_to(spec.model_copy(update={"elastic": None}), current=4, placed=2) is None
    assert elastic.shrink_to(spec.model_copy(update={"elastic": api.Elastic(minNodes=4)}), current=4, placed=2) is None
    # Already at the fewest it may run on: that count again, not the whole gang (still short).
    assert elastic.shrink_to(spec.model_copy(update={"elastic": api.Elastic(minNodes=2)}), current=2, placed=1) == 2


def _gang(name: str, *, nodes: int = 4, placed: int = 3, waited: int = 70, minimum: int | None = 1):
    """Attempt 1 of an elastic job of `nodes` (batch 8 x nodes, start timeout 60 s) begun `waited`
    seconds ago: `placed` pods running, the others Pending, unschedulable."""
    now = dt.datetime.now(dt.timezone.utc)
    job, _, _, _, _ = observed_gang(name, now=now)
    job["spec"].update(nodes=nodes, parallelism={"data": nodes}, data={"globalBatchSize": 8 * nodes},
                       scheduling={"startTimeoutSeconds": 60})
    if minimum:
        job["spec"]["elastic"] = {"minNodes": minimum}
    t = reconcile.iso(now - dt.timedelta(seconds=waited))
    job["status"].update(phase="Starting", attemptStartTime=t, startTime=t, nodes=nodes, readyNodes=f"{placed}/{nodes}")
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    pods = render.gang(job, spec, 1)
    for i, p in enumerate(pods):
        if i < placed:
            p["spec"]["nodeName"] = f"spot-{i}"
            p["status"] = {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": t}}}]}
        else:
            p["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                               "message": "0/3 nodes are available: 3 Insufficient cpu."}]}
    ready = {f"spot-{i}": {"metadata": {"name": f"spot-{i}"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
             for i in range(placed)}
    return job, spec, pods, ready, now


def _decide(job, spec, pods, nodes, now, config=None, **observed) -> reconcile.Plan:
    return reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True,
                                               config_data=config if config is not None else render.trainer_config(spec), now=now,
                                               **observed))


def _env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_an_elastic_gang_that_cannot_all_start_restarts_on_the_nodes_the_scheduler_placed():
    job, spec, pods, nodes, now = _gang("short")
    plan = _decide(job, spec, pods, nodes, now)
    st = plan.status
    # The size is recorded with the restart's intent, before any pod is touched.
    assert st["attempt"] == 2 and st["nodes"] == 2 and st["readyNodes"] == "0/2"
    assert st["failures"] == 0 and st["preemptions"] == 0
    assert st["restart"]["kind"] == "StartTimeout" and st["restart"]["reason"] == "ElasticShrink"
    assert st["restart"]["message"] == ("only 3/4 node(s) running after 60 s; 3 pod(s) placed: the next attempt runs on 2 of 4 "
                                        "node(s) (parallelism.data 2, elastic.minNodes 1)")
    assert ("Warning", "StartTimeout", "attempt 1 ended (ElasticShrink: " + st["restart"]["message"] + "); starting attempt 2") in plan.events
    # The next pass (an operator killed after that write decides the same from the status): the
    # old gang goes; then the config is the 2-node layout and the gang 2 pods of it, in one pass.
    job["status"] = st
    plan = _decide(job, spec, pods, nodes, now)
    assert sorted(plan.delete_pods + plan.force_delete_pods) == [p["metadata"]["name"] for p in pods] and not plan.create
    job["status"] = plan.status
    plan = _decide(job, spec, [], {}, now)
    written = yaml.safe_load(plan.update_config["data"][c.CONFIG_FILE])
    assert written["nodes"] == 2 and written["parallelism"]["data"] == 2 and written["data"]["globalBatchSize"] == 32
    assert "elastic" not in written and cel.violations(api.PretrainJobSpec.model_validate(written)) == []  # the trainer's check
    assert "elastic" not in yaml.safe_load(render.trainer_config(spec))  # the operator's field, at any size
    made = [p for p in plan.create if p["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in made] == ["short-a2-n0", "short-a2-n1"]
    assert all(_env(p)["PET_NNODES"] == "2" for p in made)
    # Both running: Running, and said to be the elastic count.
    job["status"] = plan.status
    for i, p in enumerate(made):
        p["spec"]["nodeName"] = f"spot-{i}"
        p["status"] = {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    plan = _decide(job, spec, made, nodes, now, config=plan.update_config["data"][c.CONFIG_FILE])
    assert plan.status["phase"] == "Running" and plan.status["readyNodes"] == "2/2" and plan.update_config is None
    assert ("Normal", "Running", "attempt 2: all 2 node(s) running (2 of the spec's 4: elastic)") in plan.events


def test_an_elastic_gang_a_quota_lets_only_part_of_be_created_shrinks_to_what_was_created_and_placed():
    # A ResourceQuota with room for two pods of four: the API server refused the others; at the
    # start timeout the two created (and placed) are what the next attempt runs on.
    job, spec, pods, nodes, now = _gang("quota", placed=2)
    job["status"]["gangCreated"] = False
    refused = (403, 'pods "quota-a1-n2" is forbidden: exceeded quota: gpus')
    st = _decide(job, spec, pods[:2], nodes, now, create_error=refused).status
    assert st["attempt"] == 2 and st["nodes"] == 2 and st["restart"]["reason"] == "ElasticShrink"
    assert st["restart"]["message"] == (f"only 2/4 pod(s) created after 60 s ({refused[1]}); 2 pod(s) placed: the next "
                                        "attempt runs on 2 of 4 node(s) (parallelism.data 2, elastic.minNodes 1)")


def test_without_elastic_or_with_every_pod_placed_the_gang_restarts_whole():
    job, spec, pods, nodes, now = _gang("rigid", minimum=None)
    st = _decide(job, spec, pods, nodes, now).status
    assert st["restart"]["reason"] == "GangStartTimeout" and st["nodes"] == 4
    # Every pod has a node, one still pulling its image: waiting on something other than capacity.
    job, spec, pods, nodes, now = _gang("pulling")
    pods[3]["spec"]["nodeName"] = "spot-2"
    pods[3]["status"] = {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}]}
    st = _decide(job, spec, pods, nodes, now).status
    assert st["restart"]["reason"] == "GangStartTimeout" and st["nodes"] == 4
    # Elastic and short, but no smaller count fits (minNodes 3; 3 nodes do not divide the batch of 32): said.
    # (The CRD refuses this minNodes; pipeline schedules' rules, which it does not check, can leave a job so.)
    job, spec, pods, nodes, now = _gang("nofit", minimum=3)
    st = _decide(job, spec, pods, nodes, now).status
    assert st["restart"]["reason"] == "GangStartTimeout" and st["nodes"] == 4
    assert st["restart"]["message"].endswith("3 pod(s) placed, and no count from elastic.minNodes 3 below 4 fits the layout "
                                             "(docs/operations.md): all 4 node(s) again")


def test_the_attempt_after_a_shrunk_one_tries_every_node_again():
    job, spec, pods, nodes, now = _gang("regrow", placed=2)
    st = _decide(job, spec, pods, nodes, now).status
    assert st["nodes"] == 2
    # Attempt 2 runs on 2 nodes; then one of them is reclaimed (its pod evicted).
    job["status"] = {**st, "phase": "Running", "gangCreated": True, "attemptStartTime": reconcile.iso(now)}
    small = render.gang(job, elastic.resized(spec, 2), 2)
    for i, p in enumerate(small):
        p["spec"]["nodeName"] = f"spot-{i}"
        p["status"] = {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    small[1]["status"] = {"phase": "Failed", "reason": "Evicted", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]}
    st = _decide(job, spec, small, nodes, now).status
    assert st["attempt"] == 3 and st["restart"]["kind"] == "Preemption" and st["preemptions"] == 1
    assert st["nodes"] == 4 and st["readyNodes"] == "0/4"


def _shrunk_running(name: str, *, ran_s: int, regrow: int | None = 600, step: int = 57, **spec_over):
    """Attempt 2 of a 4-node elastic job (`spec_over` on its spec), Running on 2 nodes (spot-0 and
    spot-1, of four ready) for `ran_s` seconds, at `step` of 400."""
    job, spec, pods, nodes, now = observed_gang(name)
    job["spec"].update(nodes=4, parallelism={"data": 4}, data={"globalBatchSize": 32},
                       elastic={"minNodes": 1, **({"regrowAfterSeconds": regrow} if regrow else {})}, **spec_over)
    nodes = {f"spot-{i}": {"metadata": {"name": f"spot-{i}"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
             for i in range(4)}
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    since = reconcile.iso(now - dt.timedelta(seconds=ran_s))
    job["status"].update(attempt=2, nodes=2, progress={"step": step, "totalSteps": 400, "updated": reconcile.iso(now)},
                         conditions=[{"type": "Running", "status": "True", "reason": "AllNodesRunning", "message": "",
                                      "lastTransitionTime": since}])
    pods = render.gang(job, elastic.resized(spec, 2), 2)
    for i, p in enumerate(pods):
        p["spec"]["nodeName"] = f"spot-{i}"
        p["status"] = {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    return job, spec, pods, nodes, now


def test_a_shrunk_gang_tries_every_node_again_after_regrow_after_seconds_of_running():
    # An operator without a capacity probe image (PRETRAIN_OPERATOR_CAPACITY_PROBE_IMAGE=""): at once.
    job, spec, pods, nodes, now = _shrunk_running("regrown", ran_s=700)
    plan = _decide(job, spec, pods, nodes, now, config=render.trainer_config(elastic.resized(spec, 2)))
    st = plan.status
    assert st["attempt"] == 3 and st["nodes"] == 4 and st["failures"] == 0 and st["preemptions"] == 0
    assert st["restart"]["kind"] == "Regrow" and st["restart"]["reason"] == "ElasticRegrow"
    assert st["restart"]["message"] == "ran on 2 of 4 node(s) for more than elastic.regrowAfterSeconds (600 s): trying all 4 again"
    assert [e[:2] for e in plan.events] == [("Normal", "Regrow")]
    # Not yet; without regrowAfterSeconds; at the last step (it ends by itself): it runs on.
    for kw in ({"ran_s": 500}, {"ran_s": 7000, "regrow": None}, {"ran_s": 7000, "step": 400}):
        job, spec, pods, nodes, now = _shrunk_running("stays", **kw)
        plan = _decide(job, spec, pods, nodes, now, config=render.trainer_config(elastic.resized(spec, 2)))
        assert plan.status["attempt"] == 2 and plan.status["phase"] == "Running" and not plan.delete_pods, kw
    # A whole gang is not regrown.
    assert elastic.regrow_due(spec, 4, now - dt.timedelta(seconds=7000), now, 57) == ("", False)
    # A count the spec no longer allows (elastic removed, minNodes raised) is regrown at once.
    for changed, why in ((None, "(removed)"), (api.Elastic(minNodes=3), "(minNodes 3)")):
        job, spec, pods, nodes, now = _shrunk_running("changed", ran_s=10, regrow=None)
        spec = spec.model_copy(update={"elastic": changed})
        st = _decide(job, spec, pods, nodes, now, config=render.trainer_config(elastic.resized(spec, 2))).status
        assert st["restart"]["kind"] == "Regrow" and st["nodes"] == 4
        assert st["restart"]["message"] == f"running on 2 of 4 node(s), which spec.elastic no longer allows {why}: trying all 4 again"


def test_a_job_from_before_elastic_gangs_runs_its_whole_gang():
    # A status written by an operator without status.nodes (an upgrade mid-run): the spec's count,
    # recorded (the gauge and the NODES column read it).
    job, spec, pods, nodes, now = observed_gang("older")
    assert "nodes" not in job["status"]
    plan = _decide(job, spec, pods, nodes, now)
    assert plan.status["readyNodes"] == "2/2" and plan.status["phase"] == "Running" and not plan.create
    assert plan.status["nodes"] == 2


def _roomless(name: str, label: str) -> dict:
    """Four pods of 5 CPUs for the pool's three nodes of 8: one pod each, the fourth unschedulable.
    3 nodes give no whole layout for a batch of 32, so the job shrinks to 2 (the stand-in trainer
    exits 85 unless its config's layout is the world torchrun would give it). 15 s of steps: the
    stand-in's ranks do not wait for each other, and one that finished would make room for the fourth."""
    body = job_manifest(name, nodes=4, steps=150, step_s=0.1, pool=label, elastic={"minNodes": 1},
                        resources={"requests": {"cpu": "5"}})
    body["spec"]["scheduling"]["startTimeoutSeconds"] = 8
    return body


def _ran_shrunk(jobs: Jobs, name: str) -> dict:
    st = jobs.wait_phase(name, "Succeeded", timeout=120)
    assert st["attempt"] == 2 and st["nodes"] == 2 and st["failures"] == 0 and st["preemptions"] == 0
    assert st["restart"]["reason"] == "ElasticShrink" and "runs on 2 of 4 node(s)" in st["restart"]["message"]
    assert sorted(p.metadata.name for p in jobs.pods(name, attempt=2, live=False)) == [f"{name}-a2-n0", f"{name}-a2-n1"]
    return st


def test_a_gang_with_no_room_for_every_pod_runs_shrunk_on_the_cluster_and_finishes(api, namespace, operator, pool):
    jobs = Jobs(api, namespace)
    jobs.create(_roomless("roomless", pool[0]))
    _ran_shrunk(jobs, "roomless")
    jobs.wait_events("roomless", "StartTimeout", "Running")


def test_an_operator_killed_between_the_shrunk_config_and_the_shrunk_gang_converges(api, core, namespace, operator, pool, tmp_path):
    from tests.operator_fixture import OperatorProcess
    jobs = Jobs(api, namespace)
    operator.stop()
    faulty = OperatorProcess(operator.kubeconfig, tmp_path).start(crash_at=f"old-pods-gone:before-create:{namespace}/killed")
    try:
        jobs.create(_roomless("killed", pool[0]))
        assert faulty.wait_exit(90) == 17, faulty.log_path.read_text()[-3000:]
    finally:
        faulty.stop()
    # Between the writes: the shrink recorded, attempt 1's pods gone, the config the 2-node one, no gang.
    st = jobs.status("killed")
    assert st["attempt"] == 2 and st["nodes"] == 2 and not jobs.pods("killed", live=False)
    config = yaml.safe_load(core.read_namespaced_config_map("killed-config", namespace).data[c.CONFIG_FILE])
    assert config["nodes"] == 2 and config["parallelism"]["data"] == 2
    operator.start()
    _ran_shrunk(jobs, "killed")


PAUSE = "registry.k8s.io/pause:3.10"


def _probing(name: str, placed: int, **over):
    """_shrunk_running's job due to regrow (run 700 s of 600), its node selector, toleration and
    priority, with capacity probes of its attempt: `placed` of `over.get("probes", 2)` on a node."""
    job, spec, pods, nodes, now = _shrunk_running(
        name, ran_s=700, resources={"requests": {"cpu": "5", "nvidia.com/gpu": "8"}},
        scheduling={"nodeSelector": {"pool": "spot"}, "priorityClassName": "training",
                    "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]},
        checkpoint={"intervalSteps": 5, "claimName": "checkpoints"})
    probes = [render.probe(job, spec, 2, i, PAUSE) for i in range(over.get("probes", 2))]
    for i, p in enumerate(probes[:placed]):
        p["spec"]["nodeName"] = f"spot-{2 + i}"
    return job, spec, pods, nodes, now, probes


def _probe_pass(job, spec, pods, nodes, now, probes, image=PAUSE) -> reconcile.Plan:
    return _decide(job, spec, pods, nodes, now, config=render.trainer_config(elastic.resized(spec, 2)),
                   probes=probes, probe_image=image)


def test_a_probe_holds_the_room_of_one_more_trainer_pod_and_nothing_else():
    job, spec, pods, _, _, _ = _probing("shape", 0)
    probe, rank = render.probe(job, spec, 2, 1, PAUSE), pods[0]
    assert probe["metadata"]["name"] == "shape-a2-p1"
    assert probe["metadata"]["labels"][c.LABEL_PROBE] == "2" and probe["metadata"]["labels"][c.LABEL_JOB] == "shape"
    # Not a rank: nothing reads it as one of the gang (its attempt's pods, rank 0's metrics).
    assert c.LABEL_ATTEMPT not in probe["metadata"]["labels"] and c.LABEL_NODE_RANK not in probe["metadata"]["labels"]
    (box,) = probe["spec"]["containers"]
    assert box["image"] == PAUSE and "command" not in box and "env" not in box
    assert box["resources"] == rank["spec"]["containers"][0]["resources"]
    assert box["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    for key in ("nodeSelector", "tolerations", "priorityClassName", "securityContext"):
        assert probe["spec"][key] == rank["spec"][key], key
    assert "hostname" not in probe["spec"] and "subdomain" not in probe["spec"]
    assert probe["spec"]["automountServiceAccountToken"] is False and "initContainers" not in probe["spec"]
    # The checkpoint claim (where a zonal volume can be attached), not the config or the podinfo.
    assert [v["name"] for v in probe["spec"]["volumes"]] == [render.CHECKPOINT_VOLUME]
    assert probe["spec"]["terminationGracePeriodSeconds"] == 0
    # An init container's room is the pod's too: mirrored by a pause one (which never ends: the
    # probe stays in Init, its room counted all the same), as a sidecar when it is one.
    job["spec"]["template"]["initContainers"] = [
        {"name": "stage", "image": "busybox", "command": ["cp"], "resources": {"requests": {"ephemeral-storage": "500Gi"}}},
        {"name": "proxy", "image": "envoy", "restartPolicy": "Always", "resources": {"requests": {"cpu": "1"}}}]
    staged = render.probe(job, api.PretrainJobSpec.model_validate(job["spec"]), 2, 0, PAUSE)["spec"]["initContainers"]
    assert [(i["name"], i["image"], i["resources"], i.get("restartPolicy")) for i in staged] == [
        ("stage", PAUSE, {"requests": {"ephemeral-storage": "500Gi"}}, None), ("proxy", PAUSE, {"requests": {"cpu": "1"}}, "Always")]
    assert all("command" not in i for i in staged)
    # A job in a Kueue queue: its probes are not the queue's.
    job["spec"]["scheduling"]["queueName"] = "team"
    queued = render.probe(job, api.PretrainJobSpec.model_validate(job["spec"]), 2, 0, PAUSE)
    assert not [k for k in {**queued["metadata"]["labels"], **queued["metadata"]["annotations"]} if k.startswith("kueue.x-k8s.io/")]


def test_a_shrunk_gang_due_to_regrow_trains_on_until_probes_for_every_missing_node_are_placed():
    # Due: a probe per missing node is created, the gang trains on, and the job says so once.
    job, spec, pods, nodes, now, probes = _probing("probed", 0)
    plan = _probe_pass(job, spec, pods, nodes, now, [])
    st = plan.status
    assert st["attempt"] == 2 and st["phase"] == "Running" and not plan.delete_pods
    assert [p["metadata"]["name"] for p in plan.create] == ["probed-a2-p0", "probed-a2-p1"]
    assert plan.create == probes
    assert st["message"] == ("attempt 2: running on 2 of 4 node(s); ran on 2 of 4 node(s) for more than "
                             "elastic.regrowAfterSeconds (600 s): waiting for room for 2 more (0/2 capacity probe pod(s) placed)")
    assert [e[:2] for e in plan.events] == [("Normal", "CapacityProbe")] and plan.stage == "probing"
    # The round's start, on record with the intent (a round lasts scheduling.startTimeoutSeconds).
    assert st["capacityProbesSince"] == reconcile.iso(now) and plan.requeue_after == 600
    # One placed: nothing created or deleted, no Event again; the count in the message.
    job, spec, pods, nodes, now, probes = _probing("probed", 1)
    job["status"]["message"] = st["message"]
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert plan.status["attempt"] == 2 and not plan.create and not plan.delete_pods and not plan.events
    assert "(1/2 capacity probe pod(s) placed)" in plan.status["message"]
    # Refused (a quota): said in the message.
    plan = reconcile.decide(reconcile.Observed(job=job, spec=spec, pods=pods, nodes=nodes, service_exists=True, now=now,
                                               config_data=render.trainer_config(elastic.resized(spec, 2)), probes=probes[:1],
                                               probe_image=PAUSE, create_error=(403, "exceeded quota: gpus")))
    assert plan.status["message"].endswith("; the API server refused the probes: exceeded quota: gpus")
    # One placed whose container ended (an image that is not a pause image): it holds no room.
    probes[0]["status"] = {"phase": "Succeeded"}
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert plan.status["attempt"] == 2 and "(0/2 capacity probe pod(s) placed)" in plan.status["message"]
    assert plan.status["message"].endswith(f"; probe probed-a2-p0 ended, and holds no room: the operator's capacity probe "
                                           f"image must run until stopped ({PAUSE})")
    # All placed: the regrow, recorded before anything is deleted.
    job, spec, pods, nodes, now, probes = _probing("probed", 2)
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    st = plan.status
    assert st["attempt"] == 3 and st["nodes"] == 4 and st["restart"]["kind"] == "Regrow" and st["failures"] == 0
    assert st["restart"]["message"] == ("ran on 2 of 4 node(s) for more than elastic.regrowAfterSeconds (600 s), and the "
                                        "scheduler placed 2 capacity probe pod(s) for the other 2 node(s): trying all 4 again")
    assert not plan.delete_pods and not plan.create
    # The next passes: the old gang goes, while the probes hold the room (its pods may take their
    # whole grace period to checkpoint); then the probes; then the new gang, once both are gone.
    job["status"] = st
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert sorted(plan.delete_pods) == ["probed-a2-n0", "probed-a2-n1"] and not plan.create
    plan = _probe_pass(job, spec, [], nodes, now, probes)
    assert sorted(plan.delete_pods) == ["probed-a2-p0", "probed-a2-p1"] and not plan.create
    plan = _probe_pass(job, spec, [], nodes, now, [])
    assert sorted(p["metadata"]["name"] for p in plan.create) == [f"probed-a3-n{r}" for r in range(4)]
    assert plan.status["capacityProbesSince"] == ""


def test_a_probe_evicted_or_on_a_lost_node_is_replaced_and_not_counted():
    job, spec, pods, nodes, now, probes = _probing("lost", 2)
    job["status"]["capacityProbesSince"] = reconcile.iso(now)
    probes[0]["status"] = {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
    nodes["spot-3"]["status"]["conditions"][0]["status"] = "Unknown"  # probes[1]'s node, gone dark
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert plan.status["attempt"] == 2 and "(0/2 capacity probe pod(s) placed)" in plan.status["message"]
    # Deleted (the one on the lost node with grace period 0, and no Event about a gang there), and
    # made again once gone.
    assert plan.delete_pods == ["lost-a2-p0"] and plan.force_delete_pods == ["lost-a2-p1"] and not plan.create
    assert not [e for e in plan.events if e[1] == "PodForceDeleted"]
    assert [p["metadata"]["name"] for p in _probe_pass(job, spec, pods, nodes, now, []).create] == ["lost-a2-p0", "lost-a2-p1"]
    # On a node under a termination notice: not counted, left to go with its node.
    job, spec, pods, nodes, now, probes = _probing("noticed", 2)
    nodes["spot-3"]["spec"] = {"taints": [{"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"}]}
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert plan.status["attempt"] == 2 and "(1/2 capacity probe pod(s) placed)" in plan.status["message"] and not plan.delete_pods


def test_probes_of_an_older_spec_are_made_again():
    # The request raised while the probes wait: probes of 8 GPUs say nothing of room for 16.
    job, spec, pods, nodes, now, probes = _probing("changed", 2)
    job["spec"]["resources"]["requests"]["nvidia.com/gpu"] = "16"
    spec = api.PretrainJobSpec.model_validate(job["spec"])
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert plan.status["attempt"] == 2 and sorted(plan.delete_pods) == ["changed-a2-p0", "changed-a2-p1"]
    made = _probe_pass(job, spec, pods, nodes, now, []).create
    assert [p["spec"]["containers"][0]["resources"]["limits"] for p in made] == [{"nvidia.com/gpu": "16"}] * 2


def test_a_round_of_probes_that_ends_short_gives_its_room_back_and_the_next_begins_after_a_pause():
    # Half of the room, for a whole round: no partial set of probes holds it for longer.
    job, spec, pods, nodes, now, probes = _probing("rounds", 1)
    since = reconcile.parse(reconcile.iso(now - dt.timedelta(seconds=600)))  # whole seconds, as on record
    job["status"]["capacityProbesSince"] = reconcile.iso(since)
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    pause = reconcile.probe_pause("u1", reconcile.iso(since), 600)
    again = since + dt.timedelta(seconds=600 + pause)
    assert sorted(plan.delete_pods) == ["rounds-a2-p0", "rounds-a2-p1"] and not plan.create and plan.status["attempt"] == 2
    assert plan.status["message"].endswith("no room for 2 more within scheduling.startTimeoutSeconds (600 s); probing again "
                                           f"at {reconcile.iso(again)}")
    assert [e[:2] for e in plan.events] == [("Normal", "CapacityProbe")]
    assert plan.requeue_after == pytest.approx((again - now).total_seconds())
    # The pause: from one round to two, and not the same for another job (which may hold the other half).
    assert 600 <= pause < 1200 and pause != reconcile.probe_pause("u2", reconcile.iso(since), 600)
    # A pass that comes late (an operator restarted across the round's end) and finds every probe
    # placed regrows: the room is there.
    job2, spec2, pods2, nodes2, _, probes2 = _probing("rounds", 2)
    job2["status"]["capacityProbesSince"] = reconcile.iso(since)
    assert _probe_pass(job2, spec2, pods2, nodes2, now, probes2).status["restart"]["kind"] == "Regrow"
    # During it: nothing made, nothing said again; after it, a new round.
    job["status"] = plan.status
    plan = _probe_pass(job, spec, pods, nodes, now + dt.timedelta(seconds=60), [])
    assert not plan.create and not plan.events
    later = again + dt.timedelta(seconds=1)
    plan = _probe_pass(job, spec, pods, nodes, later, [])
    assert len(plan.create) == 2 and plan.status["capacityProbesSince"] == reconcile.iso(later)


def test_probes_are_held_through_a_regrow_s_drain_only():
    # A preemption while probing: the next gang tries every node anyway; the probes go at once.
    job, spec, pods, nodes, now, probes = _probing("preempted", 1)
    job["status"].update(phase="Restarting", attempt=3, nodes=4, attemptStartTime="",
                         restart={"kind": "Preemption", "fromAttempt": 2, "reason": "NodeDeleted", "requestedAt": reconcile.iso(now)})
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert {"preempted-a2-p0", "preempted-a2-p1"} <= set(plan.delete_pods)
    # A regrow whose old pods are stuck (a finalizer): the room is not held for them, and that is said.
    job["status"]["restart"]["kind"] = "Regrow"
    for p in pods:
        p["metadata"]["deletionTimestamp"] = reconcile.iso(now - dt.timedelta(seconds=120))
        p["metadata"]["finalizers"] = ["example.com/hold"]
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert sorted(plan.delete_pods) == ["preempted-a2-p0", "preempted-a2-p1"]
    assert "pod preempted-a2-n0 of attempt 2 was to be gone" in plan.status["message"]
    # A probe stuck is said as one.
    probes[0]["metadata"]["deletionTimestamp"] = reconcile.iso(now - dt.timedelta(seconds=120))
    assert reconcile.overdue(probes, now).startswith("capacity probe preempted-a2-p0 was to be gone")


def test_probes_go_when_the_gang_no_longer_waits_for_them():
    # Elastic removed while probing: the regrow at once, the probes deleted once the old gang is gone.
    job, spec, pods, nodes, now, probes = _probing("gone", 1)
    spec = spec.model_copy(update={"elastic": None})
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert plan.status["restart"]["kind"] == "Regrow" and not plan.delete_pods  # held while the old gang drains
    job["status"] = plan.status
    assert sorted(_probe_pass(job, spec, [], nodes, now, probes).delete_pods) == ["gone-a2-p0", "gone-a2-p1"]
    # At its last step (it ends by itself), suspended, failed: no probes either.
    job, spec, pods, nodes, now, probes = _probing("last", 1)
    job["status"]["progress"]["step"] = 400
    job["status"].update(capacityProbesSince=reconcile.iso(now), message="attempt 2: running on 2 of 4 node(s); waiting")
    job["status"]["conditions"][0]["message"] = "attempt 2: all 2 node(s) running (2 of the spec's 4: elastic)"
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert sorted(plan.delete_pods) == ["last-a2-p0", "last-a2-p1"] and plan.status["capacityProbesSince"] == ""
    assert plan.status["message"] == "attempt 2: all 2 node(s) running (2 of the spec's 4: elastic)"  # no longer waiting
    job, spec, pods, nodes, now, probes = _probing("held", 1)
    job["status"]["capacityProbesSince"] = reconcile.iso(now)
    plan = _probe_pass(job, spec.model_copy(update={"suspend": True}), pods, nodes, now, probes)
    assert plan.status["phase"] == "Suspended" and {"held-a2-p0", "held-a2-p1"} <= set(plan.delete_pods)
    assert plan.status["capacityProbesSince"] == ""  # the round ends with the run (status shows no probing)
    # Every rank done mid-round: Succeeded, the probes deleted, no round left in status.
    job, spec, pods, nodes, now, probes = _probing("done", 1)
    job["status"]["capacityProbesSince"] = reconcile.iso(now)
    for p in pods:
        p["status"] = {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 0}}}]}
    plan = _probe_pass(job, spec, pods, nodes, now, probes)
    assert plan.status["phase"] == "Succeeded" and plan.status["capacityProbesSince"] == ""
    job["status"] = plan.status
    assert {"done-a2-p0", "done-a2-p1"} <= set(_probe_pass(job, spec, [], nodes, now, probes).delete_pods)
    job, spec, pods, nodes, now, probes = _probing("failed", 1)
    job["status"]["phase"] = "Failed"
    assert {"failed-a2-p0", "failed-a2-p1"} <= set(_probe_pass(job, spec, pods, nodes, now, probes).delete_pods)
    # A probe of an earlier attempt; one more than the gang misses (minNodes changed): deleted.
    job, spec, pods, nodes, now, probes = _probing("stale", 0, probes=3)
    stale = render.probe(job, spec, 1, 0, PAUSE)
    plan = _probe_pass(job, spec, pods, nodes, now, probes + [stale])
    assert sorted(plan.delete_pods) == ["stale-a1-p0", "stale-a2-p2"] and plan.status["attempt"] == 2


def test_a_job_in_a_kueue_queue_or_an_operator_without_a_probe_image_regrows_without_probing():
    job, spec, pods, nodes, now, _ = _probing("blind", 0)
    queued = spec.model_copy(update={"scheduling": spec.scheduling.model_copy(update={"queueName": "team"})})
    for s, image in ((queued, PAUSE), (spec, "")):
        plan = _probe_pass(job, s, pods, nodes, now, [], image=image)
        assert plan.status["restart"]["kind"] == "Regrow" and not plan.create, image
    # Against the same job with an image and no queue: probes.
    assert [p["metadata"]["name"] for p in _probe_pass(job, spec, pods, nodes, now, []).create] == ["blind-a2-p0", "blind-a2-p1"]


def _probes_of(core, namespace: str, name: str) -> list:
    return [p for p in core.list_namespaced_pod(namespace, label_selector=f"{c.LABEL_JOB}={name},{c.LABEL_PROBE}").items
            if not p.metadata.deletion_timestamp]


def test_a_shrunk_gang_regrows_once_probes_find_room_even_after_an_operator_killed_before_creating_them(
        api, core, cluster, namespace, operator, pool, tmp_path):
    from pretrain_localcluster import nodes as local_nodes
    from tests.operator_fixture import OperatorProcess
    jobs = Jobs(api, namespace)
    body = _roomless("regrow", pool[0])
    body["spec"]["training"]["steps"] = 1500  # 150 s of steps: it runs shrunk past regrowAfterSeconds
    body["spec"]["elastic"]["regrowAfterSeconds"] = 60
    operator.stop()
    faulty = OperatorProcess(operator.kubeconfig, tmp_path).start(crash_at=f"probing:before-create:{namespace}/regrow")
    try:
        jobs.create(body)
        assert faulty.wait_exit(150) == 17, faulty.log_path.read_text()[-3000:]
    finally:
        faulty.stop()
    # Between the writes: the probing said, no probe made; the shrunk gang trains on meanwhile.
    st = jobs.status("regrow")
    assert st["attempt"] == 2 and st["nodes"] == 2 and st["phase"] == "Running"
    assert "waiting for room for 2 more (0/2 capacity probe pod(s) placed)" in st["message"], st["message"]
    assert not _probes_of(core, namespace, "regrow")
    # Rounds of probes last startTimeoutSeconds: 8 s was for the shrink; the rest of the test is one round.
    jobs.patch("regrow", {"spec": {"scheduling": {"startTimeoutSeconds": 300}}})
    # A quota with room for one probe: the other is refused, said, and no reconcile of the job fails.
    from kubernetes import client
    core.create_namespaced_resource_quota(namespace, client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="three-pods"), spec=client.V1ResourceQuotaSpec(hard={"pods": "3"})))
    wait_for(lambda: (core.read_namespaced_resource_quota("three-pods", namespace).status or client.V1ResourceQuotaStatus()).used,
             timeout=30, what="the quota's status")
    operator.start()
    st = jobs.wait("regrow", lambda s: "refused the probes" in (s.get("message") or ""), timeout=60, what="the refusal")
    assert "exceeded quota" in st["message"] and st["attempt"] == 2, st["message"]
    assert f"reconcile {namespace}/regrow" not in operator.log_path.read_text()
    core.delete_namespaced_resource_quota("three-pods", namespace)
    # The pool's third node has room for one probe; the other waits for a node that is not there.
    wait_for(lambda: jobs.status("regrow")["message"].endswith("(1/2 capacity probe pod(s) placed)"), timeout=60,
             what="one probe placed, the other made")
    placed = sorted(p.spec.node_name or "" for p in _probes_of(core, namespace, "regrow"))
    assert placed[0] == "" and placed[1] in pool[1], placed
    # The placed one holds its room: its pause container runs (the node's command for a pause image).
    wait_for(lambda: sorted(p.status.phase for p in _probes_of(core, namespace, "regrow")) == ["Pending", "Running"],
             timeout=30, what="the placed probe running")
    assert jobs.status("regrow")["attempt"] == 2 and [p.status.phase for p in jobs.pods("regrow", attempt=2)] == ["Running"] * 2
    # A fourth node comes (an autoscaler's answer to the pending probe): the gang regrows on all four.
    extra = local_nodes.add_node(cluster.state_dir, spot=True, labels={"pretrain.dev/test-pool": pool[0]})
    try:
        st = jobs.wait_phase("regrow", "Succeeded", timeout=240)
    finally:
        local_nodes.remove_node(cluster.state_dir, extra)
    assert st["attempt"] == 3 and st["nodes"] == 4 and st["failures"] == 0 and st["preemptions"] == 0
    assert st["restart"]["kind"] == "Regrow" and "placed 2 capacity probe pod(s)" in st["restart"]["message"]
    assert not _probes_of(core, namespace, "regrow")
    jobs.wait_events("regrow", "StartTimeout", "CapacityProbe", "Regrow")
