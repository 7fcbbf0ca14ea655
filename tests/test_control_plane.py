"""The local control plane is real Kubernetes: schema and CEL validation, RBAC, Pod Security
admission, garbage collection, the controllers and cluster DNS all behave as on a real cluster."""

from __future__ import annotations

import uuid

import dns.resolver
import pytest
from kubernetes import client

from tests.helpers import wait_for
from tests.kubeutil import restricted


CRD_GROUP = "celtest.pretrain.dev"


def _cel_crd(plural: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{CRD_GROUP}"},
        "spec": {
            "group": CRD_GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": plural.capitalize()[:-1]},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "properties": {"replicas": {"type": "integer"}, "maxReplicas": {"type": "integer"}},
                        "x-kubernetes-validations": [{
                            "rule": "self.replicas <= self.maxReplicas",
                            "message": "replicas must not exceed maxReplicas",
                            "fieldPath": ".replicas",
                        }],
                    }},
                }},
            }],
        },
    }


def test_crd_with_a_cel_rule_rejects_a_bad_object_with_the_rules_message(api, namespace):
    plural = f"widgets{uuid.uuid4().hex[:6]}"
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(_cel_crd(plural))
    try:
        wait_for(lambda: any(c.type == "Established" and c.status == "True"
                             for c in (ext.read_custom_resource_definition(f"{plural}.{CRD_GROUP}").status.conditions or [])),
                 what="the CRD to be established")
        custom = client.CustomObjectsApi(api)
        kind = plural.capitalize()[:-1]
        good = {"apiVersion": f"{CRD_GROUP}/v1", "kind": kind, "metadata": {"name": "ok"},
                "spec": {"replicas": 2, "maxReplicas": 4}}
        # Discovery of a new CRD takes a moment to reach every API server handler.
        wait_for(lambda: _try_create(custom, namespace, plural, good), what="the good object to be accepted")
        bad = {**good, "metadata": {"name": "bad"}, "spec": {"replicas": 5, "maxReplicas": 4}}
        with pytest.raises(client.ApiException) as exc:
            custom.create_namespaced_custom_object(CRD_GROUP, "v1", namespace, plural, bad)
        assert exc.value.status == 422
        assert "replicas must not exceed maxReplicas" in exc.value.body
        assert "spec.replicas" in exc.value.body
    finally:
        ext.delete_custom_resource_definition(f"{plural}.{CRD_GROUP}")


def _try_create(custom, ns, plural, body) -> bool:
    try:
        custom.create_namespaced_custom_object(CRD_GROUP, "v1", ns, plural, body)
        return True
    except client.ApiException as e:
        if e.status == 404:
            return False
        raise


def _can_list_pods(api, namespace: str, sa: str) -> bool:
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{namespace}:{sa}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(namespace=namespace, verb="list", resource="pods"),
    ))
    return client.AuthorizationV1Api(api).create_subject_access_review(review).status.allowed


def _token_client(cluster, api, namespace: str, sa: str) -> client.CoreV1Api:
    """A client that authenticates with a real bound token of the ServiceAccount (no admin cert)."""
    tok = client.CoreV1Api(api).create_namespaced_service_account_token(
        sa, namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    cfg = client.Configuration()
    cfg.host = cluster.state()["server"]
    cfg.ssl_ca_cert = str(cluster.pki.ca_crt)
    cfg.api_key = {"authorization": f"Bearer {tok}"}
    return client.CoreV1Api(client.ApiClient(cfg))


def test_rbac_denies_a_service_account_without_a_binding_and_allows_it_after_one(cluster, api, core, namespace):
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader")))
    as_reader = _token_client(cluster, api, namespace, "reader")
    with pytest.raises(client.ApiException) as exc:
        as_reader.list_namespaced_pod(namespace)
    assert exc.value.status == 403
    assert not _can_list_pods(api, namespace, "reader")

    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name="pod-reader"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="reader-reads-pods"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)]))
    wait_for(lambda: _can_list_pods(api, namespace, "reader"), what="the binding to take effect")
    assert as_reader.list_namespaced_pod(namespace).items == []
    # Still namespaced: the binding grants nothing elsewhere.
    with pytest.raises(client.ApiException) as exc:
        as_reader.list_namespaced_pod("kube-system")
    assert exc.value.status == 403


def test_a_namespace_enforcing_restricted_pod_security_rejects_a_privileged_pod(core, namespace):
    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="priv"),
        spec=client.V1PodSpec(containers=[client.V1Container(
            name="c", image="busybox", command=["true"],
            security_context=client.V1SecurityContext(privileged=True))]),
    )
    with pytest.raises(client.ApiException) as exc:
        core.create_namespaced_pod(namespace, pod)
    assert exc.value.status == 403
    assert "violates PodSecurity" in exc.value.body and "privileged" in exc.value.body


def test_deleting_an_owner_garbage_collects_its_dependents(core, namespace):
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    for i in range(3):
        core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=f"dep-{i}", owner_references=[ref])))
    core.delete_namespaced_config_map("owner", namespace)
    wait_for(lambda: not [c for c in core.list_namespaced_config_map(namespace).items
                          if c.metadata.name.startswith("dep-")],
             what="the garbage collector to delete the dependents")


def test_a_deployment_gets_its_replicaset_and_pending_pods(api, core, namespace):
    apps = client.AppsV1Api(api)
    labels = {"app": "web"}
    # No node carries the selected label, so the pods stay Pending whatever nodes exist.
    apps.create_namespaced_deployment(namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": restricted({"nodeSelector": {"pretrain.dev/no-such-node": "true"},
                                                  "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1"]}]})}}})
    rs = wait_for(lambda: apps.list_namespaced_replica_set(namespace).items, what="a ReplicaSet")
    assert rs[0].metadata.owner_references[0].kind == "Deployment"
    pods = wait_for(lambda: [p for p in core.list_namespaced_pod(namespace).items if p.status.phase == "Pending"]
                    if len(core.list_namespaced_pod(namespace).items) == 2 else None, what="2 Pending pods")
    assert {p.metadata.owner_references[0].name for p in pods} == {rs[0].metadata.name}
    # The scheduler saw them and said why they cannot be placed.
    wait_for(lambda: all(any(c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
                             for c in (core.read_namespaced_pod(p.metadata.name, namespace).status.conditions or []))
                         for p in pods), what="the scheduler to mark the pods Unschedulable")


def test_a_cluster_dns_lookup_of_a_service_name_answers(cluster, core, namespace):
    svc = core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(selector={"app": "web"}, ports=[client.V1ServicePort(port=80)])))
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = cluster.state()["ports"]["coredns"]
    res.lifetime = 2

    def lookup():
        try:
            return [r.address for r in res.resolve(f"web.{namespace}.svc.cluster.local", "A")]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.Timeout):
            return None

    assert wait_for(lookup, what="CoreDNS to answer") == [svc.spec.cluster_ip]
