"""GPU checks of the trainer on one CUDA device, and its figures there.

    python bench/gpu.py [--out DIR] [--quick] [--compile]   # on a machine with a GPU; about 8 minutes on an H200
    PYTHONPATH=/tmp/site python bench/gpu.py --out $OUT     # the project not installed: its packages' wheels in /tmp/site

Its child processes (the trainer, the plain loop, torchrun) get PYTHONPATH = the repository's
trainer/ and operator/, then whatever PYTHONPATH it was given. A preflight first imports what the
trainer needs (torch, pydantic, celpy, yaml, numpy, then the trainer itself) in such a child and
stops, naming the missing module, before any GPU time is spent.

1. fp32 on the GPU against fp32 on the CPU (model tiny): the largest relative loss difference.
2. bf16 (autocast, fp32 master weights) against fp32, both on the GPU (model small): both fall,
   and the largest relative loss difference; the same for a tiny MoE (4 experts, top-2), whose
   router runs in fp32 under autocast.
3. A bf16 run stopped by SIGTERM and resumed, against an uninterrupted one on the GPU: equal?
4. NCCL between two ranks on this one GPU (NCCL refuses two ranks per device: reported, not asserted).
5. bench/trainer.py at scale, in this order (the first figures are the ones a short lease must
   get): Llama-3 8B's shapes with 8 of its 32 layers, seq 8192, tokens/s and MFU next to
   torchtitan's 33-39 % on H100, and its step against a plain loop; checkpoint save against dd
   and the training time blocked by async against sync saves (a 320 M model); with `--compile`,
   the 8B-shaped model eager against training.compile; llama3-1b, seq 2048.
6. Activation checkpointing none, full and selective (bench/activation_checkpointing.py, llama3-1b
   with 4 of its layers, bf16, seq 2048): peak memory and step time.

MFU is given against PRETRAIN_PEAK_FLOPS when set (as the trainer's logged MFU), else 989 T (the
H100/H200 datasheet's dense bf16). The step runs are stopped once their last step is logged: the
final checkpoint the trainer always saves (about 31 GiB for the 8B-shaped model) is not written.

Limits: one GPU, so FSDP2, tensor and pipeline parallel over NCCL between ranks are not exercised
here; the CPU test suite covers those layouts with gloo. It ends with a table; `--out` also gets
the figures as JSON (gpu.json) and every child process's output under logs/ (logs/checks/NAME.stdout.txt
and .stderr.txt for the checks, logs/NAME/ for each bench/trainer.py figure, logs/activation_checkpointing/).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Children (`python -m pretrain_trainer`, the plain loop, torchrun's ranks) find the project through
# PYTHONPATH: on a lent GPU machine it is not installed. What this process was given stays after it.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer"), str(ROOT / "operator"),
                                            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "trainer"), str(ROOT / "operator")]

PREFLIGHT = r'''
import importlib, sys
missing = []
for name in ("torch", "pydantic", "celpy", "yaml", "numpy"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
if not missing:
    try:  # what `python -m pretrain_trainer train` imports at its start
        import pretrain_trainer.__main__, pretrain_trainer.train, pretrain_operator.cel
        import celpy; celpy.Environment()
    except ImportError as e:
        missing.append(f"{e.name or '?'} ({type(e).__name__}: {e})")
print("\n".join(missing))
sys.exit(1 if missing else 0)
'''
NCCL_PAIR = r'''
import os, torch, torch.distributed as dist
dist.init_process_group("nccl")
torch.cuda.set_device(0)
t = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
dist.all_reduce(t)
print("allreduce", t.tolist(), flush=True)
dist.destroy_process_group()
'''


# Llama-3 8B's shapes (width, heads, FFN, vocabulary; seq 8192 as torchtitan's 8B figure) with 8 of
# its 32 layers: the whole model with AdamW needs about 128 GB before activations, more than one GPU
# holds. Its step runs are stopped once their last step is logged (bench/trainer.py's step and compile
# parts): the final checkpoint the trainer always saves, about 34 GB (31 GiB) never read, is not written.
EIGHT_B_SHAPED = ["--preset", "llama3-8b", "--model", json.dumps({"layers": 8}), "--seq", "8192",
                  "--batch", "2", "--micro", "1", "--precision", "bf16", "--steps", "10"]


def failed(e: BaseException) -> str:
    """A failed row's text: the head and the tail of the error (a child's stderr ends with its cause)."""
    t = f"{type(e).__name__}: {e}"
    return "failed: " + (t if len(t) <= 700 else f"{t[:150]} ... {t[-550:]}")


def rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def preflight() -> None:
    """Stop at once, naming what is missing, when a child could not run the trainer."""
    r = subprocess.run([sys.executable, "-c", PREFLIGHT], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"bench/gpu.py: the trainer cannot run here, missing: {r.stdout.strip() or r.stderr[-1500:]}\n"
                 f"PYTHONPATH={os.environ['PYTHONPATH']}\n(on a lent machine: wheels of pydantic, cel-python and their "
                 "dependencies in a folder on PYTHONPATH, e.g. PYTHONPATH=/tmp/site python bench/gpu.py --out $OUT)")


LOGS = Path(tempfile.gettempdir())  # main() sets it to --out's logs/checks


def child(name: str, argv: list[str], env: dict | None = None, timeout: float = 300,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run a check's process; its stdout and stderr go to LOGS/NAME.stdout.txt and .stderr.txt.
    `check`: a non-zero exit raises with the tail of its stderr."""
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{name}.stdout.txt").write_text(r.stdout)
    (LOGS / f"{name}.stderr.txt").write_text(r.stderr)
    if check and r.returncode != 0:
        raise RuntimeError(f"{name}: exit {r.returncode}: {r.stderr[-3000:]}")
    return r


def run_losses(d: Path, cpu: bool = False, launch: bool = False, **kw) -> dict[int, float]:
    from tests.trainer_util import cmd, env, losses, write_config
    d.mkdir(parents=True)
    cfg = write_config(d, **kw)
    e = {**env(), "PET_NPROC_PER_NODE": "1"}
    if cpu:
        e["CUDA_VISIBLE_DEVICES"] = ""
    child(d.name, cmd(cfg, 1, d / "losses.txt", launch=launch), env=e)
    return losses(d / "losses.txt")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="checks only, no scale figures")
    ap.add_argument("--compile", action="store_true", help="also the 8B-shaped model with training.compile")
    ap.add_argument("--figures-only", action="store_true", help="scale figures only, no checks")
    a = ap.parse_args(argv)
    preflight()
    import torch
    assert torch.cuda.is_available(), "no GPU: bench/gpu.py is for a machine with one"
    from tests.trainer_util import cmd, env, losses, wait_for_step, write_config
    global LOGS
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    LOGS = out / "logs" / "checks"
    print(f"bench/gpu.py: figures and logs in {out}", flush=True)
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    rows = []

    def row(what, value, ok):
        rows.append((what, value, ok))
        print(f"[{'ok' if ok else 'NO'}] {what}: {value}", flush=True)
        (out / "gpu.json").write_text(json.dumps({**res, "rows": rows}, indent=1))

    if not a.figures_only:
        with tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp:
            d = Path(tmp)
            t0 = time.monotonic()
            small = {"extra": {"model": {"preset": "small"}, "data": {"seqLen": 128, "globalBatchSize": 16, "microBatchSize": 8}}}
            try:
                g = run_losses(d / "gpu32", steps=12, interval=100)
                c = run_losses(d / "cpu32", cpu=True, steps=12, interval=100)
                r = rel(g, c)
                row("fp32 GPU vs CPU, tiny, 12 steps: max relative loss difference", f"{r:.2e}", r < 1e-3)
            except Exception as e:  # noqa: BLE001  (each check reports and the script goes on)
                row("fp32 GPU vs CPU", failed(e), False)
            try:
                # The pods' launcher forks its ranks after importing torch: CUDA must first start in the rank.
                f = run_losses(d / "forked", launch=True, steps=12, interval=100)
                row("fp32 GPU, the launcher's forked rank vs a plain process, tiny, 12 steps", "identical" if f == g else
                    f"max relative difference {rel(f, g):.2e}", f == g)
            except Exception as e:  # noqa: BLE001
                row("launcher (forked rank) on the GPU", failed(e), False)

            def bf16_vs_fp32(name: str, what: str, extra: dict, falls) -> None:
                """30 steps in fp32 and in bf16 (autocast) on the GPU: both losses fall (`falls(first, last)`)
                and stay within 3 % of each other."""
                try:
                    f32 = run_losses(d / f"{name}32", steps=30, interval=100, extra=extra)
                    b16 = run_losses(d / f"{name}16", steps=30, interval=100,
                                     extra={**extra, "training": {"precision": "bf16", "logEverySteps": 1}})
                    r = rel(b16, f32)
                    row(f"{what} bf16 vs fp32 GPU, 30 steps: loss {b16[1]:.3f} -> {b16[30]:.3f} (fp32 {f32[30]:.3f}); "
                        "max relative difference", f"{r:.2e}", falls(b16[1], b16[30]) and falls(f32[1], f32[30]) and r < 0.03)
                except Exception as e:  # noqa: BLE001
                    row(f"{what} bf16 vs fp32", failed(e), False)

            bf16_vs_fp32("s", "small", small["extra"], lambda first, last: last < first - 1.0)
            # The router scores, chooses and weighs in fp32 under bf16 autocast (moe.py's route).
            bf16_vs_fp32("moe", "MoE (4 experts, top-2), tiny", {"model": {"preset": "tiny", "moe": {"experts": 4, "topK": 2}},
                                                                  "data": {"seqLen": 128, "globalBatchSize": 16, "microBatchSize": 8}},
                         lambda first, last: last < 0.95 * first)  # tiny: 6.25 -> 5.49 on an H200
            try:
                kw = dict(steps=300, interval=1000, extra={"training": {"precision": "bf16", "logEverySteps": 1}})
                want = run_losses(d / "full", **kw)
                part = d / "part"
                part.mkdir()
                cfg = write_config(part, **kw)
                LOGS.mkdir(parents=True, exist_ok=True)
                with open(LOGS / "part.stdout.txt", "w") as o, open(LOGS / "part.stderr.txt", "w") as e_:
                    p = subprocess.Popen(cmd(cfg, 1, part / "losses.txt"), env=env(), stdout=o, stderr=e_, text=True)
                    try:
                        wait_for_step(part / "losses.txt", 50, p)
                        p.send_signal(signal.SIGTERM)
                        code = p.wait(120)
                    except (AssertionError, subprocess.TimeoutExpired) as e:
                        raise RuntimeError(f"{e}: {(LOGS / 'part.stderr.txt').read_text()[-3000:]}") from e
                    finally:
                        if p.poll() is None:
                            p.kill()
                            p.wait()
                stopped = max(losses(part / "losses.txt"))
                child("part-resumed", cmd(cfg, 1, part / "losses.txt"), env=env())
                got = losses(part / "losses.txt")
                diff = max(abs(got[k] - want[k]) for k in want)
                row(f"bf16 GPU: SIGTERM at step {stopped} (exit {code}), resumed to 300 vs uninterrupted: max |loss diff|",
                    f"{diff:.3e} ({'bit for bit' if got == want else 'not identical'})", code == 83 and got == want)
            except Exception as e:  # noqa: BLE001
                row("resume on GPU", failed(e), False)
            try:
                script = d / "nccl_pair.py"
                script.write_text(NCCL_PAIR)
                r = child("nccl_pair", [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(script)],
                          timeout=90, check=False)
                tail = (r.stdout + r.stderr).strip().splitlines()
                msg = next((ln for ln in tail if "allreduce" in ln or "Duplicate GPU" in ln or "Error" in ln), tail[-1] if tail else "")
                row("NCCL, 2 ranks on 1 GPU (informational)", f"exit {r.returncode}: {msg[:200]}", True)
            except Exception as e:  # noqa: BLE001
                row("NCCL pair (informational)", failed(e), True)
            res["checks_s"] = time.monotonic() - t0

    if not a.quick:
        import trainer as bench_trainer
        peak = res["peak_flops"] = bench_trainer.datasheet_peak()  # PRETRAIN_PEAK_FLOPS, else 989 T
        pk = f"{peak / 1e12:.0f} T"

        def figures(key: str, argv: list[str], what: str, verdict) -> None:
            """One bench/trainer.py run at scale: its figures under `key`, its children's output in
            logs/`key`, and a row from `verdict` (figures -> (value, ok)); a failed run is a failed row
            with the trainer's output."""
            try:
                res[key] = f = bench_trainer.main([*argv, "--logs", str(out / "logs" / key)])
                row(what, *verdict(f))
            except BaseException as e:  # noqa: BLE001  (SystemExit carries the trainer's stderr)
                row(what, failed(e), False)

        figures("step_8b_shaped", [*EIGHT_B_SHAPED, "--parts", "step"],
                f"Llama-3 8B-shaped (8 of 32 layers, 2.8 B parameters) bf16 seq 8192: tokens/s, MFU of {pk} "
                "(torchtitan 8B on H100: 33-39 %)",
                lambda f: (f"{f['tokens_per_s']:,.0f} tok/s, MFU {100 * f['model_flops'] / peak:.1f} %, step "
                           f"{f['trainer_step_s'] * 1000:.0f} ms vs plain {f['plain_step_s'] * 1000:.0f} ms "
                           f"({f['trainer_step_s'] / f['plain_step_s']:.2f}x)", f["model_flops"] / peak >= 0.33))
        m = {"dim": 1024, "layers": 16, "heads": 16, "kvHeads": 8, "vocabSize": 32768, "ffnDim": 4096, "maxSeqLen": 2048}
        figures("checkpoint", ["--preset", "small", "--model", json.dumps(m), "--seq", "1024", "--batch", "16", "--micro", "8",
                               "--precision", "bf16", "--steps", "121", "--save-every", "40", "--parts", "checkpoint"],
                # 40 steps (about 12 s on an H200) outlast one 3.6 GiB write: 20 did not, each save waited for the last
                "checkpoint 320 M model: save vs dd; blocked by the 3 saves during 121 steps (sync, async)",
                lambda f: (f"{f['checkpoint_bytes'] / 2**20 / f['save_s']:.0f} MiB/s = {100 * f['dd_s'] / f['save_s']:.0f} % of dd; "
                           f"loop blocked {f['sync_blocked_s']:.2f} s sync, {f['async_blocked_s']:.2f} s async"
                           + (f" (async fell back to sync: {f['async_fell_back']})" if f["async_fell_back"] else ""),
                           f["dd_s"] / f["save_s"] >= 0.8 and f["async_blocked_s"] <= 0.05 * f["sync_blocked_s"]
                           and not f["async_fell_back"]))
        if a.compile:  # the same, compiled (torchtitan's published figures compile the blocks)
            figures("compile_8b_shaped", [*EIGHT_B_SHAPED, "--parts", "compile"],
                    f"Llama-3 8B-shaped, training.compile: MFU of {pk}, step against eager (torchtitan 8B on H100: 33-39 %)",
                    lambda f: (f"MFU {100 * f['compiled_model_flops'] / peak:.1f} % (eager "
                               f"{100 * f['eager_model_flops'] / peak:.1f} %), step {f['compiled_step_s'] * 1000:.0f} ms vs "
                               f"{f['eager_step_s'] * 1000:.0f} ms; run {f['compiled_run_s']:.0f} s vs {f['eager_run_s']:.0f} s",
                               f["compiled_model_flops"] / peak >= 0.33))
        figures("step", ["--preset", "llama3-1b", "--seq", "2048", "--batch", "16", "--micro", "4", "--precision", "bf16",
                         "--steps", "15", "--parts", "step"],
                f"llama3-1b bf16 seq 2048: tokens/s, MFU (of {pk})",
                lambda f: (f"{f['tokens_per_s']:,.0f} tok/s, MFU {100 * f['model_flops'] / peak:.1f} %, "
                           f"step {f['trainer_step_s'] * 1000:.0f} ms vs plain {f['plain_step_s'] * 1000:.0f} ms "
                           f"({f['trainer_step_s'] / f['plain_step_s']:.2f}x)", f["trainer_step_s"] / f["plain_step_s"] <= 1.05))
        try:  # selective activation checkpointing on the GPU, where recomputing elementwise ops is cheap
            import activation_checkpointing as bench_ac
            # A model of a GPU's size: `small` there was bound by kernel launches (selective 1.45x, full 1.26x).
            res["activation_checkpointing"] = f = bench_ac.main(["--preset", "llama3-1b", "--model", '{"layers": 4}', "--bf16",
                                                                  "--batch", "4", "--seq", "2048",
                                                                  "--logs", str(out / "logs" / "activation_checkpointing")])
            ac = {m: (f[m]["mib"] / f["none"]["mib"], f[m]["step_s"] / f["none"]["step_s"]) for m in ("full", "selective")}
            row("activation checkpointing, llama3-1b with 4 layers, bf16, batch 4 x seq 2048: peak memory and step against none",
                "; ".join(f"{m} {mem:.2f}x memory, {t:.2f}x step" for m, (mem, t) in ac.items()),
                ac["selective"][0] < 1 and ac["selective"][1] < ac["full"][1])
        except Exception as e:  # noqa: BLE001
            row("activation checkpointing", failed(e), False)
    (out / "gpu.json").write_text(json.dumps({**res, "rows": rows}, indent=1))
    print(f"\n== bench/gpu.py on {res['gpu']}, torch {res['torch']}")
    for what, value, ok in rows:
        print(f"{'ok' if ok else 'NO'}  {what}: {value}")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
