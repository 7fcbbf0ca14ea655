#!/usr/bin/env bash
# Cold build time of every local-cluster binary: empty Go build cache and module cache, fresh
# binary cache, one component after another (as `make test` does on a fresh machine).
#   bench/cold_build.sh          # about 10 minutes on 2 cores; downloads modules again
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/cold-build.XXXX)
export XDG_CACHE_HOME="$tmp/cache" GOCACHE="$tmp/gocache" GOMODCACHE="$tmp/gomod" GOFLAGS=-modcacherw
# Go's module cache is read-only: made writable to be removed, on a failed build too.
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
start=$SECONDS
for c in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl coredns; do
  t=$SECONDS; "$root/hack/build-binaries" "$c"; echo "$c: $((SECONDS - t)) s"
done
echo "total: $((SECONDS - start)) s"
