"""The embedded local cluster: a real Kubernetes control plane built from Go modules, run as
local processes. Entry point: `hack/local-cluster up|down|status` (see docs/local-cluster.md)."""
