"""Mixture-of-Experts trains the same model in every layout: expert parallel 2 gives the per-step
losses of one process within 1e-5 with data parallel 4 (examples/moe.yaml: FSDP2 shards each
expert over the two ranks that hold it), with data x pipeline parallel 2 x 2, with data x tensor
parallel 2 x 2, and alone; for top-2 softmax routing with the aux loss, top-1 (Switch) with a
shared expert and token dropping, and sigmoid routing with the bias balancing. The grouped matmul
and the loop over experts agree; an expert-parallel checkpoint resumes bit for bit and loads into
another expert-parallel degree, with FSDP-sharded experts and selection biases too; a bad expert
degree is refused; router statistics reach the log and render as Prometheus families.

    .venv/bin/python -m pytest tests/test_trainer_moe.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.trainer_util import env, losses, run, single_process_losses, write_config

torch = pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")

TOL = 1e-5
REPO = Path(__file__).resolve().parent.parent
TOP2 = {"experts": 8, "topK": 2, "loadBalancing": "auxLoss", "auxLossCoef": 0.01}  # as examples/moe.yaml
TOP1_SHARED_DROPPING = {"experts": 4, "topK": 1, "sharedExpert": True, "capacityFactor": 1.0}
SIGMOID_BIAS = {"experts": 4, "topK": 2, "routerScore": "sigmoid", "loadBalancing": "bias", "biasUpdateRate": 0.01,
                "everyKLayers": 2}


def _moe(moe: dict, expert: int = 1, **parallel) -> dict:
    return {"model": {"preset": "tiny", "moe": moe}, "parallelism": {"expert": expert, **parallel}}


def _assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for s in want:
        assert abs(got[s] - want[s]) <= TOL, (s, got[s], want[s])


def _final_state(cfg: Path) -> dict:
    """The newest checkpoint of a run, loaded into one whole model in this process."""
    from pretrain_trainer.evaluate import model_from_checkpoint
    from pretrain_trainer.train import load_spec
    return model_from_checkpoint(load_spec(str(cfg)), None)[0].state_dict()


def _assert_same_weights(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol, k


def test_grouped_matmul_and_the_loop_over_experts_give_the_same_outputs_and_gradients():
    from pretrain_trainer.moe import Experts, grouped_mm_available
    torch.manual_seed(0)
    experts = Experts(16, 32, [3, 4, 5])
    x = torch.randn(11, 16)
    assert grouped_mm_available(x, 16, 32)
    counts = [4, 0, 7]  # an expert with no tokens too
    go = torch.randn(11, 16)
    results = {}
    for impl in ("grouped", "loop"):
        xi = x.clone().requires_grad_()
        experts.zero_grad()
        out = experts(xi, counts, impl=impl)
        (out * go).sum().backward()
        results[impl] = (out.detach(), xi.grad, [p.grad.clone() for p in experts.parameters()])
    (og, xg, pg), (ol, xl, pl) = results["grouped"], results["loop"]
    assert torch.allclose(og, ol, atol=1e-6) and torch.allclose(xg, xl, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(pg, pl))


def test_the_router_chooses_and_weighs_in_fp32_under_bf16_autocast():
    # GPU runs train under bf16 autocast, which cast the router's matmul back to bf16 whatever
    # its inputs' dtype: the scores, the choice, its weights and the aux loss came out bf16.
    # (The CPU's bf16 autocast here casts as the GPU's does.)
    import torch
    from pretrain_operator import api
    from pretrain_trainer.moe import MoE
    torch.manual_seed(0)
    for balancing in ("auxLoss", "bias"):
        moe = MoE(64, 128, api.MoE(experts=8, topK=2, loadBalancing=balancing, routerScore="softmax" if balancing == "auxLoss" else "sigmoid"))
        x = torch.randn(256, 64)
        want = moe.route(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = moe.route(x.bfloat16())
        assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
        ref = moe.route(x.bfloat16().float())  # the same rounded inputs, no autocast
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
        assert want[1].dtype == torch.float32


@pytest.fixture(scope="module")
def top2_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("top2") / "ref"
    return d / "job.yaml", single_process_losses(d, steps=3, micro=1, extra=_moe(TOP2))


@pytest.fixture(scope="module")
def top2_reference(top2_run):
    return top2_run[1]


def test_expert_parallel_2_with_data_parallel_2_and_pipeline_parallel_2_matches_the_single_process_losses(
        tmp_path, top2_reference):
    cfg = write_config(tmp_path, nproc=4, data=2, pipeline=2, steps=3, micro=1, extra=_moe(TOP2, expert=2))
    run(cfg, 4, tmp_path / "losses.txt")
    _assert_close(losses(tmp_path / "losses.txt"), top2_reference)
    assert top2_reference[3] < top2_reference[1]


def test_top1_with_a_shared_expert_and_token_dropping_under_expert_and_tensor_parallel_matches(tmp_path):
    want = single_process_losses(tmp_path / "ref", steps=3, micro=1, extra=_moe(TOP1_SHARED_DROPPING))
    d = tmp_path / "ep2xtp2"
    d.mkdir()
    r = run(write_config(d, nproc=4, data=2, tensor=2, steps=3, micro=1, extra=_moe(TOP1_SHARED_DROPPING, expert=2)),
            4, d / "losses.txt")
    _assert_close(losses(d / "losses.txt"), want)
    # Router statistics reach the log (and the metrics): capacity 1.0 drops some assignments.
    line = [ln for ln in r.stderr.splitlines() if "step 3 router:" in ln][0]
    assert "layer 3 max load" in line
    assert any(float(part.split()[0]) > 0 for part in line.split("dropped")[1:])


def test_sigmoid_routing_with_bias_balancing_under_expert_parallel_matches(tmp_path):
    want = single_process_losses(tmp_path / "ref", steps=3, micro=1, extra=_moe(SIGMOID_BIAS))
    d = tmp_path / "ep2"
    d.mkdir()
    cfg = write_config(d, nproc=2, data=2, steps=3, micro=1, extra=_moe(SIGMOID_BIAS, expert=2))
    run(cfg, 2, d / "losses.txt")
    _assert_close(losses(d / "losses.txt"), want)
    # The selection biases moved, identically, and are part of the checkpoint.
    ep, one = _final_state(cfg), _final_state(tmp_path / "ref" / "job.yaml")
    _assert_same_weights(ep, one)
    assert ep["layers.1.feed_forward.expert_bias"].abs().sum() > 0


def test_an_expert_parallel_checkpoint_resumes_bit_for_bit_and_loads_into_another_expert_degree(tmp_path):
    # Expert parallel 2 within data parallel 4: each expert FSDP-sharded over two ranks.
    cfg = write_config(tmp_path, nproc=4, data=4, steps=6, interval=3, micro=1, extra=_moe(TOP2, expert=2))
    run(cfg, 4, tmp_path / "full.txt")
    full = losses(tmp_path / "full.txt")
    ckpt = tmp_path / "ckpt"
    # As if stopped after step 3: drop the later checkpoint and resume under the same layout ...
    import shutil
    shutil.copytree(ckpt, tmp_path / "saved")
    shutil.rmtree(ckpt / "step-00000006")
    (ckpt / "latest").write_text("step-00000003")
    run(cfg, 4, tmp_path / "resumed.txt")
    assert losses(tmp_path / "resumed.txt") == {s: full[s] for s in (4, 5, 6)}  # bit for bit
    # ... and in one process, where one rank holds all the experts (expert degree 1).
    shutil.rmtree(ckpt)
    shutil.copytree(tmp_path / "saved", ckpt)
    shutil.rmtree(ckpt / "step-00000006")
    (ckpt / "latest").write_text("step-00000003")
    r = run(write_config(tmp_path, steps=6, interval=3, micro=1, extra=_moe(TOP2)), 1, tmp_path / "one.txt")
    assert "resumed from" in r.stderr
    _assert_close(losses(tmp_path / "one.txt"), {s: full[s] for s in (4, 5, 6)})


def test_the_trainer_refuses_an_expert_degree_that_does_not_divide_data_parallelism(tmp_path):
    cfg = write_config(tmp_path, nproc=1, extra=_moe(TOP2, expert=2))
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)], capture_output=True,
                       text=True, env=env())
    assert r.returncode == 85
    assert "spec.parallelism.expert: parallelism.expert needs model.moe and must divide parallelism.data" in r.stderr


def test_examples_moe_yaml_expert_parallel_2_with_fsdp2_over_each_experts_pair_matches_one_process(
        tmp_path, top2_run):
    ref_cfg, top2_reference = top2_run
    doc = next(d for d in yaml.safe_load_all((REPO / "examples" / "moe.yaml").read_text()) if d["kind"] == "PretrainJob")
    spec = doc["spec"]
    assert spec["model"]["moe"] == TOP2  # the reference's model
    assert spec["parallelism"]["expert"] == 2 and spec["parallelism"]["data"] == 4  # experts FSDP-sharded over pairs
    # Shortened for CPU as write_config's reference run; the model and the layout as they are.
    spec.update(nodes=1, nprocPerNode=4, data={"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 1},
                training={"steps": 3, "logEverySteps": 1}, optimizer={"warmupSteps": 2},
                checkpoint={"path": str(tmp_path / "ckpt"), "intervalSteps": 100})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    run(tmp_path / "job.yaml", 4, tmp_path / "losses.txt")
    _assert_close(losses(tmp_path / "losses.txt"), top2_reference)
    # Its checkpoint (experts split over pairs, each FSDP-sharded over two ranks) loads into one
    # whole model with the single process's weights.
    _assert_same_weights(_final_state(tmp_path / "job.yaml"), _final_state(ref_cfg))


def test_router_statistics_render_as_one_prometheus_family_per_metric_with_layer_and_expert_labels():
    from pretrain_trainer.metrics import Metrics
    m = Metrics()
    stats = {0: {"load": [0.75, 0.25], "dropped": 0.1, "aux": 1.2}, 3: {"load": [0.5, 0.5], "dropped": 0.0, "aux": 1.0}}
    m.set_router_stats(stats)
    text = m.render().decode()
    assert 'pretrain_moe_expert_load{layer="0",expert="0"} 0.75' in text
    assert 'pretrain_moe_expert_load{layer="3",expert="1"} 0.5' in text
    assert 'pretrain_moe_dropped_fraction{layer="0"} 0.1' in text and 'pretrain_moe_aux_loss{layer="3"} 1.0' in text
    families = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")]
    assert len(families) == len(set(families))  # each family typed once ...
    names = [ln.split("{")[0].split()[0] for ln in text.splitlines() if not ln.startswith("#")]
    assert all(names.index(n) + names.count(n) - 1 == len(names) - 1 - names[::-1].index(n) for n in set(names))  # ... its samples together
    assert "layer 0 max load 0.750 dropped 0.100 aux 1.2000" in Metrics.router_summary(stats)
