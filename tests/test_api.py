"""The PretrainJob API: the committed CRD is the generated one; the real API server rejects bad
specs with a message naming the field (a table of them); every example in examples/ is accepted;
the trainer's config and the operator's spec are one model; the CRD's rules across fields, checked
in Python where no API server runs (the trainer's --config), refuse the same table with the same
messages."""

from __future__ import annotations

import copy
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from pretrain_localcluster import binaries
from pretrain_localcluster.config import REPO_ROOT
from pretrain_operator import api as ptapi, cel, crdgen, render

CRD_FILE = REPO_ROOT / "crds" / "pretrain.dev_pretrainjobs.yaml"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def test_the_committed_crd_is_the_one_generated_from_the_models():
    assert CRD_FILE.read_text() == crdgen.render(), "run: python -m pretrain_operator.crdgen > " + str(CRD_FILE)


def test_the_trainer_config_round_trips_through_the_same_model():
    spec = ptapi.PretrainJobSpec.model_validate({"nodes": 2, "nprocPerNode": 2, "parallelism": {"data": 2, "tensor": 2},
                                               "checkpoint": {"async": True}})
    again = ptapi.PretrainJobSpec.model_validate(yaml.safe_load(render.trainer_config(spec)))
    assert again == spec and again.checkpoint.asyncSave is True


BASE = {"nodes": 2, "nprocPerNode": 2, "parallelism": {"data": 2, "tensor": 2}}


def _with(path: str, value, base: dict | None = None) -> dict:
    spec = copy.deepcopy(base or BASE)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return spec


# (case, spec, text the API server's message must contain)
INVALID = [
    ("world size mismatch", _with("parallelism", {"data": 3, "tensor": 2}), "parallelism.data x parallelism.tensor x parallelism.pipeline must equal nodes x nprocPerNode"),
    ("nodes zero", _with("nodes", 0), "spec.nodes"),
    ("nodes negative", _with("nodes", -1), "spec.nodes"),
    ("nprocPerNode too big", _with("nprocPerNode", 65), "spec.nprocPerNode"),
    ("nodes not an integer", _with("nodes", "two"), "spec.nodes"),
    ("unknown field", _with("replicas", 2), 'unknown field \\"spec.replicas\\"'),
    ("unknown nested field", _with("parallelism.foo", 1), 'unknown field \\"spec.parallelism.foo\\"'),
    ("layers not divisible by pipeline", {"nodes": 1, "nprocPerNode": 3, "parallelism": {"pipeline": 3}}, "model.layers must be divisible by parallelism.pipeline"),
    ("interleaved needs 2x stages", {"nodes": 1, "nprocPerNode": 4, "parallelism": {"pipeline": 4, "pipelineSchedule": "Interleaved1F1B"}}, "model.layers must be divisible by parallelism.pipeline"),
    ("bad pipeline schedule", _with("parallelism.pipelineSchedule", "ZeroBubble"), "spec.parallelism.pipelineSchedule"),
    ("heads not divisible by tensor", {"nodes": 1, "nprocPerNode": 3, "parallelism": {"tensor": 3}, "model": {"preset": "custom", "dim": 64, "layers": 3, "heads": 4, "kvHeads": 4, "vocabSize": 100, "ffnDim": 128, "maxSeqLen": 64}}, "model.heads must be divisible by parallelism.tensor"),
    ("kvHeads not divisible by tensor", {"nodes": 1, "nprocPerNode": 4, "parallelism": {"tensor": 4}}, "model.kvHeads must be divisible by parallelism.tensor"),
    ("heads not divisible by kvHeads", _with("model", {"heads": 4, "kvHeads": 3}), "model.heads must be divisible by model.kvHeads"),
    ("custom preset without sizes", _with("model", {"preset": "custom", "dim": 64}), "model.preset 'custom' needs"),
    ("unknown preset", _with("model.preset", "gpt5"), "spec.model.preset"),
    ("experts not divisible by expert degree", _with("model.moe", {"experts": 6}, _with("parallelism", {"data": 2, "tensor": 2, "expert": 4})), "model.moe.experts must be divisible by parallelism.expert"),
    ("expert degree without moe", _with("parallelism", {"data": 2, "tensor": 2, "expert": 2}), "parallelism.expert needs model.moe"),
    ("expert degree does not divide data parallelism", _with("model.moe", {"experts": 8}, _with("parallelism", {"data": 2, "tensor": 2, "expert": 4})), "must divide parallelism.data"),
    ("topK above experts", _with("model.moe", {"experts": 2, "topK": 3}), "model.moe.topK must not exceed model.moe.experts"),
    ("lora with moe", _with("lora", {"rank": 8}, _with("model.moe", {"experts": 4})), "lora with model.moe is not supported"),
    ("batch not divisible", _with("data", {"globalBatchSize": 6, "microBatchSize": 2}), "data.globalBatchSize must be divisible by parallelism.data x data.microBatchSize"),
    ("micro batch zero", _with("data.microBatchSize", 0), "spec.data.microBatchSize"),
    ("seqLen above maxSeqLen", _with("data.seqLen", 4096), "data.seqLen must not exceed model.maxSeqLen"),
    ("seqLen not divisible by tensor", _with("data.seqLen", 33), "data.seqLen must be divisible by parallelism.tensor"),
    ("lr zero", _with("optimizer.lr", 0), "spec.optimizer.lr"),
    ("validation under a V-shaped pipeline", _with("validation", {"everySteps": 10}, {"nodes": 1, "nprocPerNode": 2, "parallelism": {"pipeline": 2, "pipelineSchedule": "DualPipeV"}}), "validation does not run under parallelism.pipelineSchedule ZBVZeroBubble or DualPipeV"),
    ("DualPipeV with too few microbatches", {"nodes": 1, "nprocPerNode": 2, "parallelism": {"pipeline": 2, "pipelineSchedule": "DualPipeV"}, "data": {"globalBatchSize": 2}}, "DualPipeV needs at least 2 x parallelism.pipeline microbatches"),
    ("decayFraction zero", _with("optimizer.decayFraction", 0), "spec.optimizer.decayFraction"),
    ("unknown decayType", _with("optimizer.decayType", "step"), "spec.optimizer.decayType"),
    ("minLr above lr", _with("optimizer", {"lr": 0.001, "minLr": 0.01}), "optimizer.minLr must not exceed optimizer.lr"),
    ("warmup beyond steps", _with("optimizer.warmupSteps", 500, _with("training.steps", 100)), "optimizer.warmupSteps must not exceed training.steps"),
    ("steps zero", _with("training.steps", 0), "spec.training.steps"),
    ("bad precision", _with("training.precision", "fp8"), "spec.training.precision"),
    ("checkpoint interval zero", _with("checkpoint.intervalSteps", 0), "spec.checkpoint.intervalSteps"),
    ("keep zero", _with("checkpoint.keep", 0), "spec.checkpoint.keep"),
    ("negative maxFailures", _with("failurePolicy.maxFailures", -1), "spec.failurePolicy.maxFailures"),
    ("exit code in both lists", _with("failurePolicy", {"retryableExitCodes": [85]}), "must not share a code"),
    ("progress deadline shorter than a progress read", _with("failurePolicy.progressDeadlineSeconds", 5), "spec.failurePolicy.progressDeadlineSeconds"),
    ("elastic minNodes zero", _with("elastic", {"minNodes": 0}), "spec.elastic.minNodes"),
    ("elastic minNodes above nodes", _with("elastic", {"minNodes": 3}), "elastic.minNodes must not exceed nodes"),
    ("elastic minNodes with no whole layout", _with("elastic", {"minNodes": 1}, _with("parallelism", {"data": 1, "tensor": 4})),
     "elastic.minNodes must give a whole layout"),
    ("elastic regrow sooner than a minute", _with("elastic", {"minNodes": 1, "regrowAfterSeconds": 30}), "spec.elastic.regrowAfterSeconds"),
    ("lora rank zero", _with("lora", {"rank": 0}), "spec.lora.rank"),
    ("lora dropout one", _with("lora", {"dropout": 1.0}), "spec.lora.dropout"),
    ("bad toleration operator", _with("scheduling.tolerations", [{"key": "a", "operator": "Maybe"}]), "spec.scheduling.tolerations[0].operator"),
    ("start timeout zero", _with("scheduling.startTimeoutSeconds", 0), "spec.scheduling.startTimeoutSeconds"),
    ("negative ttl", _with("ttlSecondsAfterFinished", -5), "spec.ttlSecondsAfterFinished"),
    ("active deadline zero", _with("activeDeadlineSeconds", 0), "spec.activeDeadlineSeconds"),
    ("moe topK zero", _with("model.moe", {"topK": 0}), "spec.model.moe.topK"),
    ("moe bias update rate above 1", _with("model.moe", {"biasUpdateRate": 2}), "spec.model.moe.biasUpdateRate"),
    ("shm size not a quantity", _with("template.shmSize", "lots"), "spec.template.shmSize"),
    ("validation every zero steps", _with("validation", {"everySteps": 0}), "spec.validation.everySteps"),
    ("validation of no batches", _with("validation", {"batches": 0}), "spec.validation.batches"),
    ("negative maxSkippedSteps", _with("training.maxSkippedSteps", -1), "spec.training.maxSkippedSteps"),
    ("profile of no steps", _with("training.profile", {"steps": 0}), "spec.training.profile.steps"),
    ("data path and sources both", _with("data", {"path": "/data/a", "sources": [{"path": "/data/b"}]}), "data.path and data.sources are exclusive"),
    ("data source of weight zero", _with("data.sources", [{"path": "/data/a", "weight": 0}]), "spec.data.sources[0].weight"),
    ("data source without a path", _with("data.sources", [{"weight": 2}]), "spec.data.sources[0].path"),
    # What the pod API refuses, refused here instead (before, every pod of the job was refused).
    ("toleration of an empty key with Equal", _with("scheduling.tolerations", [{"effect": "NoSchedule"}]), "a toleration with an empty key needs operator Exists"),
    ("toleration Exists with a value", _with("scheduling.tolerations", [{"key": "a", "operator": "Exists", "value": "x"}]), "a toleration with operator Exists takes no value"),
    ("tolerationSeconds without NoExecute", _with("scheduling.tolerations", [{"key": "spot", "tolerationSeconds": 60}]), "tolerationSeconds needs effect NoExecute"),
    ("empty image", _with("image", ""), "spec.image"),
    ("resource not a quantity", _with("resources.requests", {"cpu": "lots"}), "spec.resources.requests.cpu"),
    ("volume named as the pod's own", _with("template.volumes", [{"name": "config", "emptyDir": {}}]), "template.volumes must not use the names of the pod's own volumes"),
    ("mount over the trainer's config", _with("template.volumeMounts", [{"name": "x", "mountPath": "/etc/pretrain"}]), "template.volumeMounts must not mount over the pod's own"),
    ("checkpoint path on /dev/shm", _with("checkpoint.path", "/dev/shm"), "checkpoint.path must not be a mount point of the pod's own"),
    ("checkpoint path mounted again", _with("template.volumeMounts", [{"name": "x", "mountPath": "/checkpoints"}]), "checkpoint.path must not be a mount point"),
    # The pods' metadata and identity: the operator's own keys and variables stay its own.
    ("label with the operator's prefix", _with("template.labels", {"pretrain.dev/job": "other"}), "template.labels must not set the operator's own keys"),
    ("Kueue's queue label by hand", _with("template.labels", {"kueue.x-k8s.io/queue-name": "q"}), "use scheduling.queueName"),
    ("label key not a qualified name", _with("template.labels", {"cost center": "ml"}), "template.labels: each key must be a qualified name"),
    ("label value not a label value", _with("template.labels", {"team": "ml research"}), "spec.template.labels.team"),
    ("annotation with the operator's prefix", _with("template.annotations", {"pretrain.dev/checkpoint-request": "x"}), "template.annotations must not set the operator's own keys"),
    ("annotation key not a qualified name", _with("template.annotations", {"/x": "y"}), "template.annotations: each key must be a qualified name"),
    ("env with value and valueFrom", _with("template.env", [{"name": "K", "value": "v", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]), "template.env[] takes value or valueFrom, not both"),
    ("env from two sources", _with("template.env", [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}, "fieldRef": {"fieldPath": "metadata.name"}}}]), "takes exactly one of secretKeyRef, configMapKeyRef"),
    ("env the operator sets", _with("template.env", [{"name": "PET_NNODES", "value": "4"}]), "template.env[].name must not be one the operator sets itself"),
    ("envFrom of nothing", _with("template.envFrom", [{"prefix": "X_"}]), "template.envFrom[] takes exactly one of secretRef and configMapRef"),
    ("service account not a name", _with("template.serviceAccountName", "Trainer_SA"), "spec.template.serviceAccountName"),
    ("pull secret without a name", _with("template.imagePullSecrets", [{}]), "spec.template.imagePullSecrets[0].name"),
    ("init container named as the trainer", _with("template.initContainers", [{"name": "trainer", "image": "busybox"}]), "template.initContainers[].name must be unique and not 'trainer'"),
    ("two init containers of one name", _with("template.initContainers", [{"name": "a", "image": "x"}, {"name": "a", "image": "y"}]), "template.initContainers[].name must be unique"),
    ("init container without an image", _with("template.initContainers", [{"name": "stage"}]), "spec.template.initContainers[0].image"),
    # Shapes the trainer cannot build (it crashed at its first forward, exit 1, retried as a failure).
    ("kvHeads alone not dividing the preset's heads", _with("model.kvHeads", 3), "model.heads must be divisible by model.kvHeads"),
    ("an odd head size", _with("model.dim", 68), "model.dim must be divisible by model.heads into an even head size"),
    ("MoE in no layer", _with("model.moe", {"everyKLayers": 5}), "model.moe.everyKLayers must not exceed model.layers"),
    ("lora adapting nothing", _with("lora", {"targetModules": []}), "spec.lora.targetModules"),
    # Pipeline microbatch counts the trainer or torch's schedules refuse (exit 85 once the gang ran).
    ("microbatches without a pipeline", {"nodes": 1, "nprocPerNode": 2, "parallelism": {"data": 2, "microbatches": 2}},
     "parallelism.microbatches is the pipeline's: set it only with a pipeline"),
    ("microbatches not dividing the per-rank batch", {"nodes": 1, "nprocPerNode": 2, "parallelism": {"pipeline": 2, "microbatches": 3},
                                                      "data": {"globalBatchSize": 8, "microBatchSize": 4}},
     "parallelism.microbatches must divide the per-rank batch"),
    ("1F1B with fewer microbatches than stages", {"nodes": 1, "nprocPerNode": 4, "parallelism": {"pipeline": 4},
                                                  "data": {"globalBatchSize": 2, "microBatchSize": 1}},
     "1F1B needs at least parallelism.pipeline microbatches"),
    ("interleaved without whole rounds", {"nodes": 1, "nprocPerNode": 2, "parallelism": {"pipeline": 2, "pipelineSchedule": "Interleaved1F1B",
                                          "microbatches": 5}, "data": {"globalBatchSize": 5, "microBatchSize": 1}},
     "the interleaved schedules need a whole number of rounds"),
    # More processes than devices (cuda device ordinals past the pod's), and a fraction of one.
    ("fewer GPUs than processes", _with("resources.limits", {"nvidia.com/gpu": "1"}), "nprocPerNode must not exceed the nvidia.com/gpu"),
    ("half a GPU", _with("resources.requests", {"nvidia.com/gpu": "0.5"}), "nprocPerNode must not exceed the nvidia.com/gpu"),
    # Paths: the kubelet makes a relative mount absolute, the trainer reads it from its working folder.
    ("checkpoint path relative", _with("checkpoint.path", "ckpt"), "spec.checkpoint.path"),
    ("checkpoint path the config's with a slash", _with("checkpoint.path", "/etc/pretrain/"), "spec.checkpoint.path"),
    ("checkpoint path under the config", _with("checkpoint.path", "/etc/pretrain/ckpt"), "checkpoint.path must not be a mount point of the pod's own (/etc/pretrain, /etc/podinfo, /dev/shm), nor under one"),
    ("mount over the config with a slash", _with("template.volumeMounts", [{"name": "x", "mountPath": "/etc/pretrain/"}]),
     "template.volumeMounts must not mount over the pod's own /etc/pretrain or /etc/podinfo, nor under them"),
    ("mount over the config through ..", _with("template.volumeMounts", [{"name": "x", "mountPath": "/data/../etc/pretrain"}]),
     "template.volumeMounts[].mountPath must be an absolute path without an empty, '.' or '..' part"),
    ("checkpoint path mounted again with a slash", _with("template.volumeMounts", [{"name": "x", "mountPath": "/checkpoints/"}]),
     "checkpoint.path must not be a mount point"),
    ("checkpoint path through ..", _with("checkpoint.path", "/data/../etc/pretrain"), "spec.checkpoint.path"),
    ("mount under the downward API's folder", _with("template.volumeMounts", [{"name": "x", "mountPath": "/etc/podinfo/x"}]),
     "template.volumeMounts must not mount over the pod's own /etc/pretrain or /etc/podinfo, nor under them"),
    # Strings that go into pods as the pod API's names and labels (refused there: PodInvalid).
    ("queue name not a label value", _with("scheduling.queueName", "team a"), "spec.scheduling.queueName"),
    ("priority class not a name", _with("scheduling.priorityClassName", "Bad_PC"), "spec.scheduling.priorityClassName"),
    ("scheduler not a name", _with("scheduling.schedulerName", "My Scheduler"), "spec.scheduling.schedulerName"),
    ("node selector key not a label key", _with("scheduling.nodeSelector", {"a b": "c"}), "scheduling.nodeSelector: each key must be a label key"),
    ("node selector value not a label value", _with("scheduling.nodeSelector", {"pool": "c d"}), "spec.scheduling.nodeSelector.pool"),
    ("toleration key not a label key", _with("scheduling.tolerations", [{"key": "a b", "operator": "Exists"}]), "spec.scheduling.tolerations[0].key"),
    ("claim not a name", _with("checkpoint.claimName", "My_PVC"), "spec.checkpoint.claimName"),
    ("volume name not a DNS label", _with("template.volumes", [{"name": "My_Vol", "emptyDir": {}}]), "template.volumes[].name must be a DNS label"),
    # The kubelet refuses such a reference (InvalidImageName): a gang restarted for ever, never failed.
    ("image with an uppercase repository", _with("image", "ghcr.io/Org/Trainer:v1"), "spec.image"),
    ("init container image with a space", _with("template.initContainers", [{"name": "stage", "image": "busybox 1.37"}]),
     "spec.template.initContainers[0].image"),
]

VALID_REFERENCES = ["busybox", "busybox:1.37", "ghcr.io/pretrain-operator/trainer:0.1.0", "localhost:5000/team/trainer",
                    "Registry.Example.com:5000/a_b/c-d__e.f:V1.2-rc_3", "trainer@sha256:" + "a" * 64,
                    "ghcr.io/x/trainer:1.2@sha256:" + "0" * 64]


@pytest.mark.parametrize("image", VALID_REFERENCES)
def test_an_image_reference_in_dockers_grammar_is_accepted(image):
    assert ptapi.PretrainJobSpec.model_validate(_with("image", image)).image == image


def _cel_case(spec: dict) -> ptapi.PretrainJobSpec | None:
    """The spec, when only a CEL rule can refuse it (the models accept it)."""
    try:
        return ptapi.PretrainJobSpec.model_validate(spec)
    except ValueError:
        return None


CEL_CASES = [(case, spec, message) for case, spec, message in INVALID if _cel_case(spec) is not None]


@pytest.mark.parametrize("case,spec,message", CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_the_crds_rules_checked_in_python_refuse_what_the_api_server_does_with_its_message(case, spec, message):
    pytest.importorskip("celpy", reason="cel-python is in the trainer extra, installed by `make test`")
    assert any(message in v for v in cel.violations(_cel_case(spec))), cel.violations(_cel_case(spec))


def test_the_crds_rules_checked_in_python_accept_a_valid_spec_and_every_example():
    pytest.importorskip("celpy", reason="cel-python is in the trainer extra, installed by `make test`")
    assert len(CEL_CASES) >= 15 and cel.violations(ptapi.PretrainJobSpec.model_validate(BASE)) == []
    for example in sorted((REPO_ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(example.read_text()):
            if doc and doc.get("kind") == ptapi.KIND:
                assert cel.violations(ptapi.PretrainJobSpec.model_validate(doc["spec"])) == [], example


def _body(spec: dict, name: str = "") -> dict:
    return {"apiVersion": f"{ptapi.GROUP}/{ptapi.VERSION}", "kind": ptapi.KIND,
            "metadata": {"name": name or f"v{uuid.uuid4().hex[:8]}"}, "spec": spec}


def test_a_valid_spec_is_accepted_and_defaulted(api, crd, namespace):
    custom = client.CustomObjectsApi(api)
    obj = custom.create_namespaced_custom_object("pretrain.dev", "v1alpha1", namespace, "pretrainjobs",
                                                 _body(BASE, "ok"), dry_run="All")
    assert obj["spec"]["training"]["steps"] == 100 and obj["spec"]["failurePolicy"]["nonRetryableExitCodes"] == [85]


@pytest.mark.parametrize("case,spec,message", INVALID, ids=[c[0] for c in INVALID])
def test_the_api_server_rejects_an_invalid_spec_naming_the_field(api, crd, namespace, case, spec, message):
    custom = client.CustomObjectsApi(api)
    with pytest.raises(client.ApiException) as exc:
        custom.create_namespaced_custom_object("pretrain.dev", "v1alpha1", namespace, "pretrainjobs", _body(spec), dry_run="All",
                                                field_validation="Strict")  # what kubectl apply sends
    assert exc.value.status in (400, 422), exc.value.body  # 400: strict decoding of an unknown field
    assert message in exc.value.body, exc.value.body


POD_METADATA = _with("template", {
    "labels": {"team": "ml-research", "example.com/cost-center": "42"},
    "annotations": {"sidecar.istio.io/inject": "false", "karpenter.sh/do-not-disrupt": "true"},
    "serviceAccountName": "trainer", "imagePullSecrets": [{"name": "registry"}],
    "env": [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
    "envFrom": [{"prefix": "HF_", "secretRef": {"name": "hf", "optional": True}}]})


def test_pod_labels_annotations_a_service_account_pull_secrets_and_env_from_secrets_are_accepted(api, crd, namespace):
    obj = client.CustomObjectsApi(api).create_namespaced_custom_object(
        "pretrain.dev", "v1alpha1", namespace, "pretrainjobs", _body(POD_METADATA), dry_run="All", field_validation="Strict")
    assert obj["spec"]["template"]["env"][0]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "key"}}
    assert cel_free(POD_METADATA)


def cel_free(spec: dict) -> bool:
    pytest.importorskip("celpy", reason="cel-python is in the trainer extra, installed by `make test`")
    return cel.violations(ptapi.PretrainJobSpec.model_validate(spec)) == []


def test_a_name_too_long_for_pod_names_is_rejected(api, crd, namespace):
    with pytest.raises(client.ApiException) as exc:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "pretrain.dev", "v1alpha1", namespace, "pretrainjobs", _body(BASE, "x" * 45), dry_run="All")
    assert "metadata.name must be a DNS-1035 label of at most 40 characters" in exc.value.body


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_accepted_by_the_api_server(cluster, crd, namespace, example: Path):
    kubectl = str(binaries.locate(["kubectl"])["kubectl"])
    r = subprocess.run([kubectl, "--kubeconfig", str(cluster.cfg.kubeconfig), "-n", namespace, "apply",
                        "--dry-run=server", "-f", str(example)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pretrainjob.pretrain.dev/" in r.stdout


def test_kubectl_get_shows_phase_step_loss_and_checkpoint_and_wide_the_held_out_loss_and_nodes(cluster, api, crd, namespace):
    kubectl = [str(binaries.locate(["kubectl"])["kubectl"]), "--kubeconfig", str(cluster.cfg.kubeconfig), "-n", namespace]
    # Suspended: an operator running in the same session (its tests ran first) leaves this status as
    # it is. A Running job without pods had its readyNodes set back to 0/2 by it.
    client.CustomObjectsApi(api).create_namespaced_custom_object("pretrain.dev", "v1alpha1", namespace, "pretrainjobs",
                                                                 _body(_with("suspend", True), "shown"))
    status = {"status": {"phase": "Suspended", "readyNodes": "0/1", "nodes": 1, "attempt": 2, "preemptions": 1, "failures": 0,
                         "progress": {"step": 130, "totalSteps": 200, "loss": 4.8151, "validationLoss": 4.9354, "validationStep": 125},
                         "lastCheckpoint": {"step": 125, "path": "/checkpoints/step-00000125", "time": "2026-12-01T05:00:00Z"}}}
    subprocess.run([*kubectl, "patch", "ptj", "shown", "--subresource=status", "--type=merge", "-p", yaml.safe_dump(status)],
                   check=True, capture_output=True)

    def table(*args: str) -> dict[str, str]:
        head, row = subprocess.run([*kubectl, "get", "ptj", "shown", *args], check=True, capture_output=True,
                                   text=True).stdout.splitlines()
        return dict(zip(head.split(), row.split()))

    assert {k: v for k, v in table().items() if k != "AGE"} == {
        "NAME": "shown", "PHASE": "Suspended", "READY": "0/1", "ATTEMPT": "2", "STEP": "130", "LOSS": "4.8151",
        "CHECKPOINT": "125", "PREEMPTIONS": "1", "FAILURES": "0"}
    wide = table("-o", "wide")
    assert wide["HELD-OUT"] == "4.9354" and wide["NODES"] == "1"  # an elastic job's last attempt ran shrunk


def test_the_api_reference_is_generated_from_the_models():
    from pretrain_operator import apidoc
    assert (REPO_ROOT / "docs" / "api.md").read_text() == apidoc.render(), "run: python -m pretrain_operator.apidoc > docs/api.md"


def test_the_env_names_the_crd_keeps_for_the_operator_are_exactly_those_it_sets():
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}}
    pod = render.pod(job, ptapi.PretrainJobSpec.model_validate(BASE), attempt=1, rank=0)
    assert sorted(e["name"] for e in pod["spec"]["containers"][0]["env"]) == sorted(ptapi.OPERATOR_ENV + ptapi.OPERATOR_ENV_DEFAULTS)
    # Those it sets unless the template does: the template's, once (a job from before the operator set them too).
    mine = {"name": "PET_RDZV_CONF", "value": "join_timeout=3600,last_call_timeout=60"}
    pod = render.pod(job, ptapi.PretrainJobSpec.model_validate(_with("template.env", [mine])), attempt=1, rank=0)
    assert [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "PET_RDZV_CONF"] == [mine]


def test_an_init_container_gets_the_trainers_security_context_where_it_sets_none_and_may_ask_for_root():
    spec = ptapi.PretrainJobSpec.model_validate(_with("template.initContainers", [
        {"name": "stage", "image": "busybox", "command": ["true"]},
        {"name": "chown", "image": "busybox", "securityContext": {"runAsUser": 0, "capabilities": {"add": ["CHOWN"]}}}]))
    pod = render.pod({"metadata": {"name": "j", "namespace": "ns", "uid": "u"}}, spec, attempt=1, rank=0)
    stage, chown = pod["spec"]["initContainers"]
    assert stage["command"] == ["true"] and stage["securityContext"] == pod["spec"]["containers"][0]["securityContext"]
    # Asked for root: no runAsNonRoot of ours (the kubelet would refuse to start it); its own keys win.
    assert chown["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"add": ["CHOWN"]}, "runAsUser": 0}


def test_a_rendered_pods_security_context_shares_nothing_with_the_next_pods():
    """A caller (or a mutating step of the operator's) that edits one pod's securityContext in place
    must not change every pod rendered after it."""
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"}}
    spec = ptapi.PretrainJobSpec.model_validate(_with("template.initContainers", [{"name": "stage", "image": "busybox"}]))
    first = render.pod(job, spec, attempt=1, rank=0)
    first["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"].append("x")
    first["spec"]["initContainers"][0]["securityContext"]["capabilities"]["drop"].append("y")
    second = render.pod(job, spec, attempt=1, rank=1)
    assert second["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert second["spec"]["initContainers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_a_gpu_requested_without_a_limit_renders_a_pod_the_api_server_accepts(api, namespace):
    # The pod API refuses an extended resource's request without its limit (every pod of such a
    # job was refused as invalid: the job Failed at once).
    spec = ptapi.PretrainJobSpec.model_validate(_with("resources", {
        "requests": {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": "2", "vpc.amazonaws.com/efa": "1"},
        "limits": {"memory": "1Gi"}}))
    pod = render.pod({"metadata": {"name": "gpu", "namespace": namespace, "uid": "u"}}, spec, attempt=1, rank=0)
    pod["metadata"]["ownerReferences"] = []  # no such owner here: a dry run of the pod alone
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "1Gi", "nvidia.com/gpu": "2", "vpc.amazonaws.com/efa": "1"}  # cpu: not extended
    made = client.CoreV1Api(api).create_namespaced_pod(namespace, pod, dry_run="All")
    assert made.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
