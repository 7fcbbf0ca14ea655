"""What the operator's watches ask the API server for: the pods of PretrainJobs only (by label
selector, so that the other pods of a shared cluster never reach the operator), listed in pages.
kopf applies a handler's own `labels=` filter after the events arrive, so the selector has to be in
kopf's watching settings; these tests read it back through kopf's own resolution, the one its
LIST and WATCH requests use. (That pod events of jobs still arrive is what every operator test
on the local cluster relies on.)"""

from __future__ import annotations

import kopf

from pretrain_operator import contract as c
from pretrain_operator.handlers import configure
from pretrain_operator.settings import OperatorSettings

PODS = kopf.Resource("", "v1", "pods", kind="Pod", namespaced=True)
NODES = kopf.Resource("", "v1", "nodes", kind="Node", namespaced=False)


def _kopf_settings(**ours) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    configure(settings, OperatorSettings(**ours))
    return settings


def test_the_pod_watch_asks_the_api_server_for_the_pods_of_pretrainjobs_only():
    selectors = _kopf_settings().watching.label_selectors
    assert list(selectors.collect(PODS)) == [c.LABEL_JOB]
    assert list(selectors.collect(NODES)) == []  # every node: a lost one is a preemption of its pods


def test_the_first_lists_come_in_pages():
    assert _kopf_settings().watching.chunk_size == 500
    assert _kopf_settings(watch_list_chunk=0).watching.chunk_size == 0
