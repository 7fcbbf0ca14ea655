#!/usr/bin/env bash
# End to end on kind, for machines with Docker: create a kind cluster, build the operator and
# trainer images, load them into the cluster, install the Helm chart, run examples/quickstart.yaml
# and wait for it to succeed. It cannot run where the project is developed (no Docker engine
# there); the local cluster's tests (tests/test_helm_install.py) cover the chart on process nodes.
#
#   hack/kind-e2e.sh                      # everything; the cluster is deleted at the end
#   KEEP_CLUSTER=1 hack/kind-e2e.sh       # keep it to look around (kind delete cluster --name pretrain-e2e)
#   STEP=4 hack/kind-e2e.sh               # resume from step 4 against an existing cluster
#   DOCKER_BUILD_FLAGS=--provenance=false hack/kind-e2e.sh   # Docker's containerd image store:
#       `kind load` fails on the provenance attestation (ctr: content digest not found, kind#3795)
#
# Needs: docker, kind (>= 0.24), kubectl, helm (3 or 4), and a Docker engine with about 3 CPUs and
# 6 GiB (the quickstart's 2 pods ask for 1 CPU each beside kind's own control plane: with 2 CPUs
# the second pod stays Pending until the start timeout). Time: the trainer image is about 5 GB
# (torch with CUDA libraries), so the first build and `kind load` take several minutes; the
# quickstart trains on CPU (gloo) in a few minutes. Each step prints what it runs; on a failure the
# job's status, events and pod logs are printed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster=${KIND_CLUSTER:-pretrain-e2e}
ns=${NAMESPACE:-pretrain-system}
jobs_ns=${JOBS_NAMESPACE:-default}
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/pretrain-operator/Chart.yaml")
operator_image=ghcr.io/pretrain-operator/operator:$version
trainer_image=ghcr.io/pretrain-operator/trainer:$version   # PretrainJob's default spec.image
ctx=kind-$cluster
start=${STEP:-1}

step() { n=$1; shift; if [ "$n" -ge "$start" ]; then echo; echo "== step $n: $*"; return 0; fi; return 1; }
run() { echo "+ $*" >&2; "$@"; }
die() { echo "kind-e2e: $*" >&2; exit 1; }

diagnose() {
  echo; echo "== kind-e2e failed; what the cluster says:"
  kubectl --context "$ctx" -n "$ns" get deploy,pods -o wide || true
  kubectl --context "$ctx" -n "$ns" logs deploy/pretrain-operator --tail 50 || true
  kubectl --context "$ctx" -n "$jobs_ns" get ptj,pods,pvc -o wide || true
  kubectl --context "$ctx" -n "$jobs_ns" describe ptj quickstart || true
  for p in $(kubectl --context "$ctx" -n "$jobs_ns" get pods -l pretrain.dev/job=quickstart -o name 2>/dev/null); do
    echo "--- $p"; kubectl --context "$ctx" -n "$jobs_ns" logs "$p" --tail 30 || true
  done
}
# `kubectl wait --for=jsonpath` waits out its whole timeout on a job that has already Failed;
# this polls the phase and stops at once on Failed (cleanup then prints the job's story).
wait_phase() {
  want=$1 limit=$2 waited=0 phase=
  echo "+ wait for ptj/quickstart to be $want (at most ${limit}s)" >&2
  while [ "$waited" -lt "$limit" ]; do
    phase=$(kubectl --context "$ctx" -n "$jobs_ns" get ptj quickstart -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [ "$phase" = "$want" ] && return 0
    [ "$want" = Running ] && [ "$phase" = Succeeded ] && return 0
    [ "$phase" = Failed ] && die "ptj/quickstart Failed while waiting for $want"
    sleep 5; waited=$((waited + 5))
  done
  die "ptj/quickstart is ${phase:-without a phase} after ${limit}s, not $want"
}
cleanup() {
  rc=$?
  [ $rc -ne 0 ] && diagnose
  if [ "${KEEP_CLUSTER:-}" != 1 ] && [ $rc -eq 0 ]; then
    kind delete cluster --name "$cluster" || true
  fi
  exit $rc
}

if step 1 "check the tools"; then
  for t in docker kind kubectl helm; do command -v "$t" >/dev/null || die "$t is not installed"; done
  docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info fails)"
  run helm version --short
fi

if step 2 "create the kind cluster $cluster (unless it exists)"; then
  if kind get clusters | grep -qx "$cluster"; then
    echo "kind cluster $cluster exists; reusing it"
  else
    run kind create cluster --name "$cluster" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s
  fi
fi
trap cleanup EXIT

if step 3 "build the images ($operator_image, $trainer_image)"; then
  # shellcheck disable=SC2086  # the flags are words
  run docker build ${DOCKER_BUILD_FLAGS:-} -f "$root/images/Dockerfile" --target operator -t "$operator_image" "$root"
  # shellcheck disable=SC2086
  run docker build ${DOCKER_BUILD_FLAGS:-} -f "$root/images/Dockerfile" --target trainer -t "$trainer_image" "$root"
fi

if step 4 "load them into the cluster's nodes (no registry needed)"; then
  run kind load docker-image --name "$cluster" "$operator_image" "$trainer_image"
fi

if step 5 "install the chart into $ns (restricted Pod Security enforced)"; then
  run kubectl --context "$ctx" create namespace "$ns" --dry-run=client -o yaml | kubectl --context "$ctx" apply -f -
  run kubectl --context "$ctx" label --overwrite namespace "$ns" pod-security.kubernetes.io/enforce=restricted
  run helm upgrade --install pretrain-operator "$root/charts/pretrain-operator" --kube-context "$ctx" -n "$ns" \
    --set image.pullPolicy=IfNotPresent --wait --timeout 180s
  leader=""
  for _ in $(seq 30); do  # (a loop's status is its last command's: test a flag, not the loop)
    if kubectl --context "$ctx" -n "$ns" logs deploy/pretrain-operator | grep "became the leader"; then
      leader=yes
      break
    fi
    sleep 2
  done
  [ -n "$leader" ] || die "the operator did not become the leader; see its log above"
fi

if step 6 "apply the quickstart in $jobs_ns"; then
  # kind's default StorageClass (local-path) has no ReadWriteMany; both pods share kind's one node,
  # so ReadWriteOnce serves them the same claim.
  sed 's/accessModes: \[ReadWriteMany\]/accessModes: [ReadWriteOnce]/' "$root/examples/quickstart.yaml" |
    run kubectl --context "$ctx" -n "$jobs_ns" apply -f -
fi

if step 7 "wait for the quickstart to succeed"; then
  wait_phase Running 600
  wait_phase Succeeded 1800
  run kubectl --context "$ctx" -n "$jobs_ns" get ptj quickstart -o wide
fi
echo; echo "kind-e2e: the quickstart succeeded on kind with the chart's operator"
