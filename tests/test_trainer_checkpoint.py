"""Checkpoints resume exactly: a run stopped by SIGTERM at step k (exit 83) and resumed from step k gives, bit for bit
on CPU, the losses of the uninterrupted run (one process, MoE, LoRA, two pipeline stages); a newest checkpoint that is corrupt or half-written
is skipped for the previous one and set aside, so that saves made after it are kept; one that verifies but cannot be read or loaded
stops the run with nothing set aside, and none verifying is exit 85; a resume at the last step says there is nothing to train; a
checkpoint loads into another layout; a checkpoint request in
the annotations file saves without stopping; SIGTERM on one rank stops every rank at the same
step with one checkpoint and the contract's exit code; a checkpoint folder that the ranks do not
share is refused at the start; a checkpoint of another model is refused, never partly loaded nor
trained over, when resuming and as initial weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pretrain_operator import contract as c
from tests.helpers import wait_for
from tests.trainer_util import (TORCHRUN, cmd, env, free_port, injected, loss_steps, losses, run, single_process_losses, wait_for_step,
                                write_config)

torch = pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")


def _committed(d):
    return sorted(p.name for p in (d / "ckpt").glob("step-*") if (p / "COMMITTED").exists())


def _pointed(d):
    """The committed steps once `latest` names the newest of them (a commit's last write), else None."""
    steps, latest = _committed(d), d / "ckpt" / "latest"
    return steps if steps and latest.exists() and latest.read_text() == steps[-1] else None


def _writer_process(rank_pid: int) -> bool:
    """Whether a rank has started DCP's async writer, a spawned child (multiprocessing's spawn_main)."""
    for child in subprocess.run(["pgrep", "-P", str(rank_pid)], capture_output=True, text=True).stdout.split():
        try:
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                return True
        except OSError:
            pass
    return False


def _record_crcs(step_dir) -> set[int]:
    """The CRC32s in the zip headers of every tensor record of a DCP checkpoint's shards."""
    import io
    import zipfile

    from torch.distributed.checkpoint import FileSystemReader
    crcs = set()
    for info in FileSystemReader(str(step_dir)).read_metadata().storage_data.values():
        with open(step_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            crcs |= {z.CRC for z in zipfile.ZipFile(io.BytesIO(f.read(info.length))).infolist() if z.file_size}
    return crcs


def _preempted(d: Path, cfg: Path, nproc: int, after: int) -> int:
    """Train `cfg` in `d` (one process, or the pods' launcher over `nproc` ranks), SIGTERM it once
    step `after` is trained, check that it exits with the contract's preempted code, and return
    the step of the checkpoint it saved."""
    launch = nproc > 1  # plain torchrun exits 1 on a SIGTERM, whatever its ranks did
    e = {**env(), "PET_NPROC_PER_NODE": str(nproc), "PET_MASTER_PORT": free_port()} if launch else env()
    p = subprocess.Popen(cmd(cfg, nproc, d / "losses.txt", launch=launch), env=e, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        wait_for_step(d / "losses.txt", after, p)
        p.send_signal(signal.SIGTERM)  # the launcher's agent forwards it to the ranks
        assert p.wait(60) == c.EXIT_PREEMPTED, p.stderr.read()[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
    return int(_committed(d)[-1].split("-")[1])


def _resumed(r: subprocess.CompletedProcess, d: Path, k: int, steps: int) -> None:
    """The run `r` resumed from step k: it says so, and trained k+1.. only (the losses file has
    every step once, in order: the stopped run's 1..k, then its)."""
    assert f"resumed from {d / 'ckpt' / f'step-{k:08d}'}" in r.stderr, r.stderr[-3000:]
    assert loss_steps(d / "losses.txt") == list(range(1, steps + 1))


def test_a_run_stopped_by_sigterm_and_resumed_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    # 40 steps: with 8, a fast machine finished the run before its signal took effect (assert 8 < 8).
    want = single_process_losses(tmp_path / "full", steps=40, interval=100)

    part = tmp_path / "part"
    part.mkdir()
    cfg = write_config(part, steps=40, interval=100)
    k = _preempted(part, cfg, 1, 3)
    assert 3 <= k < 40
    _resumed(run(cfg, 1, part / "losses.txt"), part, k, 40)
    got = losses(part / "losses.txt")
    assert got == want  # every step, before and after k, bit for bit


@pytest.mark.parametrize("extra", [
    {"model": {"preset": "tiny", "moe": {"experts": 4, "topK": 2}}},
    {"lora": {"rank": 4, "targetModules": ["wq", "wv", "w2"]}},
], ids=["moe", "lora"])
def test_moe_and_lora_runs_stopped_by_sigterm_resume_bit_for_bit(tmp_path, extra):
    # 40 steps: with 8, a fast machine finished the LoRA run before the signal arrived (exit 0).
    want = single_process_losses(tmp_path / "full", steps=40, interval=100, extra=extra)
    part = tmp_path / "part"
    part.mkdir()
    cfg = write_config(part, steps=40, interval=100, extra=extra)
    k = _preempted(part, cfg, 1, 3)
    assert 3 <= k < 40
    _resumed(run(cfg, 1, part / "losses.txt"), part, k, 40)
    assert losses(part / "losses.txt") == want


def _corrupt(shard: Path, how: str) -> None:
    if how == "truncated":  # the marker's size no longer matches
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "overwritten":  # the same size, a record's header zeroed: loading alone finds it (DCP's CheckpointException)
        with open(shard, "r+b") as f:
            f.write(bytes(64))
    else:  # one byte in the middle of this file's largest tensor: DCP and torch.load read it without a word
        from torch.distributed.checkpoint import FileSystemReader
        item = max((s for s in FileSystemReader(str(shard.parent)).read_metadata().storage_data.values()
                    if s.relative_path == shard.name), key=lambda s: s.length)
        with open(shard, "r+b") as f:
            f.seek(item.offset + item.length // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("how", ["truncated", "overwritten", "one byte changed"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_is_set_aside(tmp_path, how):
    cfg = write_config(tmp_path, steps=6, interval=3)
    run(cfg, 1, tmp_path / "first.txt")
    first = losses(tmp_path / "first.txt")
    assert _committed(tmp_path) == ["step-00000003", "step-00000006"]
    _corrupt(next((tmp_path / "ckpt" / "step-00000006").glob("*.distcp")), how)
    half = tmp_path / "ckpt" / "step-00000009"
    half.mkdir()  # a save cut short: no marker
    (half / "__0_0.distcp").write_bytes(b"partial")
    r = run(write_config(tmp_path, steps=6, interval=3), 1, tmp_path / "again.txt")
    assert "step-00000006 is not usable" in r.stderr and "falling back" in r.stderr
    assert "set step-00000006 aside as step-00000006.unusable" in r.stderr
    again = losses(tmp_path / "again.txt")
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == first[s] for s in again)
    assert (tmp_path / "ckpt" / "step-00000006.unusable" / "COMMITTED").exists()  # kept for inspection


def test_ranks_that_share_the_checksum_reading_fall_back_together_when_one_finds_a_changed_byte(tmp_path):
    # Each rank reads every world-th file; only the rank holding __1_0 finds it changed. Had the
    # other gone on to load, the two would have stood in different collectives.
    cfg = write_config(tmp_path, nproc=2, data=2, steps=6, interval=3)
    run(cfg, 2, tmp_path / "first.txt")
    first = losses(tmp_path / "first.txt")
    _corrupt(tmp_path / "ckpt" / "step-00000006" / "__1_0.distcp", "one byte changed")
    # Initial weights from that run's folder too: rank 1 reads __1_0 (rank 0 does not), and rank 0
    # says why both take step 3.
    (tmp_path / "init").mkdir()
    r = run(write_config(tmp_path / "init", nproc=2, data=2, steps=1, interval=100,
                         extra={"model": {"preset": "tiny", "initFrom": str(tmp_path / "ckpt")}}), 2, tmp_path / "init" / "losses.txt")
    assert "skipping checkpoint" in r.stderr and "__1_0.distcp does not match its checksum" in r.stderr
    assert f"initial weights from {tmp_path / 'ckpt' / 'step-00000003'}" in r.stderr
    r = run(cfg, 2, tmp_path / "again.txt")
    assert "__1_0.distcp does not match its checksum" in r.stderr
    assert "step-00000006 is not usable" in r.stderr and "resumed from" in r.stderr and "step-00000003" in r.stderr
    again = losses(tmp_path / "again.txt")
    assert sorted(again) == [4, 5, 6] and all(again[s] == first[s] for s in again)


def test_a_run_started_from_initial_weights_resumes_from_its_own_checkpoints_without_reading_them_again(tmp_path):
    # model.initFrom was loaded at every start, before the resume: with its source gone since (a
    # base run's folder pruned, deleted, a newest step failing verification) a fine-tune that
    # had checkpoints of its own exited 85 for good; and each resume read the whole base again.
    base = tmp_path / "base"
    base.mkdir()
    run(write_config(base, steps=2, interval=2), 1, base / "losses.txt")
    init = {"model": {"preset": "tiny", "initFrom": str(base / "ckpt")}}
    straight, ft = tmp_path / "straight", tmp_path / "ft"
    for d in (straight, ft):
        d.mkdir()
    run(write_config(straight, steps=4, interval=2, extra=init), 1, straight / "losses.txt")
    run(write_config(ft, steps=2, interval=2, extra=init), 1, ft / "losses.txt")
    shutil.rmtree(base / "ckpt")
    r = run(write_config(ft, steps=4, interval=2, extra=init), 1, ft / "losses.txt")
    assert f"model.initFrom {base / 'ckpt'} not read: the run resumes from its own checkpoints" in r.stderr
    assert "resumed from" in r.stderr and losses(ft / "losses.txt") == losses(straight / "losses.txt")


def test_eval_of_a_checkpoint_with_a_changed_byte_is_a_clear_error_naming_the_file(tmp_path):
    cfg = write_config(tmp_path, steps=3, interval=3)
    run(cfg, 1, tmp_path / "losses.txt")
    step = tmp_path / "ckpt" / "step-00000003"
    _corrupt(step / "__0_0.distcp", "one byte changed")
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(cfg), "--checkpoint", str(step)],
                       capture_output=True, text=True, env=env())
    assert r.returncode == c.EXIT_PERMANENT, r.stderr[-2000:]
    assert "__0_0.distcp does not match its checksum" in r.stderr


def test_initial_weights_and_eval_from_a_checkpoint_root_skip_a_newest_step_with_a_changed_byte(tmp_path):
    # A folder of checkpoints (a run's checkpoint.path) as model.initFrom, or eval without
    # --checkpoint: the newest step's changed byte is said and the previous step is read, as a
    # resume would (before: exit 85 naming the file). An explicit step folder is still refused.
    src = tmp_path / "src"
    src.mkdir()
    cfg = write_config(src, steps=6, interval=3)
    run(cfg, 1, src / "losses.txt")
    _corrupt(src / "ckpt" / "step-00000006" / "__0_0.distcp", "one byte changed")

    def evaluate(*checkpoint):
        r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(cfg), *checkpoint],
                           capture_output=True, text=True, env=env(), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    r = evaluate()
    assert "skipping checkpoint" in r.stderr and "__0_0.distcp does not match its checksum" in r.stderr
    assert r.stdout.startswith("eval step-00000003: held-out loss ")
    assert r.stdout == evaluate("--checkpoint", str(src / "ckpt" / "step-00000003")).stdout

    d = tmp_path / "run"
    d.mkdir()
    r = run(write_config(d, steps=1, interval=100, extra={"model": {"preset": "tiny", "initFrom": str(src / "ckpt")}}),
            1, d / "losses.txt")
    assert "skipping checkpoint" in r.stderr and f"initial weights from {src / 'ckpt' / 'step-00000003'}" in r.stderr
    (tmp_path / "explicit").mkdir()
    explicit = write_config(tmp_path / "explicit", steps=1, interval=100,
                            extra={"model": {"preset": "tiny", "initFrom": str(src / "ckpt" / "step-00000006")}})
    r = subprocess.run(cmd(explicit, 1, tmp_path / "explicit" / "losses.txt"), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == c.EXIT_PERMANENT and "__0_0.distcp does not match its checksum" in r.stderr, r.stderr[-2000:]


def test_saves_after_a_fallback_are_kept_in_place_of_the_unusable_newer_checkpoint(tmp_path):
    # The unusable step 30 once stayed the newest committed folder: with keep 1, every save made
    # after falling back to step 27 was pruned at once, and the next start found only step 30.
    run(write_config(tmp_path, steps=30, interval=3), 1, tmp_path / "first.txt")
    _corrupt(next((tmp_path / "ckpt" / "step-00000030").glob("*.distcp")), "overwritten")
    cfg = write_config(tmp_path, steps=200, interval=1, keep=1)
    p = subprocess.Popen(cmd(cfg, 1, tmp_path / "again.txt"), env=env(), stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "again.txt", 31, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == c.EXIT_PREEMPTED, p.stderr.read()[-3000:]
    last = max(losses(tmp_path / "again.txt"))
    assert min(losses(tmp_path / "again.txt")) == 28 and last >= 31
    assert set(_committed(tmp_path)) == {f"step-{last:08d}", "step-00000030.unusable"}
    assert (tmp_path / "ckpt" / "latest").read_text() == f"step-{last:08d}"


# Injected into the trainer by a sitecustomize: setting a checkpoint aside is refused (as a
# read-only folder or a file system without renames would).
REFUSE_SET_ASIDE = (
    "import os\n"
    "_replace = os.replace\n"
    "def replace(src, dst, *a, **k):\n"
    "    if str(dst).endswith('.unusable'):\n"
    "        raise PermissionError(13, 'injected: Permission denied', str(dst))\n"
    "    return _replace(src, dst, *a, **k)\n"
    "os.replace = replace\n"
)


REFUSE_LATEST = REFUSE_SET_ASIDE.replace("str(dst).endswith('.unusable')", "str(dst).endswith('/latest')")


def test_a_latest_that_cannot_be_rewritten_after_a_fallback_does_not_stop_the_resume(tmp_path):
    # Rank 0 rewrites it alone, past the load's collectives: raised there, it ended rank 0 while
    # the other ranks went on into training (a hang until the collective timeout), at every attempt.
    run(write_config(tmp_path, steps=6, interval=3), 1, tmp_path / "first.txt")
    _corrupt(next((tmp_path / "ckpt" / "step-00000006").glob("*.distcp")), "overwritten")
    r = subprocess.run(cmd(write_config(tmp_path, steps=3, interval=1), 1, tmp_path / "again.txt"),
                       env=injected(tmp_path, REFUSE_LATEST), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "could not point latest at step-00000003" in r.stderr and "nothing to train" in r.stderr


@pytest.mark.parametrize("rename", ["allowed", "refused"])
def test_after_a_fallback_latest_names_the_checkpoint_resumed_from_and_saves_are_kept_even_if_setting_aside_fails(tmp_path, rename):
    # Before: `latest` named the skipped step until the next commit, and a skipped step that could
    # not be renamed stayed the newest committed one, so pruning (keep 1) deleted each new save.
    run(write_config(tmp_path, steps=6, interval=3), 1, tmp_path / "first.txt")
    _corrupt(next((tmp_path / "ckpt" / "step-00000006").glob("*.distcp")), "overwritten")
    e = injected(tmp_path, REFUSE_SET_ASIDE) if rename == "refused" else env()

    def again(steps: int, out: str, skips: bool) -> str:
        r = subprocess.run(cmd(write_config(tmp_path, steps=steps, interval=1, keep=1), 1, tmp_path / out),
                           env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("step-00000006 is not usable" in r.stderr) == skips and "resumed from" in r.stderr
        return r.stderr

    said = again(3, "nothing.txt", skips=True)  # resumes at step 3: nothing to train, nothing saved
    assert "nothing to train" in said
    assert ("could not set" in said) == (rename == "refused")
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-00000003"
    again(5, "more.txt", skips=rename == "refused")  # skipped again where it is still there
    assert sorted(losses(tmp_path / "more.txt")) == [4, 5]
    bad = "step-00000006" if rename == "refused" else "step-00000006.unusable"
    assert set(_committed(tmp_path)) == {"step-00000005", bad}
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-00000005"


# Injected into the trainer by a sitecustomize (as an NFS read that fails): a DCP load that
# writes part of the checkpoint into the live tensors and then fails, or a file that cannot be
# read while its checksum is checked.
INJECT_IO_ERROR = {
    "load": "import torch.distributed.checkpoint as dcp\n"
            "def load(state, **kw):\n"
            "    next(iter(state['model'].values())).detach().fill_(float('nan'))\n"
            "    raise OSError(5, 'injected: Input/output error')\n"
            "dcp.load = load\n",
    "verify": "import pretrain_trainer.checkpoint as ck\n"
              "def file_crc(f):\n"
              "    raise OSError(5, 'injected: Input/output error', str(f))\n"
              "ck.file_crc = file_crc\n",
}


@pytest.mark.parametrize("where,says", [("load", "verifies but did not load"), ("verify", "could not be read")])
def test_a_checkpoint_that_fails_to_read_or_load_stops_the_run_and_is_kept_for_the_next_attempt(tmp_path, where, says):
    # An I/O error (or a collective's timeout, a torch refusing the format) was taken for a bad
    # checkpoint: step 6 and then step 3 were set aside, and the run started over from step 0 on
    # the weights the failed load had partly overwritten. Now nothing is set aside, nothing is
    # trained, the exit is a crash (the operator retries it), and the next attempt resumes.
    run(write_config(tmp_path, steps=6, interval=3), 1, tmp_path / "first.txt")
    code = INJECT_IO_ERROR[where]
    cfg = write_config(tmp_path, steps=9, interval=3)
    report = tmp_path / "termination-log"
    e = injected(tmp_path, code, {**env(), c.ENV_TERMINATION_MESSAGE: str(report)})
    r = subprocess.run(cmd(cfg, 1, tmp_path / "again.txt"), env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode not in (0, c.EXIT_PREEMPTED, c.EXIT_PERMANENT), r.stderr[-3000:]
    assert f"checkpoint {tmp_path / 'ckpt' / 'step-00000006'} {says} (OSError: [Errno 5] injected" in r.stderr, r.stderr[-3000:]
    assert json.loads(report.read_text())["error"].startswith(f"rank 0: LoadFailed: checkpoint {tmp_path / 'ckpt' / 'step-00000006'}")
    assert "falling back" not in r.stderr and not list((tmp_path / "ckpt").glob("*.unusable"))
    assert _committed(tmp_path) == ["step-00000003", "step-00000006"]
    assert not (tmp_path / "again.txt").exists()  # nothing trained
    r = run(cfg, 1, tmp_path / "again.txt")  # the next attempt, the file system back
    assert f"resumed from {tmp_path / 'ckpt' / 'step-00000006'}" in r.stderr
    assert loss_steps(tmp_path / "again.txt") == [7, 8, 9]


def _gang(cfg: Path, e: dict, losses_out: Path, timeout: float = 150) -> tuple[list[int], list[str]]:
    """Two ranks as two processes (RANK, WORLD_SIZE: no torchrun), each with its own stderr; their
    exit codes and stderr. A rank still running after `timeout` s fails the test (both are killed)."""
    port = free_port()
    procs = [subprocess.Popen(cmd(cfg, 1, losses_out), stderr=subprocess.PIPE, text=True,
                              env={**e, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port}) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    return [p.returncode for p in procs], errs


def test_a_metadata_read_failing_on_one_rank_stops_every_rank_before_the_load_instead_of_hanging(tmp_path):
    # Each rank read DCP's metadata (the check for another model) in the same try as the load: a
    # read failing on rank 1 alone sent it to the verdict's collective while rank 0 stood in the
    # load's, a hang until the collective timeout (10 minutes). The ranks now agree on the check
    # before either loads. The failure is injected into rank 1's reads of DCP's metadata.
    run(write_config(tmp_path, nproc=2, data=2, steps=3, interval=3), 2, tmp_path / "first.txt")
    code = (
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.distributed.checkpoint as dcp\n"
        "    def read_metadata(self, *a, **k):\n"
        "        raise OSError(5, 'injected: Input/output error', '.metadata')\n"
        "    dcp.FileSystemReader.read_metadata = read_metadata\n")
    e = injected(tmp_path, code)
    codes, errs = _gang(write_config(tmp_path, nproc=2, data=2, steps=6, interval=3), e, tmp_path / "again.txt")
    step = tmp_path / "ckpt" / "step-00000003"
    assert all(code not in (0, c.EXIT_PREEMPTED, c.EXIT_PERMANENT) for code in codes), errs[0][-3000:]
    assert f"LoadFailed: checkpoint {step} verifies but did not load (OSError: [Errno 5] injected" in errs[1], errs[1][-3000:]
    assert f"LoadFailed: checkpoint {step} verifies but did not load (rank 1: OSError: [Errno 5] injected" in errs[0], errs[0][-3000:]
    assert _committed(tmp_path) == ["step-00000003"] and not list((tmp_path / "ckpt").glob("*.unusable"))
    assert not (tmp_path / "again.txt").exists()  # nothing trained


def test_committed_checkpoints_of_which_none_verifies_stop_the_run_for_good_and_are_kept(tmp_path):
    # Before: each was set aside in turn and the run started over from step 0 without a word of it
    # but the fallbacks. Retraining the whole run is a person's decision: exit 85, saying how.
    run(write_config(tmp_path, steps=6, interval=3), 1, tmp_path / "first.txt")
    for step in ("step-00000003", "step-00000006"):
        _corrupt(tmp_path / "ckpt" / step / "__0_0.distcp", "truncated")
    r = subprocess.run(cmd(write_config(tmp_path, steps=9, interval=3), 1, tmp_path / "again.txt"), env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == c.EXIT_PERMANENT, r.stderr[-3000:]
    assert f"none of the 2 committed checkpoint(s) under {tmp_path / 'ckpt'} verifies (step-00000006: __0_0.distcp has 100 bytes" in r.stderr
    assert "would start the run over from step 0: to do that, move them out of" in r.stderr
    assert _committed(tmp_path) == ["step-00000003", "step-00000006"] and not list((tmp_path / "ckpt").glob("*.unusable"))
    assert not (tmp_path / "again.txt").exists()  # nothing trained


@pytest.mark.parametrize("steps", [6, 4], ids=["at", "past"])
def test_a_resume_at_or_past_training_steps_says_there_is_nothing_to_train(tmp_path, steps):
    # The run had finished (a pod restarted after it), or training.steps was lowered since: it
    # exited 0 without a word. The final report is the checkpoint's.
    run(write_config(tmp_path, steps=6, interval=3), 1, tmp_path / "first.txt")
    first = losses(tmp_path / "first.txt")
    report = tmp_path / "termination-log"
    r = subprocess.run(cmd(write_config(tmp_path, steps=steps, interval=3), 1, tmp_path / "again.txt"),
                       env={**env(), c.ENV_TERMINATION_MESSAGE: str(report)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint step 6 is at or past training.steps {steps}: nothing to train" in r.stderr, r.stderr[-3000:]
    assert ("training.steps was lowered" in r.stderr) == (steps < 6) and "training tiny on" not in r.stderr
    assert loss_steps(tmp_path / "again.txt") == [] and _committed(tmp_path) == ["step-00000003", "step-00000006"]
    got = json.loads(report.read_text())
    assert abs(got.pop("loss") - first[6]) < 1e-9
    assert got == {"step": 6, "totalSteps": steps, "tokensSeen": 6 * 4 * 32, "checkpointStep": 6}


def test_a_resume_with_changed_model_settings_says_which_and_trains_on(tmp_path):
    # A rotary base or a router's scoring loads into the same tensors: names and shapes match, and
    # the resume changed the model without a word. Deliberate or not, the log now says so.
    moe = {"experts": 4, "topK": 2}
    run(write_config(tmp_path, steps=3, interval=3, extra={"model": {"preset": "tiny", "moe": moe}}), 1, tmp_path / "first.txt")
    changed = {"model": {"preset": "tiny", "ropeTheta": 20000.0, "moe": {**moe, "routerScore": "sigmoid"}}}
    r = run(write_config(tmp_path, steps=4, interval=3, extra=changed), 1, tmp_path / "again.txt")
    assert ("the model's settings changed since the checkpoint of step 3: model.moe.routerScore softmax -> sigmoid; "
            "model.ropeTheta 10000.0 -> 20000.0; training goes on with the new ones") in r.stderr, r.stderr[-3000:]
    assert loss_steps(tmp_path / "again.txt") == [4]
    r = run(write_config(tmp_path, steps=5, interval=3, extra=changed), 1, tmp_path / "third.txt")
    assert "settings changed" not in r.stderr  # step 4's checkpoint recorded the new ones


def test_a_pipeline_parallel_run_resumes_in_its_own_layout_bit_for_bit(tmp_path):
    # Each stage's optimizer hyperparameters must come back to the rank holding that stage (the
    # trainer failed here with KeyError 'betas' once: only rank 0's param_groups were saved).
    full = tmp_path / "full"
    full.mkdir()
    # 30 steps: with 6, a fast machine finished the run before the signal took effect.
    run(write_config(full, nproc=2, pipeline=2, steps=30, interval=100), 2, full / "losses.txt")
    d = tmp_path / "part"
    d.mkdir()
    cfg = write_config(d, nproc=2, pipeline=2, steps=30, interval=100)
    k = _preempted(d, cfg, 2, 3)
    assert 3 <= k < 30
    _resumed(run(cfg, 2, d / "losses.txt"), d, k, 30)
    assert losses(d / "losses.txt") == losses(full / "losses.txt")


def test_a_checkpoint_loads_into_another_layout(tmp_path):
    # 30 steps: with 6, the run could end before its signal took effect, and nothing was resharded.
    want = single_process_losses(tmp_path / "ref", steps=30, interval=100)
    d = tmp_path / "reshard"
    d.mkdir()
    cfg = write_config(d, nproc=2, pipeline=2, steps=30, interval=3)  # saved by two pipeline stages
    k = _preempted(d, cfg, 2, 4)
    assert 4 <= k < 30
    # Resume the pipeline-parallel checkpoint under tensor parallelism.
    r = run(write_config(d, nproc=2, tensor=2, steps=30, interval=3), 2, d / "losses.txt")
    _resumed(r, d, k, 30)
    assert "per-rank RNG re-derived" not in r.stderr  # same world size: the RNG carried over
    got = losses(d / "losses.txt")
    for s in range(1, 31):
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])


def test_a_3d_checkpoint_of_8_ranks_resumes_on_4_data_parallel_ranks_and_says_the_rng_is_re_derived(tmp_path):
    # The example: pipeline 2 x data 2 x tensor 2 on 8 ranks, resumed as data parallel 4 on
    # 4 ranks. Per-rank RNG cannot carry over to another world size: re-derived, and the log says so.
    batch = {"micro": 1, "global_batch": 8}
    want = single_process_losses(tmp_path / "ref", steps=6, interval=100, **batch)
    d = tmp_path / "reshard"
    d.mkdir()
    run(write_config(d, nproc=8, data=2, tensor=2, pipeline=2, steps=6, interval=3, **batch), 8, d / "losses.txt")
    shutil.rmtree(d / "ckpt" / "step-00000006")  # resume from step 3
    r = run(write_config(d, nproc=4, data=4, steps=6, interval=3, **batch), 4, d / "losses.txt")
    assert "resumed from" in r.stderr and "step-00000003" in r.stderr
    assert "resuming step 3 saved by 8 ranks on 4: per-rank RNG re-derived from the seed" in r.stderr
    got = losses(d / "losses.txt")
    assert sorted(got) == list(range(1, 7))
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])


def test_a_checkpoint_request_in_the_annotations_file_saves_without_stopping(tmp_path):
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "annotations").write_text('other="x"\n')
    cfg = write_config(tmp_path, steps=40, interval=1000)
    p = subprocess.Popen(cmd(cfg, 1, tmp_path / "losses.txt"), env=env(podinfo), stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "losses.txt", 2, p)
    (podinfo / "annotations").write_text(f'{c.ANN_CHECKPOINT_REQUEST}="notice-1"\nother="x"\n')
    assert p.wait(120) == 0, p.stderr.read()[-2000:]
    saved = _committed(tmp_path)
    assert saved[-1] == "step-00000040" and len(saved) == 2, saved  # the requested one, and the final one
    assert 2 < int(saved[0].split("-")[1]) < 40


def test_a_checkpoint_request_already_there_at_the_start_is_served_after_the_first_step(tmp_path):
    # A termination notice that came while the trainer started (a large checkpoint loading) was
    # taken for an earlier attempt's and never served: a reclaim then lost every step since.
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "annotations").write_text(f'{c.ANN_CHECKPOINT_REQUEST}="notice-1-2026"\nother="x"\n')
    cfg = write_config(tmp_path, steps=6, interval=1000)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "losses.txt"), env=env(podinfo), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _committed(tmp_path) == ["step-00000001", "step-00000006"]  # the request's, once; the last step's
    assert r.stderr.count("checkpoint requested by the operator") == 1


def test_a_checkpoint_request_reaching_each_pods_annotations_at_its_own_time_saves_once(tmp_path):
    # Two pods (torchrun nodes) each see the annotation through their own downward-API file, which
    # the kubelet updates at its own time: the second pod's copy once made a second save.
    cfg = write_config(tmp_path, nproc=2, data=2, steps=300, interval=1000)
    podinfo = [tmp_path / f"podinfo-{i}" for i in range(2)]
    procs, port = [], free_port()  # the two nodes' rendezvous
    for i, d in enumerate(podinfo):
        d.mkdir()
        (d / "annotations").write_text('other="x"\n')
        procs.append(subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
             "--master_port", port, "-m", "pretrain_trainer", "train", "--config", str(cfg),
             "--losses-out", str(tmp_path / "losses.txt")], env=env(d), stderr=subprocess.PIPE, text=True))
    wait_for_step(tmp_path / "losses.txt", 3, procs[0])
    (podinfo[0] / "annotations").write_text(f'{c.ANN_CHECKPOINT_REQUEST}="notice-1"\nother="x"\n')
    wait_for(lambda: _committed(tmp_path), timeout=60)
    at = max(losses(tmp_path / "losses.txt"))
    (podinfo[1] / "annotations").write_text(f'{c.ANN_CHECKPOINT_REQUEST}="notice-1"\nother="x"\n')
    wait_for_step(tmp_path / "losses.txt", at + 5, procs[0])
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:]
    saved = _committed(tmp_path)
    assert len(saved) == 2 and saved[-1] == "step-00000300", saved  # the requested one, and the final one
    assert errs[0].count("checkpoint requested by the operator") == 1


SIGTERM_AT_LAST_STEP = ("import os, signal\n"
                        "import pretrain_trainer.train as t\n"
                        "lr_at = t.lr_at\n"
                        "def at(step, o, total):\n"
                        "    if step == total:\n"
                        "        os.kill(os.getpid(), signal.SIGTERM)\n"
                        "    return lr_at(step, o, total)\n"
                        "t.lr_at = at\n")
SIGTERM_BEFORE_THE_FIRST_STEP = ("import os, signal\n"
                                 "import pretrain_trainer.train as t\n"
                                 "init = t.Stop.__init__\n"
                                 "def answered(self):\n"
                                 "    init(self)\n"
                                 "    os.kill(os.getpid(), signal.SIGTERM)\n"
                                 "t.Stop.__init__ = answered\n")


def test_a_sigterm_during_the_last_step_saves_it_and_exits_0(tmp_path):
    # A spot reclaim or a suspend while the last step trains: that step is saved (as on any
    # SIGTERM) and training is over. It exited 83: the operator counted a preemption (failing a
    # finished job whose maxPreemptions was spent) and made a whole gang to log "nothing to train".
    cfg = write_config(tmp_path, steps=4, interval=100)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "losses.txt"), env=injected(tmp_path, SIGTERM_AT_LAST_STEP),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stop requested (SIGTERM) during the last step: its checkpoint saved, training finished" in r.stderr
    assert _committed(tmp_path) == ["step-00000004"] and loss_steps(tmp_path / "losses.txt") == [1, 2, 3, 4]
    # The same SIGTERM before the first step of an attempt that resumes at the last: nothing to stop.
    (tmp_path / "inject" / "sitecustomize.py").write_text(SIGTERM_BEFORE_THE_FIRST_STEP)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "again.txt"), env=injected(tmp_path, SIGTERM_BEFORE_THE_FIRST_STEP),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "exiting 83" not in r.stderr, r.stderr[-3000:]
    assert f"resumed from {tmp_path / 'ckpt' / 'step-00000004'}" in r.stderr and not (tmp_path / "again.txt").read_text()
    # Not at the last step: the same injected SIGTERM stops a resumed attempt before its first step (83).
    r = subprocess.run(cmd(write_config(tmp_path, steps=6, interval=100), 1, tmp_path / "again.txt"),
                       env=injected(tmp_path, SIGTERM_BEFORE_THE_FIRST_STEP), capture_output=True, text=True, timeout=120)
    assert r.returncode == c.EXIT_PREEMPTED and "stop requested (SIGTERM) before step 5" in r.stderr, r.stderr[-3000:]
    # With a validation due at the last step, which a SIGTERM drops (the save first): 83, and the
    # next attempt validates that step before anything else (trainer.md), then exits 0.
    v = tmp_path / "validated"
    v.mkdir()
    cfg = write_config(v, steps=4, interval=100, extra={"validation": {"everySteps": 100, "batches": 1}})
    r = subprocess.run(cmd(cfg, 1, v / "losses.txt"), env=injected(v, SIGTERM_AT_LAST_STEP), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == c.EXIT_PREEMPTED and "checkpoint of step 4 saved; exiting 83" in r.stderr, r.stderr[-3000:]
    r = run(cfg, 1, v / "again.txt")
    assert "step 4 validation loss" in r.stderr, r.stderr[-3000:]


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path):
    cfg = write_config(tmp_path, nproc=2, data=2, steps=200, interval=1000)
    p = subprocess.Popen(cmd(cfg, 2, tmp_path / "losses.txt", launch=True), stderr=subprocess.PIPE, text=True,
                         env={**env(), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port()})
    wait_for_step(tmp_path / "losses.txt", 3, p)
    # The ranks are the launcher's children (forked from it); only one gets the signal, as when
    # one container's process is signalled.
    workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    victim = max(int(w) for w in workers)
    os.kill(victim, signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == c.EXIT_PREEMPTED, err[-3000:]
    saved = _committed(tmp_path)
    assert len(saved) == 1
    step = int(saved[0].split("-")[1])
    for rank in (0, 1):  # each rank's own exit, not only the launcher's verdict
        assert f"[rank {rank}] stop requested (SIGTERM): checkpoint of step {step} saved; exiting 83" in err, err[-3000:]
    assert max(losses(tmp_path / "losses.txt")) == step  # nobody trained past the saved step


def test_sigterm_to_the_launcher_as_a_pods_first_process_saves_and_exits_83(tmp_path):
    # The kubelet signals the container's first process, the launcher: torchrun's agent forwards
    # it to the ranks, which save and exit 83; the launcher exited 1 with a traceback (a failure
    # spent from the budget), and its agent killed the ranks after 30 s whatever the grace period.
    cfg = write_config(tmp_path, nproc=2, data=2, steps=200, interval=1000)
    p = subprocess.Popen(cmd(cfg, 2, tmp_path / "losses.txt", launch=True), stderr=subprocess.PIPE, text=True,
                         env={**env(), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port(), "PET_SHUTDOWN_TIMEOUT": "60"})
    wait_for_step(tmp_path / "losses.txt", 3, p)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == c.EXIT_PREEMPTED, err[-3000:]
    assert "launcher: SIGTERM; the ranks exited [83]: exiting 83" in err
    saved = _committed(tmp_path)
    assert len(saved) == 1 and max(losses(tmp_path / "losses.txt")) == int(saved[0].split("-")[1])


def test_an_async_save_commits_and_resumes_like_a_sync_one(tmp_path):
    want = single_process_losses(tmp_path / "sync", steps=9, interval=3)
    d = tmp_path / "async"
    d.mkdir()
    cfg = write_config(d, steps=9, interval=3, extra={"checkpoint": {"path": str(d / "ckpt"), "intervalSteps": 3, "async": True}})
    r = run(cfg, 1, d / "losses.txt")
    assert _committed(d) == ["step-00000003", "step-00000006", "step-00000009"]
    assert losses(d / "losses.txt") == want
    assert "async checkpointing failed" not in r.stderr and "checkpoint background process" in r.stderr.lower()
    # Neither the writer process (step 3) nor the trainer (step 9) spent time on zip CRC32s, which
    # torch.load never checks (checkpoint.Writer).
    assert _record_crcs(d / "ckpt" / "step-00000003") == _record_crcs(d / "ckpt" / "step-00000009") == {0}
    # What each file's writer computed as the bytes went out (the writer process's at step 3, the
    # trainer's at step 9) is the CRC32 of the file as read back, for every file in the marker.
    for step in (3, 9):
        marker = json.loads((d / "ckpt" / f"step-{step:08d}" / "COMMITTED").read_text())
        assert {r for r in marker["crc32"] if r.endswith(".distcp")} == {"__0_0.distcp", "__0_1.distcp"}
        assert marker["crc32"] == {r: zlib.crc32((d / "ckpt" / f"step-{step:08d}" / r).read_bytes()) for r in marker["crc32"]}
    # Steps 3 and 6 were async saves (staged in the background while the next step ran; the last
    # step's is synchronous). Step 6's reused step 3's state dict, views of the same tensors, which
    # the optimizer updated in place since. Resumed from each, the steps after come out the same:
    # each holds its own step's state.
    for step in (6, 3):
        for later in range(step + 3, 10, 3):
            shutil.rmtree(d / "ckpt" / f"step-{later:08d}")
        r = run(cfg, 1, d / f"from-{step}.txt")
        assert "resumed from" in r.stderr and f"step-{step:08d}" in r.stderr
        assert losses(d / f"from-{step}.txt") == {s: v for s, v in want.items() if s > step}


def _two_ranks_saving_async(tmp_path, code: str) -> subprocess.CompletedProcess:
    """9 steps on 2 data-parallel ranks, an async save every 3, with `code` injected (a sitecustomize)."""
    cfg = write_config(tmp_path, nproc=2, data=2, steps=9, interval=3,
                       extra={"checkpoint": {"path": str(tmp_path / "ckpt"), "intervalSteps": 3, "async": True}})
    return subprocess.run(cmd(cfg, 2, tmp_path / "losses.txt"), env=injected(tmp_path, code), capture_output=True,
                          text=True, timeout=180)


def test_an_async_save_that_fails_on_one_rank_only_stops_every_rank_instead_of_hanging(tmp_path):
    # The failing rank went on to save synchronously alone, in other collectives than its peers,
    # whose saves were with their writers: the gang hung until its pods were killed. The fault is
    # injected into DCP on rank 1 (a writer process killed, say), by a sitecustomize: the rank is
    # asked at the call (the launcher's ranks are forked after the sitecustomize ran, without RANK).
    code = (
        "import torch.distributed as dist\n"
        "import torch.distributed.checkpoint as dcp\n"
        "_async_save = dcp.async_save\n"
        "def async_save(*a, **k):\n"
        "    if dist.get_rank() == 1:\n"
        "        raise OSError('injected: the writer process is gone')\n"
        "    return _async_save(*a, **k)\n"
        "dcp.async_save = async_save\n")
    r = _two_ranks_saving_async(tmp_path, code)
    assert r.returncode != 0
    # The failing rank's cause, said before the agreement (its error may be cut short by its peer's).
    assert "the async checkpoint of step 3 failed on this rank (OSError: injected" in r.stderr, r.stderr[-3000:]
    assert "the async checkpoint of step 3 failed on some ranks only (" in r.stderr, r.stderr[-3000:]
    assert not _committed(tmp_path)


@pytest.mark.parametrize("where", ["every rank", "rank 1"])
def test_an_async_copy_that_fails_goes_on_saving_synchronously_or_stops_every_rank_if_on_some_only(tmp_path, where):
    # The stager's background copy of the state failing (torch 2.11's could not copy this state; a
    # GPU's pinned memory refused) raised in the training loop: every attempt crashed at its first
    # save, spending the failure budget. Injected by a sitecustomize into the stager the trainer uses:
    # its copy fails in the background, as a real one does (DCP reports a copy that had already
    # failed when async_save returned as a success: its failure comes with the writes').
    code = (
        "import threading\n"
        "from concurrent.futures import Future\n"
        "import torch.distributed as dist\n"
        "from torch.distributed.checkpoint.staging import DefaultStager\n"
        "_stage = DefaultStager.stage\n"
        "def stage(self, *a, **k):\n"
        f"    if {where == 'every rank'} or dist.get_rank() == 1:\n"
        "        f = Future()\n"
        "        threading.Timer(0.2, f.set_exception, [KeyError(\"injected: <class 'type'>\")]).start()\n"
        "        return f\n"
        "    return _stage(self, *a, **k)\n"
        "DefaultStager.stage = stage\n")
    r = _two_ranks_saving_async(tmp_path, code)
    assert "the async checkpoint of step 3 failed on this rank while staging (KeyError: " in r.stderr, r.stderr[-3000:]
    if where == "rank 1":
        assert r.returncode != 0
        assert "the async checkpoint of step 3 failed on some ranks only (" in r.stderr, r.stderr[-3000:]
        assert not _committed(tmp_path)
        return
    assert r.returncode == 0, r.stderr[-3000:]
    assert "async checkpointing failed (KeyError: " in r.stderr and "saving synchronously from now on" in r.stderr
    assert _committed(tmp_path) == ["step-00000006", "step-00000009"]
    assert loss_steps(tmp_path / "losses.txt") == list(range(1, 10))


def test_async_saves_go_on_with_a_torch_whose_stager_closes_itself_after_each_staging(tmp_path):
    # torch 2.11's DefaultStager closed its inner copier after every staging (pytorch#183413): the
    # trainer's one stager, reused, failed at the second save (KeyError <class 'type'>) and the run
    # saved synchronously from then on. That torch's behaviour is injected by a sitecustomize.
    code = (
        "from torch.distributed.checkpoint.staging import DefaultStager\n"
        "_stage = DefaultStager._stage\n"
        "def stage_then_close(self, *a, **k):\n"
        "    try:\n"
        "        return _stage(self, *a, **k)\n"
        "    finally:\n"
        "        self._state_dict_stager.close()\n"
        "DefaultStager._stage = stage_then_close\n")
    r = _two_ranks_saving_async(tmp_path, code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "failed" not in r.stderr and "synchronously" not in r.stderr, r.stderr[-3000:]
    assert _committed(tmp_path) == ["step-00000003", "step-00000006", "step-00000009"]
    assert loss_steps(tmp_path / "losses.txt") == list(range(1, 10))


def test_a_preemption_after_a_failed_async_write_still_saves_its_step_and_exits_83(tmp_path):
    # The preemption's save first waited for the previous async save, whose failure it raised: the
    # emergency checkpoint was never tried, and the exit was a crash (1), not 83. Injected, by a
    # sitecustomize: step 3's files cannot be written (in the async writer process), and a SIGTERM
    # comes as soon as that save is handed over, so step 4's save is the preemption's.
    code = (
        "import contextlib, os, signal\n"
        "import pretrain_trainer.checkpoint as ck\n"
        "create_stream = ck._ChecksumFileSystem.create_stream\n"
        "@contextlib.contextmanager\n"
        "def failing_for_step_3(self, path, mode):\n"
        "    if 'step-00000003' in str(path) and str(path).endswith('.distcp'):\n"
        "        raise OSError(5, 'injected: Input/output error', str(path))\n"
        "    with create_stream(self, path, mode) as stream:\n"
        "        yield stream\n"
        "ck._ChecksumFileSystem.create_stream = failing_for_step_3\n"
        "save = ck.Checkpointer.save\n"
        "def save_then_sigterm(self, step, *a, **k):\n"
        "    done = save(self, step, *a, **k)\n"
        "    if step == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return done\n"
        "ck.Checkpointer.save = save_then_sigterm\n")
    cfg = write_config(tmp_path, steps=40, interval=3, extra={"checkpoint": {"path": str(tmp_path / "ckpt"), "intervalSteps": 3,
                                                                              "async": True}})
    e = injected(tmp_path, code)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "losses.txt"), env=e, capture_output=True, text=True, timeout=180)
    assert r.returncode == c.EXIT_PREEMPTED, r.stderr[-3000:]
    assert "the async checkpoint of step 3 failed (rank 0: OSError: [Errno 5] injected" in r.stderr, r.stderr[-3000:]
    assert "; saving step 4 synchronously anyway" in r.stderr
    assert "stop requested (SIGTERM): checkpoint of step 4 saved; exiting 83" in r.stderr
    assert _committed(tmp_path) == ["step-00000004"]
    r = run(write_config(tmp_path, steps=5, interval=3), 1, tmp_path / "losses.txt")  # and it resumes
    assert f"resumed from {tmp_path / 'ckpt' / 'step-00000004'}" in r.stderr
    assert loss_steps(tmp_path / "losses.txt") == [1, 2, 3, 4, 5]


def test_closing_with_a_failed_async_save_pending_logs_it_instead_of_raising(tmp_path, caplog):
    # close() comes as the run ends with a code of its own (83 for a fenced-off attempt, 85 for too
    # many skipped steps): a pending async save's failure raised there made it a crash's.
    from concurrent.futures import Future

    from pretrain_trainer.checkpoint import Checkpointer
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1, rank=0, world=1, async_save=True)
    written: Future = Future()
    written.set_exception(OSError(5, "injected: Input/output error"))
    ckpt.pending = (written, 3, None)
    with caplog.at_level("ERROR", logger="pretrain_trainer.checkpoint"):
        ckpt.close()
    assert ("the async checkpoint of step 3 failed (OSError: [Errno 5] injected: Input/output error); nothing more is saved"
            in caplog.text)
    assert ckpt.pending is None


def test_an_async_save_is_committed_once_written_so_a_hard_kill_before_the_next_save_keeps_it(tmp_path):
    # Two ranks, async saves, no save due for thousands of steps: the operator's checkpoint request
    # (as on a termination notice) starts one. It is committed while training goes on, not at the
    # next save: a node lost without a signal (SIGKILL to every process) still resumes from it.
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "annotations").write_text("")
    cfg = write_config(tmp_path, nproc=2, data=2, steps=5000, interval=5000,
                       extra={"checkpoint": {"path": str(tmp_path / "ckpt"), "intervalSteps": 5000, "async": True}})
    p = subprocess.Popen(cmd(cfg, 2, tmp_path / "losses.txt", launch=True), stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**env(podinfo), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port()})
    try:
        wait_for_step(tmp_path / "losses.txt", 2, p)
        # Each rank's writer process is started ahead, not by this first save: the seconds of its
        # start-up (4-5 s on 2 CPUs) would come out of the notice's grace period.
        ranks = [int(w) for w in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()]
        assert len(ranks) == 2, ranks
        wait_for(lambda: all(_writer_process(r) for r in ranks) or None, timeout=60,
                 what="every rank's async writer process, before any save")
        assert not list((tmp_path / "ckpt").glob("step-*")), "no save was due yet"
        (podinfo / "annotations").write_text(f'{c.ANN_CHECKPOINT_REQUEST}="notice-1"\n')
        # Committed: the marker, then `latest` after its fsyncs (on CI's loaded disk, seconds
        # apart: two steps of training came in between, and the kill left no `latest`).
        saved = wait_for(lambda: _pointed(tmp_path), timeout=90, what="the requested checkpoint committed and pointed at")
        step = int(saved[0].split("-")[1])
        wait_for_step(tmp_path / "losses.txt", step + 2, p)  # training went on past it
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    assert _committed(tmp_path) == saved and (tmp_path / "ckpt" / "latest").read_text() == saved[0]
    # Each rank's RNG state, written before its state went to its writer process, is part of the commit.
    marker = json.loads((tmp_path / "ckpt" / saved[0] / "COMMITTED").read_text())
    assert {"rng/rank-0.pt", "rng/rank-1.pt"} <= set(marker["files"])
    for rank in (0, 1):
        rng = torch.load(tmp_path / "ckpt" / saved[0] / "rng" / f"rank-{rank}.pt", weights_only=False)
        assert rng["world"] == 2 and rng["cpu"].dtype == torch.uint8
    run(write_config(tmp_path, nproc=1, steps=step + 1, interval=5000), 1, tmp_path / "resumed.txt")
    assert sorted(losses(tmp_path / "resumed.txt")) == [step + 1]


def test_async_saves_that_do_not_fit_in_dev_shm_are_made_synchronously_and_say_so(tmp_path):
    # A container runtime's /dev/shm is 64 MiB; here a 1 MiB one in a mount namespace of the run's
    # own. Async staging copies each rank's state there: without the check the first async save
    # failed with "unable to allocate shared memory(shm)" and ended the run.
    if os.geteuid() != 0:
        pytest.skip("needs root for a mount namespace with a small /dev/shm (make test runs as root)")
    cfg = write_config(tmp_path, nproc=2, data=2, steps=6, interval=3,
                       extra={"checkpoint": {"path": str(tmp_path / "ckpt"), "intervalSteps": 3, "async": True}})
    small_shm = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"', "sh"]
    r = subprocess.run(small_shm + cmd(cfg, 2, tmp_path / "losses.txt"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "async checkpoint staging needs about" in r.stderr and "raise spec.template.shmSize" in r.stderr
    assert r.stderr.count("saving synchronously from now on") == 2  # both ranks, the same decision
    assert _committed(tmp_path) == ["step-00000003", "step-00000006"]
    assert sorted(losses(tmp_path / "losses.txt")) == list(range(1, 7))


def test_only_the_last_keep_checkpoints_stay_and_a_folder_cut_short_before_them_goes(tmp_path):
    cfg = write_config(tmp_path, steps=6, interval=1, keep=2)
    cut_short = tmp_path / "ckpt" / "step-00000000"  # a save killed before its marker
    cut_short.mkdir(parents=True)
    (cut_short / "__0_0.distcp").write_bytes(b"half")
    run(cfg, 1, tmp_path / "losses.txt")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000005", "step-00000006"]
    assert _committed(tmp_path) == ["step-00000005", "step-00000006"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-00000006"


# Injected into the trainer by a sitecustomize: each fsync (the path of the file or folder synced),
# rename and pruning, in order, into $CKPT_EVENTS.
RECORD_SYNCS = (
    "import os, threading\n"
    "import pretrain_trainer.checkpoint as ck\n"
    "events, lock = open(os.environ['CKPT_EVENTS'], 'a', buffering=1), threading.Lock()\n"
    "def note(*what):\n"
    "    with lock:\n"
    "        events.write(' '.join(map(str, what)) + '\\n')\n"
    "fsync, replace, prune = os.fsync, os.replace, ck.Checkpointer._prune\n"
    "def noted_fsync(fd):\n"
    "    fsync(fd)\n"
    "    note('fsync', os.readlink(f'/proc/self/fd/{fd}'))\n"
    "def noted_replace(src, dst, *a, **k):\n"
    "    replace(src, dst, *a, **k)\n"
    "    note('replace', src, dst)\n"
    "def noted_prune(self, d):\n"
    "    note('prune', d)\n"
    "    prune(self, d)\n"
    "os.fsync, os.replace, ck.Checkpointer._prune = noted_fsync, noted_replace, noted_prune\n")


def test_every_file_a_marker_lists_and_the_folders_are_synced_before_the_marker_and_pruning_after(tmp_path):
    # Only the data files and DCP's metadata were fsynced: after a node's crash the marker could
    # list empty files (extra.json, the RNG, the .crc32 files) or be empty itself, so the checkpoint
    # failed verification, and with keep 1 pruning had already deleted the previous one. A test
    # cannot crash the node: this one checks, from the fsyncs and renames made, the order that
    # makes a crash safe (every file the marker lists, then the folders' entries, then the marker
    # and its rename, then `latest` and the root) and that pruning comes only after it.
    code = RECORD_SYNCS
    events = tmp_path / "events.txt"
    e = injected(tmp_path, code, {**env(), "CKPT_EVENTS": str(events)})
    r = subprocess.run(cmd(write_config(tmp_path, steps=3, interval=1, keep=1), 1, tmp_path / "losses.txt"), env=e,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _committed(tmp_path) == ["step-00000003"]  # steps 1 and 2 pruned (keep 1)
    root = tmp_path / "ckpt"
    listed = json.loads((root / "step-00000003" / "COMMITTED").read_text())["files"]  # the same names at every step
    assert {"extra.json", "rng/rank-0.pt", ".metadata", "__0_0.distcp", "__0_0.distcp.crc32"} <= set(listed)
    seen = [line.split(" ") for line in events.read_text().splitlines()]

    def at(*event, after: int = -1) -> int:
        return next(i for i, x in enumerate(seen) if i > after and x == list(event))

    for step in (1, 2, 3):
        d = root / f"step-{step:08d}"
        marked = at("replace", f"{d}/COMMITTED.tmp", f"{d}/COMMITTED")
        files = [i for i, x in enumerate(seen[:marked]) if x[0] == "fsync" and x[1].removesuffix(".tmp") in
                 {f"{d}/{rel}" for rel in listed}]  # DCP syncs its .metadata.tmp before renaming it
        assert {seen[i][1].removesuffix(".tmp") for i in files} == {f"{d}/{rel}" for rel in listed}, step
        assert max(files) < at("fsync", f"{d}/rng") < marked and max(files) < at("fsync", str(d)) < marked
        assert at("fsync", f"{d}/COMMITTED.tmp") < marked
        folder = at("fsync", str(d), after=marked)  # the marker's rename
        latest = at("replace", f"{root}/latest.tmp", f"{root}/latest", after=folder)
        assert folder < at("fsync", f"{root}/latest.tmp", after=folder) < latest
        assert latest < at("fsync", str(root), after=latest) < at("prune", str(d), after=marked), step


def test_eval_gives_the_same_held_out_loss_for_checkpoints_of_different_layouts(tmp_path):
    out = {}
    for name, kw in (("dp", {"nproc": 2, "data": 2}), ("pp", {"nproc": 2, "pipeline": 2})):
        d = tmp_path / name
        d.mkdir()
        cfg = write_config(d, steps=6, interval=3, **kw)
        run(cfg, 2, d / "losses.txt")
        for step in (3, 6):
            r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "eval", "--config", str(cfg), "--checkpoint",
                                str(d / "ckpt" / f"step-{step:08d}")], capture_output=True, text=True, env=env())
            assert r.returncode == 0, r.stderr[-2000:]
            out[(name, step)] = float(r.stdout.split("held-out loss")[1].split()[0])
    assert abs(out[("dp", 6)] - out[("pp", 6)]) <= 1e-5
    assert out[("dp", 6)] < out[("dp", 3)]  # the later checkpoint is better on data it never saw


def _two_ranks(tmp_path: Path, folders: list[Path]) -> tuple[list[int], list[str]]:
    """Two ranks of a data-parallel 2 job as two "nodes", each with its own checkpoint folder; their
    exit codes and stderr."""
    cfg = write_config(tmp_path, nproc=2, data=2, steps=4)
    port = free_port()
    procs = []
    for rank, folder in enumerate(folders):
        e = {**env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port, c.ENV_CHECKPOINT_DIR: str(folder)}
        procs.append(subprocess.Popen([*cmd(cfg, 1, tmp_path / "losses.txt")], env=e, stderr=subprocess.PIPE, text=True))
    return [p.wait(120) for p in procs], [p.stderr.read() for p in procs]


def test_a_checkpoint_folder_not_shared_by_every_rank_is_a_clear_error_at_the_start(tmp_path):
    # Two "nodes", each with its own folder at the checkpoint path (an emptyDir per pod).
    codes, errs = _two_ranks(tmp_path, [tmp_path / "node0", tmp_path / "node1"])
    err = errs[1]
    assert codes == [c.EXIT_PERMANENT, c.EXIT_PERMANENT], err[-2000:]
    assert "is not shared by every rank" in err and "checkpoint.claimName" in err
    assert not (tmp_path / "losses.txt").exists()  # nothing trained


def test_a_checkpoint_folder_one_rank_cannot_write_stops_every_rank_at_the_start_naming_the_fields(tmp_path):
    # Rank 0's checkpoint path lies under a regular file (as a volume that is not there, or not
    # writable for the pod's user): exit 85 on both ranks, before training (before: a crash, exit 1,
    # retried by the operator up to maxFailures).
    (tmp_path / "a-file").write_text("")
    codes, errs = _two_ranks(tmp_path, [tmp_path / "a-file" / "ckpt", tmp_path / "ckpt"])
    assert codes == [c.EXIT_PERMANENT, c.EXIT_PERMANENT], errs[0][-2000:]
    assert "a-file/ckpt is not writable (NotADirectoryError" in errs[0] and "checkpoint.claimName" in errs[0]
    assert "the checkpoint folder is not writable on another rank" in errs[1]
    assert not (tmp_path / "losses.txt").exists()  # nothing trained


@pytest.mark.parametrize("change,says", [
    ({"layers": 2}, "it holds 18 tensor(s) this model lacks (layers.2."),
    ({"dim": 128}, "layers.0.attention.wk.weight is [32, 64] there, [64, 128] here"),
])
def test_a_checkpoint_of_another_model_is_a_permanent_error_naming_the_difference_and_is_kept(tmp_path, change, says):
    # The model changed (while suspended, say) under the same checkpoint.path. Before: fewer layers
    # resumed silently from part of the checkpoint (exit 0); another width crashed in DCP's load
    # planner (exit 1, which the operator retries up to maxFailures).
    run(write_config(tmp_path, steps=3, interval=3), 1, tmp_path / "losses.txt")
    cfg = write_config(tmp_path, steps=6, interval=1, extra={"model": change})
    r = subprocess.run(cmd(cfg, 1, tmp_path / "again.txt"), env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == c.EXIT_PERMANENT, r.stderr[-2000:]
    assert "step-00000003 holds another model than this config's model (" in r.stderr and says in r.stderr
    assert not (tmp_path / "again.txt").exists()  # nothing trained
    assert _committed(tmp_path) == ["step-00000003"]


def test_initial_weights_from_a_checkpoint_of_another_model_are_a_permanent_error_naming_the_field(tmp_path):
    # model.initFrom at a 4-layer checkpoint, for a 2-layer model in two pipeline stages of one
    # layer each: every stage's tensors are in the checkpoint, so only the whole model shows that it
    # holds more (before: each stage loaded its part and the run trained on, exit 0).
    src = tmp_path / "src"
    src.mkdir()
    run(write_config(src, steps=1, interval=1), 1, src / "losses.txt")
    d = tmp_path / "run"
    d.mkdir()
    cfg = write_config(d, nproc=2, pipeline=2, steps=2, extra={"model": {"layers": 2, "initFrom": str(src / "ckpt")}})
    r = subprocess.run(cmd(cfg, 2, d / "losses.txt", launch=True), capture_output=True, text=True, timeout=120,
                       env={**env(), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port()})
    assert r.returncode == c.EXIT_PERMANENT and "cannot load the initial weights (model.initFrom)" in r.stderr, r.stderr[-2000:]
    assert "holds another model than this config's model (it holds 18 tensor(s) this model lacks (layers.2." in r.stderr
    assert not (d / "losses.txt").exists()


def test_a_save_missing_a_file_it_wrote_at_its_commit_is_not_committed_and_the_previous_one_resumes(tmp_path):
    # The marker listed whatever the folder held: a shard gone before the commit (a stale
    # attempt's clean-up, a network file system's cached listing) made a checkpoint that verified
    # and never loaded (LoadFailed at every attempt), while step 2 before it was good.
    code = (
        "import pretrain_trainer.checkpoint as ck\n"
        "mark = ck.Checkpointer._mark\n"
        "def shard_gone_then_mark(self, step, *a, **k):\n"
        "    if step == 4:\n"
        "        (ck.step_dir(self.root, step) / '__0_0.distcp').unlink()\n"
        "    return mark(self, step, *a, **k)\n"
        "ck.Checkpointer._mark = shard_gone_then_mark\n")
    cfg = write_config(tmp_path, steps=6, interval=2)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "l.txt"), capture_output=True, text=True, env=injected(tmp_path, code), timeout=180)
    assert r.returncode not in (0, c.EXIT_PREEMPTED, c.EXIT_PERMANENT), r.stderr[-2000:]
    assert "step-00000004: 1 file(s) the save wrote are missing at its commit (__0_0.distcp): not committed" in r.stderr
    assert _committed(tmp_path) == ["step-00000002"]
    r = run(cfg, 1, tmp_path / "again.txt")
    assert "resumed from" in r.stderr and "step-00000002" in r.stderr and sorted(losses(tmp_path / "again.txt")) == [3, 4, 5, 6]


def test_pruning_keeps_the_step_just_committed_when_a_newer_one_is_there(tmp_path):
    # A stale attempt's step 8, committed after this attempt had listed the checkpoints (it starts
    # from step 0): with keep 1 each of this attempt's commits pruned itself (step 8 the "last"),
    # and `latest` named a folder gone.
    run(write_config(tmp_path, steps=8, interval=8, keep=1), 1, tmp_path / "stale.txt")
    (tmp_path / "ckpt").rename(tmp_path / "stale")
    code = (
        "import shutil\n"
        "import pretrain_trainer.checkpoint as ck\n"
        "save = ck.Checkpointer.save\n"
        "def stale_commit_then_save(self, step, *a, **k):\n"
        "    if step == 2:\n"
        f"        shutil.copytree('{tmp_path / 'stale' / 'step-00000008'}', ck.step_dir(self.root, 8))\n"
        "    return save(self, step, *a, **k)\n"
        "ck.Checkpointer.save = stale_commit_then_save\n")
    cfg = write_config(tmp_path, steps=4, interval=2, keep=1)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "l.txt"), capture_output=True, text=True, env=injected(tmp_path, code), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _committed(tmp_path) == ["step-00000004", "step-00000008"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-00000004"
