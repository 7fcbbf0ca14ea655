# pretrain-operator: the project's interface. Every target does its own set-up (virtualenv in
# .venv, Python packages, Go-built binaries cached under ~/.cache/pretrain-operator) and is
# idempotent.
#
#   make demo          start the local cluster and show it working (the README's main command)
#   make test          the whole test suite, against the real local cluster
#   make cluster-up    start the local cluster (state in .local-cluster/, kubeconfig inside)
#   make cluster-down  stop it and remove its state
#   make run-operator  run the operator against the local cluster (applies the CRD first)
#   make bench         benchmarks (bench/), printed as ratios against a baseline of the same run
#   make cluster-status  what of the local cluster runs;  make venv / make binaries: the set-up alone
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= operator,cluster,test,trainer,hf
# The stamp names the extras and pyproject's hash, so changing either reinstalls.
STAMP := $(VENV)/.installed-$(shell echo $(EXTRAS) | tr ',' '-')-$(shell sha1sum pyproject.toml | cut -c1-10)
PYTEST_ARGS ?=

.PHONY: venv binaries demo test cluster-up cluster-down cluster-status bench help run-operator

help:
	@sed -n '1,11p' Makefile

venv: $(STAMP)

$(STAMP): pyproject.toml
	@# A virtualenv whose pip is missing (python3-venv absent when it was made) is made again.
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } || \
	  { echo "make: cannot make a virtualenv: install python3-venv (Debian/Ubuntu) and run make again" >&2; rm -rf $(VENV); exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# The control plane, and Prometheus and helm (its rules come from the chart) for make demo and
# the tests (built once, cached).
BINARIES ?= etcd kube-apiserver kube-controller-manager kube-scheduler kubectl coredns prometheus helm
binaries:
	hack/build-binaries $(BINARIES)

cluster-up: venv binaries
	hack/local-cluster up

# Stopping or asking needs the virtualenv only, not an up-to-date one (no reinstall, no network).
cluster-down:
	@test -x $(PY) || $(MAKE) venv
	hack/local-cluster down

cluster-status:
	@test -x $(PY) || $(MAKE) venv
	hack/local-cluster status

run-operator: cluster-up
	hack/kubectl apply --server-side --force-conflicts -f crds/
	KUBECONFIG=$(CURDIR)/.local-cluster/kubeconfig $(PY) -m pretrain_operator

demo: venv binaries
	hack/demo

# Everything is installed by then: a skipped test (torch that does not import, a missing extra)
# fails the run instead of passing green without it (tests/conftest.py).
test: venv binaries
	hack/build-binaries helm helm3
	PRETRAIN_REQUIRE_ALL=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: venv binaries
	$(PY) bench/run.py
