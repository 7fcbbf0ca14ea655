"""The checkpoint folder's fence (trainer/pretrain_trainer/fence.py): a stale attempt, still running
after the operator replaced its pods (a node that lost its kubelet keeps its containers), stops
and commits nothing once the new attempt has claimed the folder; the new attempt resumes exactly;
an attempt older than the folder's stops before training; another job fails for good (exit 85)
on a folder a live trainer holds, and takes over the folder of a finished job. Real trainer
processes on one shared folder, as two attempts' pods on one volume would be.

    .venv/bin/python -m pytest tests/test_trainer_fencing.py -q
"""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from pretrain_operator import contract as c
from tests.trainer_util import cmd, env, free_port, injected, losses, wait_for_step, write_config

pytest.importorskip("torch", reason="the trainer extra (torch) is installed by `make test`")
from pretrain_trainer.checkpoint import committed_steps  # noqa: E402  (after the torch check)

UID = "6f1c0d1e-job-one"


def attempt_env(attempt: int, uid: str = UID) -> dict:
    return {**env(), c.ENV_JOB_UID: uid, c.ENV_ATTEMPT: str(attempt)}


def markers(root) -> dict[int, dict]:
    return {int(p.parent.name.split("-")[1]): json.loads(p.read_text()) for p in root.glob("step-*/COMMITTED")}


def test_a_stale_attempt_stops_without_committing_once_the_next_one_claims_the_folder(tmp_path):
    # 8 layers: about 4 steps a second per process here, so attempt 1 is still training when
    # attempt 2 has started (a few seconds) and trains 300 steps in all.
    cfg = write_config(tmp_path, steps=300, interval=5, keep=100, extra={"model": {"layers": 8}})
    root = tmp_path / "ckpt"
    one = subprocess.Popen(cmd(cfg, 1, tmp_path / "a1.txt"), stderr=subprocess.PIPE, text=True, env=attempt_env(1))
    wait_for_step(tmp_path / "a1.txt", 12, one)
    two = subprocess.Popen(cmd(cfg, 1, tmp_path / "a2.txt"), stderr=subprocess.PIPE, text=True, env=attempt_env(2))
    err1 = one.communicate(timeout=120)[1]
    assert one.returncode == c.EXIT_PREEMPTED, err1[-3000:]
    # At its next step, or at once when the claim refused a save's commit (fewer than 1 s apart here).
    said = f"job {UID} attempt 2 has claimed {root} since this attempt started: "
    assert f"{said}stopping at step" in err1 or re.search(re.escape(said) + r"checkpoint of step \d+ not committed; exiting 83", err1)
    err2 = two.communicate(timeout=300)[1]
    assert two.returncode == 0, err2[-3000:]

    # Attempt 2 resumed from attempt 1's newest commit before the claim; every checkpoint after
    # that step is attempt 2's, though attempt 1 trained past it.
    resumed = int(err2.split(f"resumed from {root}/step-")[1][:8])
    a1, a2 = losses(tmp_path / "a1.txt"), losses(tmp_path / "a2.txt")
    assert max(a1) > resumed and min(a2) == resumed + 1
    owners = markers(root)
    assert all(m["attempt"] == 1 for s, m in owners.items() if s <= resumed)
    assert all(m["attempt"] == 2 and m["job"] == UID for s, m in owners.items() if s > resumed)
    assert max(owners) == 300 and all(s in owners for s in range(resumed + 5 - resumed % 5, 301, 5))
    # ... and it trains exactly as attempt 1 did over the steps both trained: the stale attempt's
    # writes disturbed nothing.
    both = sorted(set(a1) & set(a2))
    assert both and all(a1[s] == a2[s] for s in both), [(s, a1[s], a2[s]) for s in both if a1[s] != a2[s]]
    assert json.loads((root / "ATTEMPT").read_text())["attempt"] == 2

    # A pod of attempt 1 starting now (the folder is attempt 2's) trains nothing and changes nothing.
    before = sorted(root.iterdir())
    late = subprocess.run(cmd(cfg, 1, tmp_path / "late.txt"), capture_output=True, text=True, env=attempt_env(1), timeout=120)
    assert late.returncode == c.EXIT_PREEMPTED, late.stderr[-3000:]
    assert f"attempt 2 of this job has claimed {root} since: attempt 1 is stale" in late.stderr
    assert not (tmp_path / "late.txt").exists() and sorted(root.iterdir()) == before

    # Another job given the folder of this finished one (continual pretraining, or the job created
    # again) takes it over and resumes from it: step 300 is the last, so it trains nothing.
    assert json.loads((root / "ATTEMPT").read_text())["released"] is True  # attempt 2 has exited
    other = subprocess.run(cmd(cfg, 1, tmp_path / "other.txt"), capture_output=True, text=True,
                           env=attempt_env(1, uid="another-job"), timeout=120)
    assert other.returncode == 0, other.stderr[-3000:]
    assert f"checkpoint folder {root} was job {UID}'s (attempt 2, its trainer has exited): this job (another-job) takes it over" in other.stderr
    assert json.loads((root / "ATTEMPT").read_text()) | {"time": 0} == {"job": "another-job", "attempt": 1, "time": 0,
                                                                      "released": True}


def test_a_second_job_on_a_folder_a_live_trainer_holds_fails_for_good_naming_it_and_takes_it_over_once_that_trainer_ended(tmp_path):
    # Two PretrainJobs given one claim (a copied manifest): they would fence each other off and
    # restart for ever. The second fails at once (85, the operator's non-retryable code), naming
    # the first, which loses nothing.
    cfg = write_config(tmp_path, steps=300, interval=5, extra={"model": {"layers": 8}})
    root = tmp_path / "ckpt"
    first = subprocess.Popen(cmd(cfg, 1, tmp_path / "a.txt"), stderr=subprocess.PIPE, text=True, env=attempt_env(1))
    try:
        wait_for_step(tmp_path / "a.txt", 12, first)
        second = subprocess.run(cmd(cfg, 1, tmp_path / "b.txt"), capture_output=True, text=True,
                                env=attempt_env(1, uid="copied-job"), timeout=120)
        assert second.returncode == 85, second.stderr[-3000:]
        assert (f"the checkpoint folder {root} is in use by job {UID} (attempt 1, its trainer alive" in second.stderr
                and "give this job its own checkpoint.path or checkpoint.claimName" in second.stderr)
        assert not (tmp_path / "b.txt").exists()
        at = max(losses(tmp_path / "a.txt"))
        wait_for_step(tmp_path / "a.txt", at + 5, first)  # the first trains on
        assert json.loads((root / "ATTEMPT").read_text())["job"] == UID
        # The first job deleted (SIGTERM: it saves and exits 83): its trainer released the folder as
        # it ended, so the copy, created again, takes it over at once and resumes from its last step.
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == c.EXIT_PREEMPTED
    finally:
        first.kill()
        first.wait()
    assert json.loads((root / "ATTEMPT").read_text())["released"] is True
    last = max(committed_steps(root))
    again = subprocess.run(cmd(write_config(tmp_path, steps=last, interval=5, extra={"model": {"layers": 8}}), 1, tmp_path / "b.txt"),
                           capture_output=True, text=True, env=attempt_env(1, uid="copied-job"), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"was job {UID}'s (attempt 1, its trainer has exited): this job (copied-job) takes it over" in again.stderr
    assert f"resumed from {root}/step-{last:08d}" in again.stderr


def test_a_last_step_save_fenced_off_at_its_commit_exits_83_on_every_rank_not_0(tmp_path):
    # Rank 0 reads the fence at most once a second while training: a new attempt claiming the folder
    # within that second, as the last step's save began, made the commit refuse that save without a
    # word, and the run exited 0 (the contract's "the last step checkpointed") with step 6 not
    # committed. The claim is injected as that save begins, after the step's own read of the fence.
    code = (
        "import json\n"
        "import pretrain_trainer.checkpoint as ck\n"
        "save = ck.Checkpointer.save\n"
        "def claimed_then_save(self, step, *a, final=False, **k):\n"
        "    if final and self.rank == 0:  # attempt 2's pod claiming the folder as it starts\n"
        f"        (self.root / 'ATTEMPT').write_text(json.dumps({{'job': '{UID}', 'attempt': 2, 'time': 0}}))\n"
        "    return save(self, step, *a, final=final, **k)\n"
        "ck.Checkpointer.save = claimed_then_save\n")
    cfg = write_config(tmp_path, nproc=2, data=2, steps=6, interval=3)
    root = tmp_path / "ckpt"
    e = injected(tmp_path, code, {**attempt_env(1), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port()})
    r = subprocess.run(cmd(cfg, 2, tmp_path / "l.txt", launch=True), capture_output=True, text=True, env=e, timeout=180)
    assert r.returncode == c.EXIT_PREEMPTED, r.stderr[-3000:]
    said = f"has claimed {root} since this attempt started: checkpoint of step 6 not committed; exiting 83"
    assert f"[rank 0] job {UID} attempt 2 {said}" in r.stderr and f"[rank 1] another attempt {said}" in r.stderr
    assert sorted(markers(root)) == [3]
    assert json.loads((root / "ATTEMPT").read_text())["attempt"] == 2  # left to attempt 2, not released


def test_an_older_attempts_release_racing_the_next_claim_leaves_the_folder_to_the_newer_attempt(tmp_path, monkeypatch, caplog):
    # Attempt 1's trainer, as it ended, read the fence (its own), attempt 2 claimed the folder, then
    # attempt 1 wrote the fence released with its own fields: attempt 2 read it as taken and stopped
    # at its next step (83) without saving, and the released folder was free for another job. The
    # claim is made between attempt 1's read and its write.
    from pretrain_trainer import fence
    root = tmp_path / "ckpt"
    root.mkdir()
    monkeypatch.setattr(fence, "BEAT_S", 0.5)  # the InUse below comes at attempt 2's next touch
    one, two = fence.Fence(root, (UID, 1)), fence.Fence(root, (UID, 2))
    assert one.claim() is None
    read = one._read

    def read_then_claimed() -> dict:
        held = read()
        assert two.claim() is None  # attempt 2's pod, starting meanwhile
        return held

    monkeypatch.setattr(one, "_read", read_then_claimed)
    try:
        one.close()
        assert json.loads((root / "ATTEMPT").read_text())["attempt"] == 1  # the race: attempt 1's release over the claim
        with caplog.at_level("WARNING", logger="pretrain_trainer.fence"):
            assert two.taken_by(now=True) is None
        assert ("was written by attempt 1 of this job after attempt 2 claimed it (released as its trainer ended): claimed again"
                in caplog.text)
        assert json.loads((root / "ATTEMPT").read_text()) | {"time": 0} == {"job": UID, "attempt": 2, "time": 0}
        with pytest.raises(fence.InUse):  # held again: another job cannot take it from attempt 2's live trainer
            fence.Fence(root, ("another-job", 1)).claim()
    finally:
        monkeypatch.undo()
        fence.release_held()
    assert json.loads((root / "ATTEMPT").read_text())["attempt"] == 2  # released by attempt 2 as it ends


def test_without_the_operators_identity_nothing_is_fenced(tmp_path):
    # Plain torchrun (no PRETRAIN_JOB_UID / PRETRAIN_ATTEMPT): no fence file, markers as before.
    cfg = write_config(tmp_path, steps=6, interval=3)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "l.txt"), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "ckpt" / "ATTEMPT").exists()
    assert sorted(markers(tmp_path / "ckpt")) == [3, 6] and all("attempt" not in m for m in markers(tmp_path / "ckpt").values())


def test_a_checkpoint_a_stale_attempt_prunes_while_the_next_one_checks_it_is_replaced_by_the_one_it_committed(tmp_path):
    # A stale attempt past its fence check as the next one claims the folder still commits that save
    # and prunes the older ones, maybe the one the next attempt is checking: its files vanish. With
    # keep 1 none was left that verified: exit 85, a job failed for good with a good checkpoint there.
    cfg = write_config(tmp_path, steps=8, interval=4, keep=2)
    r = subprocess.run(cmd(cfg, 1, tmp_path / "losses.txt"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and committed_steps(tmp_path / "ckpt") == [4, 8], r.stderr[-3000:]
    held = tmp_path / "stale-step-8"
    (tmp_path / "ckpt" / "step-00000008").rename(held)  # not yet committed when the next attempt lists them
    code = f"""
import shutil
from pathlib import Path
import pretrain_trainer.checkpoint as ck
verify = ck.verify
def racing(d, raise_io=False):
    if d.name == "step-00000004" and Path({str(held)!r}).exists():
        Path({str(held)!r}).rename(d.parent / "step-00000008")  # the stale attempt commits step 8
        shutil.rmtree(d)  # and prunes step 4
    return verify(d, raise_io)
ck.verify = racing
"""
    r = subprocess.run(cmd(cfg, 1, tmp_path / "resumed.txt"), env=injected(tmp_path, code), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000004 is not usable (unreadable marker" in r.stderr
    assert "changed while they were checked (['step-00000004'], now ['step-00000008']): checking them again" in r.stderr
    assert re.search(r"resumed from \S*step-00000008", r.stderr), r.stderr[-3000:]
    assert committed_steps(tmp_path / "ckpt") == [8]


def test_a_folder_whose_other_job_trainer_was_killed_unreleased_is_taken_over_once_its_fence_goes_stale(tmp_path, monkeypatch, caplog):
    # A deleted job's trainer SIGKILLed in its last save (the grace period too short for it) never
    # releases the fence; the job created again under its name at once found the fence fresh and
    # failed for good (85) on a folder nobody held any more. Now it watches the fence: untouched
    # for LIVE_S it is taken over; one its trainer touches again (alive) is still refused.
    import time

    from pretrain_trainer import fence
    monkeypatch.setattr(fence, "LIVE_S", 3.0)
    monkeypatch.setattr(fence, "WATCH_S", 0.2)
    root = tmp_path / "ckpt"
    root.mkdir()
    killed = fence.Fence(root, ("deleted-job", 2))
    assert killed.claim() is None
    killed.stop.set()  # SIGKILL: its beat ends, `release_held` never runs
    fence._HELD.remove(killed)
    try:
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="pretrain_trainer.fence"):
            assert fence.Fence(root, ("job-again", 1)).claim() is None
        assert 2.5 < time.monotonic() - t0 < 6, "taken over once untouched for LIVE_S, not before"
        assert "whose trainer was alive 0 s ago and did not release it: waiting up to 3 s" in caplog.text
        assert "was job deleted-job's (attempt 2, its trainer last alive 3 s ago): this job (job-again) takes it over" in caplog.text
        assert json.loads((root / "ATTEMPT").read_text())["job"] == "job-again"

        monkeypatch.setattr(fence, "BEAT_S", 0.5)  # job-again's trainer beats while a copy of it claims
        fence.release_held()
        live = fence.Fence(root, ("job-again", 2))
        assert live.claim() is None
        t0 = time.monotonic()
        with pytest.raises(fence.InUse, match="is in use by job job-again \\(attempt 2, its trainer alive 0 s ago\\)"):
            fence.Fence(root, ("copied-job", 1)).claim()
        assert time.monotonic() - t0 < 2, "refused at its next touch, without waiting out LIVE_S"
    finally:
        fence.release_held()


def test_the_holders_beat_goes_on_past_a_read_that_fails_once(tmp_path, monkeypatch):
    # One unreadable read (EIO, ESTALE on NFS) read as "not mine any more" ended the beat for
    # good: LIVE_S later another job took the folder from the live trainer (83, then 85).
    import time

    from pretrain_trainer import fence
    monkeypatch.setattr(fence, "BEAT_S", 0.2)
    root = tmp_path / "ckpt"
    root.mkdir()
    mine = fence.Fence(root, (UID, 1))
    read, failed = mine._read, []

    def fails_once() -> dict:
        if not failed:
            failed.append(True)
            return {}  # what _read makes of an OSError
        return read()
    monkeypatch.setattr(mine, "_read", fails_once)
    try:
        assert mine.claim() is None
        time.sleep(0.5)
        assert failed and mine.beat.is_alive()
        before = (root / "ATTEMPT").stat().st_mtime
        time.sleep(0.5)
        assert (root / "ATTEMPT").stat().st_mtime > before, "touched after the failed read"
    finally:
        fence.release_held()
