"""The examples run for real under the operator on process nodes: examples/quickstart.yaml (pipeline
2 x data 2 x tensor 2 over 8 ranks on 2 pods, with its validation), examples/moe.yaml (expert
parallel 2 over 4 ranks on 2 pods) and examples/lora.yaml (adapters on a base checkpoint in the
job's claim) each train to Succeeded, shortened for CPU, with no failure. examples/spot-llama3-8b.yaml
(an 8B model on GPUs) is checked by the API server only (tests/test_api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.jobs import Jobs
from tests.trainer_util import run, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _job(name: str, steps: int) -> dict:
    job = next(d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d["kind"] == "PretrainJob")
    job["spec"]["training"] = {**job["spec"].get("training", {}), "steps": steps, "logEverySteps": 1}
    job["spec"]["data"] = {**job["spec"]["data"], "seqLen": 32}
    job["spec"]["optimizer"] = {**job["spec"].get("optimizer", {}), "warmupSteps": 2}
    job["spec"]["checkpoint"] = {**job["spec"]["checkpoint"], "intervalSteps": 3}  # on the example's own claim
    return job


def _claim(name: str) -> dict:
    return next(d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d["kind"] == "PersistentVolumeClaim")


def _succeeds(jobs: Jobs, name: str, steps: int) -> None:
    st = jobs.wait_phase(name, "Succeeded", "Failed", timeout=300)
    assert st["phase"] == "Succeeded" and st["failures"] == 0, st
    assert st["lastCheckpoint"]["step"] == steps
    assert f"done: {steps} steps" in jobs.logs(f"{name}-a1-n0")


def test_the_quickstart_example_trains_to_succeeded_under_the_operator(api, namespace, operator, core):
    jobs = Jobs(api, namespace)
    core.create_namespaced_persistent_volume_claim(namespace, _claim("quickstart.yaml"))
    jobs.create(_job("quickstart.yaml", steps=6), claim=False)
    _succeeds(jobs, "quickstart", 6)
    st = jobs.status("quickstart")
    assert st["progress"]["validationStep"] == 6 and st["progress"]["validationLoss"] > 0  # its validation, at the last step


def test_the_moe_example_trains_to_succeeded_under_the_operator(api, namespace, operator, core):
    jobs = Jobs(api, namespace)
    core.create_namespaced_persistent_volume_claim(namespace, _claim("moe.yaml"))  # its own claim, as `kubectl apply -f` makes it
    jobs.create(_job("moe.yaml", steps=6), claim=False)
    _succeeds(jobs, "tiny-moe", 6)
    assert "router:" in jobs.logs("tiny-moe-a1-n0")  # the router statistics are logged


def test_the_lora_example_trains_on_a_base_checkpoint_in_its_claim_under_the_operator(api, namespace, operator, core, tmp_path):
    jobs = Jobs(api, namespace)
    claim = _claim("lora.yaml")  # the example's own claim, as `kubectl apply -f` makes it
    core.create_namespaced_persistent_volume_claim(namespace, claim)
    volume = jobs.claim_folder(claim["metadata"]["name"])
    # The base: a checkpoint of the same model, where the example's comment says (base/ in the claim).
    run(write_config(tmp_path, steps=2, interval=100, extra={"checkpoint": {"path": str(volume / "base")}}), 1,
        tmp_path / "losses.txt")
    job = _job("lora.yaml", steps=6)
    assert job["spec"]["lora"]["baseCheckpoint"] == "/checkpoints/base"
    assert job["spec"]["checkpoint"]["claimName"] == claim["metadata"]["name"]
    jobs.create(job, claim=False)
    _succeeds(jobs, "tiny-lora", 6)
    assert "frozen base weights bit-identical" in jobs.logs("tiny-lora-a1-n0")
