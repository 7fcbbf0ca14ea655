"""The trainer: step overhead against a plain PyTorch loop, training.compile against eager,
checkpoint save throughput against the disk's sequential write speed, and training time blocked
by async against sync saves.

    .venv/bin/python bench/trainer.py [--steps 30]                        # CPU, model 'small'
    python bench/trainer.py --preset llama3-1b --seq 2048 --batch 16 --micro 4 --precision bf16
                                                                          # one GPU (bench/gpu.py)

Runs on CUDA when torch sees a GPU, else on the CPU. Per-step times are measured inside each
process after five warm-up steps, so start-up, the first steps' allocations and the final
checkpoint stay out of them: the plain loop times its own steps, the trainer's are the mean of the
seconds per step of its log windows (a line every 5 steps, the first window left out). The step
and compile runs are stopped once their last step is logged: the final checkpoint (about 31 GiB
for the 8B-shaped model of bench/gpu.py) is never written. Baselines, measured in the same run: a
minimal loop (same model, batch, precision and AdamW; bf16 autocast on CUDA only, as the trainer;
no loader state, no metrics, no collectives), `dd` writing the same number of bytes with fsync,
and on a GPU a large bf16 matrix product (the measured peak that MFU is also given against). MFU
is given against PRETRAIN_PEAK_FLOPS when set (as the trainer's logged MFU), else the H100/H200
datasheet's dense bf16 989 TFLOP/s. `--logs DIR` keeps each child process's output. Limits: one
process; it says nothing about multi-rank scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOGS: Path | None = None  # --logs: each child process's output is written here


def datasheet_peak() -> float:
    """The peak FLOP/s that MFU is given against: PRETRAIN_PEAK_FLOPS when set, as the trainer's
    own logged MFU (train.py), else the H100/H200 datasheet's dense bf16 989 T."""
    return float(os.environ.get("PRETRAIN_PEAK_FLOPS", "989e12"))


PLAIN = r'''
import json, sys, time, torch, torch.nn.functional as F
sys.path[:0] = ["{root}/trainer", "{root}/operator"]
from pretrain_operator.api import ModelSpec
from pretrain_trainer.model import ModelArgs, Transformer, init_weights
steps, preset, seq, batch, micro, bf16 = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "bf16"
dev = "cuda" if torch.cuda.is_available() else "cpu"
args = ModelArgs.from_spec(ModelSpec(**json.loads(preset)))
torch.manual_seed(0)
with torch.device(dev):  # built where it trains: no copy from the CPU (the 8B-shaped model's fp32 weights: about 11 GB)
    m = Transformer(args)
init_weights(m, 0)  # each parameter generated on the CPU and copied in place, as the trainer's
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), **({"fused": True} if dev == "cuda" else {"foreach": False}))
x = torch.randint(0, args.vocabSize, (batch, seq + 1), device=dev)
for step in range(1, steps + 1):
    if step == 6:
        t0 = time.monotonic()  # after five warm-up steps, as the trainer's figure
    for i in range(0, batch, micro):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16 and dev == "cuda"):  # as the trainer (train.py)
            logits = m(x[i:i+micro, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[i:i+micro, 1:].flatten()) / (batch // micro)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    float(loss)
print("step_s", (time.monotonic() - t0) / (steps - 5))
'''


def config(d: Path, a, steps: int, interval: int = 100000, async_save: bool = False, log_every: int = 1000,
           compiled: bool = False) -> Path:
    spec = {"model": a.model,
            "data": {"seqLen": a.seq, "globalBatchSize": a.batch, "microBatchSize": a.micro},
            "training": {"steps": steps, "logEverySteps": log_every, "precision": a.precision, "compile": compiled},
            "optimizer": {"warmupSteps": 0},
            "checkpoint": {"path": str(d / "ckpt"), "intervalSteps": interval, "keep": 2, "async": async_save}}
    p = d / f"job-{steps}-{interval}-{async_save}-{compiled}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def timed(argv: list[str], env: dict | None = None, name: str | None = None, stop_at: str | None = None) -> tuple[float, str]:
    """Run `argv`: its wall time and its output (stdout and stderr). With `stop_at`, a regular
    expression, the process (and any child of it) is killed as soon as a line of its output matches,
    and the wall time ends there. The output goes to LOGS/`name`.txt too when --logs is given."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines, stopped = [], False
    try:
        for line in p.stdout:
            lines.append(line)
            if stop_at and re.search(stop_at, line):
                stopped = True
                os.killpg(p.pid, signal.SIGKILL)
                break
        wall = time.monotonic() - t0
        lines.append(p.stdout.read())
        p.wait()
    except BaseException:  # interrupted: leave nothing running
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        raise
    text = "".join(lines)
    if LOGS is not None and name:
        LOGS.mkdir(parents=True, exist_ok=True)
        path, i = LOGS / f"{name}.txt", 1
        while path.exists():  # the same command again (eager in the step part and the compile part)
            i += 1
            path = LOGS / f"{name}-{i}.txt"
        path.write_text(text)
    if p.returncode != 0 and not stopped:
        raise SystemExit(f"{' '.join(argv[:4])}...: exit {p.returncode}: {text[-3000:]}")
    return wall, text


def trainer_run(d: Path, a, steps: int, stop_at_last_step: bool = False, **kw) -> tuple[float, str]:
    """One trainer process. `stop_at_last_step`: killed once its last step is logged, before the
    final checkpoint it always saves (the run's wall time ends there too)."""
    shutil.rmtree(d / "ckpt", ignore_errors=True)
    env = dict(os.environ, PRETRAIN_METRICS_PORT="0")
    cfg = config(d, a, steps, **kw)
    return timed([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)], env, name=f"trainer-{cfg.stem}",
                 stop_at=rf"step {steps}/{steps} loss " if stop_at_last_step else None)


def matmul_peak() -> float:
    """bf16 FLOP/s of an 8192^3 matrix product on this GPU (median of 10 after warm-up)."""
    import torch
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", default="{}", help='sizes over the preset, as JSON: {"dim": 1024, "layers": 16}')
    ap.add_argument("--parts", default="step,compile,checkpoint,start",
                    help="step (overhead, tokens/s, MFU), compile (training.compile against eager), checkpoint (save "
                         "speed, blocking), start (8 ranks: forked against spawned)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--logs", help="write each child process's output (plain loop, trainer runs) into this folder")
    a = ap.parse_args(argv or [])
    global LOGS
    LOGS = Path(a.logs) if a.logs else None
    a.model = {"preset": a.preset, **json.loads(a.model)}
    parts = a.parts.split(",")
    import torch
    cuda = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if cuda else "CPU"
    sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "operator")]
    from pretrain_operator.api import ModelSpec
    from pretrain_trainer.model import ModelArgs, num_params
    margs = ModelArgs.from_spec(ModelSpec(**a.model))
    out: dict = {"device": where, "preset": a.preset, "params": num_params(margs), "seq": a.seq,
                 "batch": a.batch, "micro": a.micro, "precision": a.precision}
    tmp_root = ROOT / ".local-cluster" if (ROOT / ".local-cluster").exists() else None
    name = a.preset if a.model == {"preset": a.preset} else json.dumps(a.model)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-", dir=str(tmp_root) if tmp_root else None) as tmp:
        d = Path(tmp)
        if "step" in parts:
            out.update(step_part(d, a, name, margs, where, cuda))
        if "compile" in parts:
            out.update(compile_part(d, a, name, margs, cuda))
        if "checkpoint" in parts:
            out.update(checkpoint_part(d, a))
        if "start" in parts and not cuda:
            out.update(start_part(d))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


def step_part(d: Path, a, name: str, margs, where: str, cuda: bool) -> dict:
    from pretrain_trainer.model import flops_per_token, num_params
    out = {}
    # Step times from inside each process, after five warm-up steps: start-up, the first steps'
    # allocations and the final checkpoint stay out of the figure.
    n = 5 + 5 * max(a.steps // 5, 1)
    plain = d / "plain.py"
    plain.write_text(PLAIN.replace("{root}", str(ROOT)))
    _, text = timed([sys.executable, str(plain), str(n), json.dumps(a.model), str(a.seq), str(a.batch), str(a.micro), a.precision],
                    name=f"plain-{n}")
    plain_step = float(re.findall(r"step_s ([0-9.e-]+)", text)[-1])
    _, text = trainer_run(d, a, n, log_every=5, stop_at_last_step=True)  # the final checkpoint is not written
    trainer_step = step_seconds(text, a.batch * a.seq)
    tps = a.batch * a.seq / trainer_step
    out.update(plain_step_s=plain_step, trainer_step_s=trainer_step, tokens_per_s=tps)
    print(f"step time, model {name} ({num_params(margs) / 1e6:.0f} M parameters; seq {a.seq}, batch {a.batch}, "
          f"microbatch {a.micro}, {a.precision}), 1 process on {where}:")
    print(f"  plain PyTorch loop   {plain_step * 1000:8.1f} ms")
    print(f"  pretrain_trainer     {trainer_step * 1000:8.1f} ms   ratio {trainer_step / plain_step:5.2f}x (goal <= 1.05)")
    if cuda:
        peak, sheet = matmul_peak(), datasheet_peak()
        mfu = tps * flops_per_token(margs, a.seq)
        out.update(matmul_peak_flops=peak, model_flops=mfu, peak_flops=sheet)
        print(f"  tokens/s {tps:,.0f}; model FLOP/s {mfu / 1e12:.0f} T = MFU {100 * mfu / sheet:.1f} % of the "
              f"{sheet / 1e12:.0f} T peak (PRETRAIN_PEAK_FLOPS, else the datasheet's bf16), {100 * mfu / peak:.1f} % of the "
              f"{peak / 1e12:.0f} T measured 8192^3 bf16 matmul")

    return out


def step_seconds(text: str, tokens_per_step: int) -> float:
    """The trainer's mean step time from its logged tokens/s, the first log line (warm-up) left out:
    the mean of each window's seconds per step (tokens per step / its rate; equal windows), not the
    step time of the mean rate, which a slow window would pull less than it weighs."""
    rates = [float(x) for x in re.findall(r"tokens/s ([0-9.]+)", text)][1:]
    if not rates:
        raise SystemExit(f"no tokens/s logged after the first window: {text[-2000:]}")
    return statistics.mean(tokens_per_step / r for r in rates)


def compile_part(d: Path, a, name: str, margs, cuda: bool) -> dict:
    """training.compile against eager, the same model, batch and steps: the step time after the
    first five steps (the first compiles), each run's wall time up to its last step (start-up,
    compiling; not the final checkpoint, which is not written), and on a GPU the model FLOP/s of each."""
    from pretrain_trainer.model import flops_per_token
    n = 5 + 5 * max(a.steps // 5, 1)
    out = {}
    print(f"training.compile, model {name}, 1 process, {n} steps:")
    for mode in ("eager", "compiled"):
        wall, text = trainer_run(d, a, n, log_every=5, compiled=mode == "compiled", stop_at_last_step=True)
        step = out[f"{mode}_step_s"] = step_seconds(text, a.batch * a.seq)
        out[f"{mode}_run_s"] = wall
        mfu = ""
        if cuda:
            flops = out[f"{mode}_model_flops"] = a.batch * a.seq / step * flops_per_token(margs, a.seq)
            mfu = f"   MFU {100 * flops / datasheet_peak():.1f} % (of {datasheet_peak() / 1e12:.0f} T)"
        print(f"  {mode:9s}  step {step * 1000:8.1f} ms   run {wall:6.1f} s{mfu}")
    print(f"  step ratio {out['compiled_step_s'] / out['eager_step_s']:5.2f}x (below 1: faster)")
    return out


def checkpoint_part(d: Path, a) -> dict:
    out = {}
    # Checkpoint throughput: one save of model + AdamW state.
    _, err = trainer_run(d, a, 2, interval=1)
    save_s = float(re.findall(r"checkpoint step 2 committed in ([0-9.]+) s", err)[-1])
    size = sum(f.stat().st_size for f in (d / "ckpt" / "step-00000002").rglob("*") if f.is_file())
    dd_s, _ = timed(["dd", "if=/dev/zero", f"of={d / 'dd.bin'}", "bs=1M", f"count={max(size >> 20, 1)}", "conv=fsync"], name="dd")
    (d / "dd.bin").unlink()
    out.update(checkpoint_bytes=size, save_s=save_s, dd_s=dd_s)
    print(f"checkpoint save of {size / 2**20:.0f} MiB (model + optimizer):")
    print(f"  dd (sequential, fsync)  {size / 2**20 / dd_s:8.0f} MiB/s")
    print(f"  DCP save + commit       {size / 2**20 / save_s:8.0f} MiB/s   {100 * dd_s / save_s:5.0f} % of dd (goal >= 80 %)")

    # Blocked time: a save every k steps, sync against async, measured by the training loop itself
    # (the wall time of whole runs varies by 10 % between identical runs on 2 cores: too coarse).
    # The save at the last step is not counted: it is synchronous either way, and no step waits for it.
    # Each save's own figure is logged too: the median of all but the first (an async run's first
    # save also starts the writer process, whose interpreter and torch import the next save may
    # wait for when the saves are only a few seconds apart) is the steady cost of one save.
    n, k = a.steps, a.save_every
    text = {mode: trainer_run(d, a, n, interval=k, async_save=mode == "async")[1] for mode in ("sync", "async")}
    blocked = {mode: float(re.findall(r"saves blocked training for ([0-9.]+) s", t)[-1]) for mode, t in text.items()}
    each = {mode: [float(x) for x in re.findall(r"checkpoint step \d+ blocked training for ([0-9.]+) s", t)]
            for mode, t in text.items()}
    steady = {mode: statistics.median(v[1:] or v) for mode, v in each.items()}
    # An async save that failed falls back to sync ones (the trainer says so): its figure is not async's.
    fell_back = re.search(r"the async checkpoint of step \d+ failed[^\n]*|async checkpointing failed[^\n]*", text["async"])
    out["async_fell_back"] = fell_back.group(0)[:300] if fell_back else ""
    if fell_back:
        print(f"  the async run fell back to synchronous saves: {out['async_fell_back']}")
    out.update(sync_blocked_s=blocked["sync"], async_blocked_s=blocked["async"],
               sync_blocked_per_save_s=steady["sync"], async_blocked_per_save_s=steady["async"])
    print(f"{(n - 1) // k} saves during {n} steps: the loop blocked {blocked['sync']:.2f} s by sync saves, "
          f"{blocked['async']:.2f} s by async ones ({100 * blocked['async'] / blocked['sync']:.1f} %, goal <= 5 %)")
    print(f"  one save after the first (median): sync {1000 * steady['sync']:.0f} ms, async {1000 * steady['async']:.1f} ms "
          f"({100 * steady['async'] / steady['sync']:.1f} %); the first async save {1000 * each['async'][0]:.0f} ms")
    # How soon the first async save is on disk (as a termination notice's save must be): from its
    # start to its commit, against a sync save's, which the writer process's start-up does not touch.
    commit = {mode: [float(x) for x in re.findall(r"checkpoint step \d+ committed in ([0-9.]+) s", t)] for mode, t in text.items()}
    out.update(first_async_commit_s=commit["async"][0], sync_commit_s=statistics.median(commit["sync"]))
    print(f"  the first async save committed {commit['async'][0]:.2f} s after it began; a sync save "
          f"{statistics.median(commit['sync']):.2f} s (median)")
    return out



def start_part(d: Path, steps: int = 12) -> dict:
    """How fast a gang's ranks start: 8 ranks of the tiny model in pipeline 2 x data 2 x tensor 2
    (the quickstart's layout, on one node), through the pods' launcher with its ranks forked after
    one import of torch against fresh interpreters (`--start-method spawn`), the baseline."""
    sys.path.insert(0, str(ROOT))
    from tests.trainer_util import write_config  # the tests' job config: the tiny model, one node

    out = {}
    (d / "start").mkdir()
    cfg = write_config(d / "start", nproc=8, data=2, tensor=2, pipeline=2, steps=steps, interval=1000, global_batch=8)
    env = dict(os.environ, PRETRAIN_METRICS_PORT="0")
    env.pop("OMP_NUM_THREADS", None)  # as in a pod: torchrun sets one thread per rank
    print("8 ranks (pipeline 2 x data 2 x tensor 2, model tiny) through the launcher, one node:")
    for method in ("spawn", "fork"):
        shutil.rmtree(d / "start" / "ckpt", ignore_errors=True)
        losses = d / f"losses-{method}.txt"
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "pretrain_trainer", "launch", "--nproc_per_node", "8",
                              "--master_port", str(29500 + os.getpid() % 400), "--start-method", method,
                              "train", "--config", str(cfg), "--losses-out", str(losses)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not (losses.exists() and losses.read_text().strip()) and p.poll() is None:
            time.sleep(0.02)
        first = time.monotonic() - t0
        out[f"start_{method}_pss_mib"] = tree_pss_mib(p.pid)
        err = p.communicate()[1]
        if p.returncode != 0:
            raise SystemExit(err[-3000:])
        total = time.monotonic() - t0
        out[f"start_{method}_first_step_s"], out[f"start_{method}_total_s"] = first, total
    f, s_ = out["start_fork_first_step_s"], out["start_spawn_first_step_s"]
    print(f"  launch to the first step: forked ranks {f:6.2f} s, fresh interpreters (spawn) {s_:6.2f} s: {f / s_:.2f}x")
    print(f"  {steps} steps in all:          forked ranks {out['start_fork_total_s']:6.2f} s, spawn "
          f"{out['start_spawn_total_s']:6.2f} s: {out['start_fork_total_s'] / out['start_spawn_total_s']:.2f}x")
    pf, ps = out["start_fork_pss_mib"], out["start_spawn_pss_mib"]
    print(f"  memory at the first step (PSS, launcher and ranks): forked {pf:6.0f} MiB, spawn {ps:6.0f} MiB: {pf / ps:.2f}x")
    return out


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and its descendants: pages shared by n of them count 1/n."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo, kib = [pid], 0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            kib += next(int(ln.split()[1]) for ln in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines() if ln.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return kib / 1024


if __name__ == "__main__":
    main(sys.argv[1:])
