"""--config takes what `kubectl apply` takes: a spec alone, or a manifest whose PretrainJob may sit
among other documents (the examples' PersistentVolumeClaims); a config the API server would refuse
(its CEL rules across fields) or that is not YAML exits 85 naming the field, before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain_operator import api, contract as c
from tests.trainer_util import env, losses, run, write_config

torch = pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
PVC = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt"},
       "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}


def _job(spec: dict, name: str = "tiny") -> dict:
    return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def _train(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(config)],
                          env=env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_gives_the_spec_of_its_pretrainjob(example):
    from pretrain_trainer.train import load_spec
    job = next(d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == api.KIND)
    assert load_spec(str(example)) == api.PretrainJobSpec.model_validate(job["spec"])


def test_a_manifest_with_its_volume_claim_trains_as_the_spec_alone_does(tmp_path):
    spec = yaml.safe_load(write_config(tmp_path, steps=3, interval=100).read_text())
    run(tmp_path / "job.yaml", 1, tmp_path / "alone.txt")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all([PVC, _job({**spec, "checkpoint": {"path": str(tmp_path / "other")}})]))
    run(manifest, 1, tmp_path / "manifest.txt")
    assert losses(tmp_path / "manifest.txt") == losses(tmp_path / "alone.txt")
    assert (tmp_path / "other" / "latest").read_text() == "step-00000003"  # the manifest's own spec


@pytest.mark.parametrize("docs,says", [
    # The API server's rule and message (the CRD's CEL rules, evaluated here without one): tiny's
    # rotary table holds 128 positions, so this once crashed in the model with a shape error.
    ([_job({"data": {"seqLen": 256}})], "spec.data.seqLen: data.seqLen must not exceed model.maxSeqLen"),
    ([_job({"model": {"preset": "custom", "dim": 64}})], "spec.model: model.preset 'custom' needs model.dim"),  # was KeyError 'layers'
    ([_job({"nodes": 1, "nprocPerNode": 3, "parallelism": {"pipeline": 3}})], "model.layers must be divisible by parallelism.pipeline"),
    ([_job({"nodes": 1, "nprocPerNode": 2, "parallelism": {"tensor": 2}, "data": {"seqLen": 33}})],
     "spec.data.seqLen: data.seqLen must be divisible by parallelism.tensor"),  # sequence parallel's slices
    ([_job({}, "a"), _job({}, "b")], "holds 2 PretrainJobs (a, b): give a file with one"),
    ([PVC, {"kind": "ConfigMap"}], "holds 2 documents (PersistentVolumeClaim, ConfigMap) and no PretrainJob"),
    ("spec: {nodes: [1, 2}", "is not valid YAML"),
], ids=["rule seqLen", "rule custom preset", "rule layers", "rule sequence split", "two jobs", "no job", "not yaml"])
def test_a_config_the_api_server_would_refuse_exits_85_naming_the_field_before_training(tmp_path, docs, says):
    config = tmp_path / "job.yaml"
    config.write_text(docs if isinstance(docs, str) else yaml.safe_dump_all(docs))
    r = _train(config)
    assert r.returncode == c.EXIT_PERMANENT and says in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "step 1" not in r.stderr
