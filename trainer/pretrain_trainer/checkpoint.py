"""Checkpoints with torch.distributed.checkpoint (DCP): one `step-NNNNNNNN/` folder per save, a
`COMMITTED` marker written last (after every rank's shards and DCP's `.metadata`), then a `latest`
pointer; the last `keep` committed ones are kept. Every file the marker lists, the folder, the
marker and `latest` are fsynced in that order, before any older checkpoint is pruned (`_mark`).

Saved: model and optimizer (through `get_state_dict`, keyed by layout-independent FQNs, so a
checkpoint loads into another layout), the LR schedule, the data position, step and tokens seen,
the data manifest's hash, and each rank's RNG state (`rng/rank-N.pt`; on resume into another
world size it cannot carry over, so it is re-derived from the seed and the log says so).

Resume picks the newest checkpoint that verifies (marker present, every file the marker lists with
its recorded size and CRC32); one that does not is skipped for the previous one, saying why. The CRC32 of each data file is computed while it is written, by the process that
writes it (`Writer`), and kept beside it (`__0_0.distcp.crc32`); the marker collects them. On
resume the ranks share the reading: each checks every world-th file, so a byte changed at the same
size (a disk, a copy, a volume restored half-way) is found before anything loads. A committed checkpoint skipped that way is set aside (renamed `step-N.unusable`,
kept for inspection) once an older one has loaded: otherwise it would stay the newest, and pruning after the next commits would
keep it in place of the good ones this run saves. A folder without a marker (a save cut short) is
never loaded. Only a failed verification skips a checkpoint: one that could not be read (an I/O
error), or that verifies but does not load (a collective's timeout, a torch refusing its format),
stops the run (`LoadFailed`, a crash the next attempt retries) with nothing set aside, since the
load may have written part of it into the model and optimizer. Committed checkpoints of which none
verifies are `NoneVerifies` (exit 85), kept as they are: starting over from step 0 is a person's
decision, not a fallback. A checkpoint saved by
another model (tensor names or shapes differ from this config's, read from DCP's metadata) is not
skipped, and never partly loaded: `OtherModel`, which the trainer turns into exit 85.

Under the operator, only the newest attempt of a job commits into the folder (fence.py): a stale
one, still running on a lost node, commits nothing once replaced; each marker names its writer.

With frozen parameters (LoRA) only the trainable ones and their optimizer state are saved; the
frozen base comes from its own checkpoint (`load_weights`) on every start.

`load_weights` puts model weights only (no optimizer, no position) into an unsharded model: from a
trainer checkpoint (a `step-N` folder, or a checkpoint root: its newest good step) or a Hugging Face
folder (hf.py). Every rank reads the whole model: call it before sharding.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import operator
import os
import shutil
import threading
import time
import traceback
import zlib
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.utils.serialization import config as serialization_config

from .fence import Fence

log = logging.getLogger("pretrain_trainer.checkpoint")
MARKER = "COMMITTED"
UNUSABLE = ".unusable"
CRC = ".crc32"  # beside each data file: its CRC32, from the process that wrote it
# How many times in all `load` checks the committed checkpoints when they changed while none
# verified (a stale attempt committing and pruning as this one starts: one round is all it makes).
LIST_ROUNDS = 3
# What a checkpoint that does not load raises: DCP gathers every rank's failure into a
# CheckpointException, a BaseException (it escapes `except Exception`).
LOAD_ERRORS = (Exception, CheckpointException)
SAVE_ERRORS = LOAD_ERRORS  # an async save's, raised by its future


def one_line(e: BaseException) -> str:
    """An exception as a log line: DCP's CheckpointException as each failed rank's exception (its
    text otherwise starts with their tracebacks, the exception last)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {traceback.format_exception_only(type(x), x)[-1].strip()}"
                         for r, (x, _) in e.failures.items())
    return f"{type(e).__name__}: {e}"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def committed_steps(root: Path) -> list[int]:
    out = []
    for p in root.glob("step-*"):
        if (p / MARKER).exists():
            try:
                out.append(int(p.name.split("-")[1]))
            except ValueError:
                pass
    return sorted(out)


def io_error(e: BaseException) -> bool:
    """A read that failed without saying anything about the file's contents (EIO, a stale network
    file system handle, a permission): the next attempt may read it. A missing file is missing."""
    return isinstance(e, OSError) and not isinstance(e, FileNotFoundError)


def _marker(d: Path, raise_io: bool = False) -> tuple[dict, str | None]:
    """The checkpoint's marker, or {} and why it cannot be read (`raise_io`: an `io_error` is raised)."""
    try:
        return json.loads((d / MARKER).read_text()), None
    except (OSError, ValueError) as e:
        if raise_io and io_error(e):
            raise
        return {}, f"unreadable marker ({e})"


def verify(d: Path, raise_io: bool = False) -> str | None:
    """None if the checkpoint is complete as its marker describes, else what is wrong. `raise_io`:
    an `io_error` reading the marker is raised, not reported as a fault of the checkpoint."""
    marker, problem = _marker(d, raise_io)
    if problem:
        return problem
    for rel, size in marker.get("files", {}).items():
        f = d / rel
        if not f.exists():
            return f"missing {rel}"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, the marker recorded {size}"
    return None


def sync(f) -> None:
    """Flush an open file to the disk (not only to the OS's cache)."""
    f.flush()
    os.fsync(f.fileno())


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        sync(f)


def sync_folder(d: Path) -> None:
    """fsync a folder: the files created and renamed in it since survive a crash of the node. A
    file system that cannot (EINVAL from some FUSE and network ones) makes no such promise anyway."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def file_crc(f: Path) -> int:
    crc = 0
    with open(f, "rb") as src:
        while chunk := src.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksum_problem(d: Path, share: tuple[int, int] = (0, 1), only: set[str] | None = None,
                     raise_io: bool = False) -> str | None:
    """None if the files the marker has a CRC32 for still have it, else the first that does not.
    It reads them whole: `share` (i, n) checks every n-th file from the i-th (of those sorted by
    name, within `only` if given), so n ranks read a checkpoint once between them. A marker written
    before checksums were kept has none: nothing to check. `raise_io`: as for `verify`."""
    marker, problem = _marker(d, raise_io)
    if problem:
        return problem
    crcs = marker.get("crc32", {})
    rels = sorted(r for r in crcs if only is None or r in only)
    for rel in rels[share[0]::share[1]]:
        try:
            got = file_crc(d / rel)
        except OSError as e:
            if raise_io and io_error(e):
                raise
            return f"{rel} is unreadable ({e})"
        if got != crcs[rel]:
            return f"{rel} does not match its checksum (CRC32 {got:08x}, {crcs[rel]:08x} when saved)"
    return None


class OtherModel(Exception):
    """The newest good checkpoint was saved by another model (shapes or tensors differ): not a
    corrupt checkpoint to skip, a config to fix (the trainer exits 85 with this message)."""


class NoneVerifies(Exception):
    """Committed checkpoints are there and none verifies: resuming from none would start the run
    over from step 0, which a person decides (the trainer exits 85 with this message)."""


class CheckpointIncomplete(RuntimeError):
    """A save's files are not all there at its commit: not committed (a crash, retried)."""


class LoadFailed(RuntimeError):
    """A checkpoint that verifies could not be read or loaded (an I/O error, a collective's timeout,
    a torch refusing its format): not a bad checkpoint to skip, and the model and optimizer may hold
    part of it. The run stops (a crash: the operator retries it, the next attempt loads it again)."""


def shapes_of(state: dict) -> dict[str, tuple]:
    """A state dict's tensors as FQN -> (global) shape: what `model_mismatch` compares."""
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def model_mismatch(d: Path, shapes: dict[str, tuple]) -> str | None:
    """How the model saved in `d` differs from one with these tensors (FQN -> global shape), from
    DCP's metadata alone; None when every name and shape is the same."""
    meta = dcp.FileSystemReader(str(d)).read_metadata().state_dict_metadata
    saved = {k.removeprefix("model."): tuple(m.size) for k, m in meta.items() if k.startswith("model.") and hasattr(m, "size")}
    differ = sorted(k for k in saved.keys() & shapes.keys() if saved[k] != shapes[k])
    lacks, adds = sorted(saved.keys() - shapes.keys()), sorted(shapes.keys() - saved.keys())
    parts = ([f"{differ[0]} is {list(saved[differ[0]])} there, {list(shapes[differ[0]])} here"] if differ else []) + \
        ([f"it holds {len(lacks)} tensor(s) this model lacks ({lacks[0]}, ...)"] if lacks else []) + \
        ([f"it lacks {len(adds)} tensor(s) of this model ({adds[0]}, ...)"] if adds else [])
    return "; ".join(parts) or None


def weights_problem(d: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None if the checkpoint is complete and the files holding its model tensors have their
    CRC32s (the optimizer's and the RNG's files are not read for weights), else what is wrong.
    `share`: as for checksum_problem (each of n ranks reads its part of the model's files)."""
    problem = verify(d) or checksum_problem(d, only={".metadata"})
    if problem:
        return problem
    try:
        storage = dcp.FileSystemReader(str(d)).read_metadata().storage_data
    except Exception as e:  # a marker written before checksums: .metadata unchecked, and unpickling it failed
        return f"unreadable .metadata ({type(e).__name__}: {e})"
    return checksum_problem(d, share, only={s.relative_path for i, s in storage.items() if i.fqn.startswith("model.")})


def is_hf_folder(p: Path) -> bool:
    """A Hugging Face model folder (its config.json), read by hf.load_hf, not DCP."""
    return (p / "config.json").exists()


def weights_source(p: Path, problem_of=weights_problem, steps: list[int] | None = None, say: bool = True) -> Path:
    """The checkpoint to read weights from. A step folder (one with a marker) is an explicit choice:
    a ValueError if it does not verify. A folder of them (a run's checkpoint.path) gives its newest
    that verifies, as a resume does: each newer one skipped is said in the log, with why; a
    ValueError if none does; FileNotFoundError if there is none. `problem_of` checks one step
    folder; `steps`, the committed steps when already listed, and `say`, whether this process
    logs the skipped ones (agreed_weights_source: rank 0's list, rank 0 says)."""
    if (p / MARKER).exists():
        problem = problem_of(p)
        if problem:
            raise ValueError(f"checkpoint {p} does not verify: {problem}")
        return p
    skipped = []
    for s in (committed_steps(p) if steps is None else steps)[::-1]:
        d = step_dir(p, s)
        problem = problem_of(d)
        if problem is None:
            return d
        if say:
            log.warning("skipping checkpoint %s for an older one: %s", d, problem)
        skipped.append(f"{d.name}: {problem}")
    if skipped:
        raise ValueError(f"no checkpoint under {p} verifies ({'; '.join(skipped)})")
    raise FileNotFoundError(f"{p}: neither a Hugging Face folder (config.json) nor a trainer checkpoint "
                            f"(a step-N folder with {MARKER}, or a folder of them)")


def pinned_base(root: Path, base: str) -> str | None:
    """The frozen base a LoRA run's checkpoint (`root`: a step folder, else its newest committed
    step whose extra.json reads) was trained on, as resolved at the run's first start (extra.json's "base"):
    `lora.baseCheckpoint` given as a run's checkpoint folder means its newest step that verifies,
    which moves as that run commits (or a step fails to verify), and the adapters belong to the one
    they were trained on. None without checkpoints, with ones from before the pin, or when the
    spec's `base` (lora.baseCheckpoint, else model.initFrom) changed since (a choice of the user's:
    the new one is taken)."""
    for d in [root] if (root / MARKER).exists() else [step_dir(root, s) for s in committed_steps(root)[::-1]]:
        try:
            pin = json.loads((d / "extra.json").read_text()).get("base") or {}
        except (OSError, ValueError):
            continue  # the resume's verification says what is wrong with that one; an older one pins alike
        return pin.get("source") if pin.get("spec") == base else None
    return None


def agreed_weights_source(path: str) -> str:
    """`weights_source` decided by every rank together, the same for all (each rank deciding for
    itself could pick another step: a commit or a pruning in between, a rank's read error).
    Global rank 0 lists the steps; each rank reads its share of a candidate's model files (as a
    resume does: n ranks read a 16 GB model once between them, not rank 0 alone) and the first
    problem any rank found decides. A Hugging Face folder is its own source. The same ValueError
    or FileNotFoundError on every rank."""
    p = Path(path)
    box = [[is_hf_folder(p), committed_steps(p)] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    hf, steps = box[0]
    if hf:
        return str(p)

    def problem_of(d: Path) -> str | None:
        problems = [None] * dist.get_world_size()
        try:
            mine = weights_problem(d, share=(dist.get_rank(), dist.get_world_size()))
        except OSError as e:  # one rank raising would leave the others in the gather
            mine = f"unreadable ({e})"
        dist.all_gather_object(problems, mine)
        return next((x for x in problems if x), None)
    return str(weights_source(p, problem_of, steps, say=dist.get_rank() == 0))


def load_weights(model, path: str, whole: dict[str, tuple] | None = None, verified: bool = False) -> Path:
    """Model weights from a trainer checkpoint or a Hugging Face folder into an unsharded model.
    A trainer checkpoint must hold exactly this model's tensors (else a ValueError naming the first
    difference), or with `whole` (FQN -> shape) those of the whole model `model` is a part of (a
    pipeline stage). Which checkpoint: `weights_source`, unless `verified` (a step folder that
    `agreed_weights_source` has checked)."""
    p = Path(path)
    if is_hf_folder(p):
        from .hf import load_hf
        load_hf(model, p)
        return p
    d = p if verified else weights_source(p)
    opts = StateDictOptions(ignore_frozen_params=has_frozen(model))
    sd = {"model": get_model_state_dict(model, options=opts)}
    other = model_mismatch(d, whole or shapes_of(sd["model"]))
    if other:  # DCP would load a subset silently, or fail in its planner
        raise ValueError(f"checkpoint {d} holds another model than this config's model ({other})")
    try:
        dcp.load(sd, checkpoint_id=str(d))
    except CheckpointException as e:  # a damaged file: its callers report a ValueError as a bad input
        raise ValueError(f"checkpoint {d} does not load: {e}") from e
    set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=not opts.ignore_frozen_params))
    return d


def has_frozen(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


class Writer(FileSystemWriter):
    """DCP's file writer with one CRC32 per data file (what a resume checks), and without the zip
    CRC32 that torch.save computes for every tensor record.

    torch.load never checks those record checksums (a flipped byte in a tensor loads: checked with
    torch 2.15), so they protect nothing here, and computing them (miniz, a byte table at a time)
    made a 1.27 GiB save 1.74x slower on this project's CPU, a 97 MiB one 1.07-1.19x slower
    (bench/checkpoint_writer.py). The file's own CRC32 is zlib's (3.6 GB/s here), computed as the
    bytes go out (`_ChecksumFileSystem`), in whichever process writes (the trainer's, or an async
    save's writer process). The zip option is process-wide and set around the writes only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fs = _ChecksumFileSystem()

    def write_data(self, plan, planner):
        with _no_zip_crc32():
            return super().write_data(plan, planner)


class _Checksummed(io.RawIOBase):
    """A data file being written, with the CRC32 of the bytes written so far. DCP's writer only
    writes, tells and flushes (torch.save into it neither seeks nor tells: checked with 2.15), so
    this is the CRC32 of the whole file; the test suite checks it against the file read back."""

    def __init__(self, f):
        super().__init__()
        self.f, self.crc = f, 0

    def write(self, b) -> int:
        self.crc = zlib.crc32(b, self.crc)
        return self.f.write(b)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes
            self.f.close()


class _ChecksumFileSystem(FileSystem):
    """DCP's local file system, whose data files (`.distcp`) leave their CRC32 beside them once
    written whole (not when a write fails: then the save fails and commits nothing)."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if mode != "wb" or not str(path).endswith(".distcp"):
                yield stream
                return
            out = _Checksummed(stream)
            yield out
        write_synced(Path(str(path) + CRC), str(out.crc))  # listed in the marker: as durable as the data file


@contextlib.contextmanager
def _no_zip_crc32():
    """torch.serialization.set_crc32_options(False) for every thread. In torch 2.15 that call sets a
    per-thread override (a ContextVar), which DCP's writer threads, new threads, do not see: they
    read the option's default, so that is set too (a private field; without it, where a torch lacks
    it, only the calling thread's writes skip the checksum)."""
    entry = getattr(serialization_config, "_config", {}).get("save.compute_crc32")
    before = torch.serialization.get_crc32_options(), getattr(entry, "default", None)
    torch.serialization.set_crc32_options(False)
    if entry is not None:
        entry.default = False
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before[0])
        if entry is not None:
            entry.default = before[1]


SHM = "/dev/shm"


def staging_problem(state: dict, shm: str = SHM) -> str | None:
    """Whether this pod's ranks' staging copies (async saves stage each rank's whole state into
    shared memory, once, and reuse it) fit in the free space of /dev/shm; a message if not. A
    container runtime's own /dev/shm is 64 MiB: a 97 MiB state failed there at its first async
    save ('unable to allocate shared memory(shm)'), which ended the run."""
    def nbytes(v) -> int:
        if isinstance(v, dict):
            return sum(nbytes(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(nbytes(x) for x in v)
        if isinstance(v, torch.Tensor):
            t = v.to_local() if hasattr(v, "to_local") else v
            return t.numel() * t.element_size()
        return 0

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = nbytes(state) * local
    try:
        st = os.statvfs(shm)
    except OSError:
        return None  # no /dev/shm to measure: let the save try
    free = st.f_bavail * st.f_frsize
    if need <= free:
        return None
    return (f"async checkpoint staging needs about {need / 2**20:.0f} MiB of shared memory ({local} rank(s) in this pod) "
            f"but {shm} has {free / 2**20:.0f} MiB free: raise spec.template.shmSize or the pod's memory limit")


def _kept_open(stager):
    """A DefaultStager whose copier stays open between saves: torch 2.11's closed it after each
    staging (pytorch#183413, fixed in #183424), emptying its type table and its pinned buffers, so
    the second async save failed (KeyError <class 'type'>) and the run saved synchronously from then
    on. `_close_stager` closes it for good."""
    inner = getattr(stager, "_state_dict_stager", None)
    if inner is not None:
        inner.close = lambda: None
    return stager


def _close_stager(stager) -> None:
    inner = getattr(stager, "_state_dict_stager", None)
    if inner is not None:
        inner.__dict__.pop("close", None)
    stager.close()


class Checkpointer:
    def __init__(self, root: str, keep: int, rank: int, world: int, async_save: bool = False, fence: Fence | None = None):
        self.root = Path(root)
        self.fence = fence or Fence(self.root, None)  # rank 0 checks it before each commit (fence.py)
        self.keep, self.rank, self.world = keep, rank, world
        self.async_save = async_save
        self.pending = None  # (future, step, rank 0's commit: a future, else None) of an async save
        self.last_step = 0
        self.last_time = 0.0
        self.save_seconds = 0.0
        self.blocked_seconds = 0.0
        self.blocked_this = 0.0  # by the save in progress
        self.staging = None  # future of an async save's staging (the copy it writes from)
        self.stager = None
        self.pruner: threading.Thread | None = None  # rank 0 deleting what a commit made obsolete
        # Committed steps that did not verify at the resume, set aside or not (a refused rename):
        # pruning never counts them among the last `keep`, nor deletes them.
        self.unusable: set[int] = set()
        self.saved_state: tuple[tuple, dict] | None = None  # (the tensors, state) of the last save
        self.writer_start: threading.Thread | None = None  # starting the async writer process ahead
        self.writer_error: BaseException | None = None
        self.async_checked = False  # the first async save's checks (`_async_ready`) done

    def storage_problem(self) -> str | None:
        """What keeps this run from checkpointing, found at the start (the same answer on every
        rank) rather than at the first save: a folder some rank cannot write, or one not shared."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{self.rank}"
            probe.write_text("ok")
            probe.unlink()
            problem = None
        except OSError as e:
            problem = (f"the checkpoint folder {self.root} is not writable ({type(e).__name__}: {e}): check "
                       "checkpoint.path and checkpoint.claimName (the volume, and its permissions for user 1000)")
        ok = torch.tensor([0 if problem else 1])
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if int(ok) == 0:
            return problem or "the checkpoint folder is not writable on another rank (its log says why)"
        return self.shared_problem()

    def shared_problem(self) -> str | None:
        """Every rank must see the same checkpoint folder (rank 0 writes DCP's metadata and the
        marker; each rank its shards). An emptyDir on several nodes is not shared: say so at the
        start instead of failing at the first save."""
        if self.world == 1:
            return None
        token = [f"{os.getpid()}-{time.time_ns()}"]
        dist.broadcast_object_list(token, src=0)
        probe = self.root / ".shared-probe"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text(token[0])
        dist.barrier()
        try:
            seen = probe.read_text() == token[0]
        except OSError:
            seen = False
        ok = torch.tensor([1 if seen else 0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        dist.barrier()
        if self.rank == 0:
            probe.unlink(missing_ok=True)
        if int(ok) == 1:
            return None
        return (f"the checkpoint folder {self.root} is not shared by every rank (a rank cannot see what rank 0 wrote "
                "there): on several nodes set checkpoint.claimName to a ReadWriteMany PersistentVolumeClaim")

    def start_writer(self) -> None:
        """Start the async writer process now, in the background, instead of in the first async save.
        Its interpreter, torch import and process group took 4-5 s on 2 CPUs: the first save's commit
        waited for them, and so did the next save when saves came a few seconds apart. A checkpoint
        requested on a termination notice, often the run's first async save, is the one that most
        needs those seconds. Every rank calls it at the same point (a collective: rank 0 picks the
        writers' rendezvous port). It uses DCP's process executor's own start-up (private API, hence
        the fallback: the first save starts the process, as before)."""
        if not self.async_save or self.writer_start is not None:
            return
        try:
            from torch.distributed.checkpoint import _async_process_executor as ape
            if ape._CHECKPOINT_PROCESS is not None:
                return
            info = ape._ProcessGroupInitInfo()
        except Exception as e:  # noqa: BLE001  (another torch: the first save starts it)
            log.info("the async writer process starts with the first save (%s: %s)", type(e).__name__, str(e)[:200])
            return

        def start() -> None:
            try:
                ape._CHECKPOINT_PROCESS = ape._AsyncCheckpointProcess(pg_init_info=info)
            except BaseException as e:  # noqa: BLE001  (checked by the first save, on every rank)
                self.writer_error = e

        log.info("starting the async checkpoint writer process ahead of the first save")
        self.writer_start = threading.Thread(target=start, name="checkpoint-writer-start", daemon=True)
        self.writer_start.start()

    def _async_ready(self, state: dict) -> bool:
        """Before the first async save, on every rank: wait for `start_writer`, and check that the
        staging copy fits in /dev/shm. False (save synchronously from now on, saying why) when the
        writer did not start or the copy does not fit on any rank: the ranks must agree, since a
        rank without its writer would start one and wait in a collective for the others'."""
        if self.async_checked:
            return True
        self.async_checked = True
        if self.writer_start is not None:
            self.writer_start.join()
            self.writer_start = None
        problem = (f"the async writer process did not start ({self.writer_error})" if self.writer_error
                   else staging_problem(state))
        ok = torch.tensor([0 if problem else 1])
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if int(ok) == 1:
            return True
        log.warning("%s; saving synchronously from now on", problem or "async checkpointing is not possible on another rank")
        self.async_save = False
        return False

    @staticmethod
    def _options(model) -> StateDictOptions:
        frozen = has_frozen(model)  # LoRA: the adapters only
        return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)

    def _state(self, model, optim) -> tuple[dict, list]:
        """What is saved and loaded, and this rank's optimizer param_groups, which are not: the
        same key on every rank, DCP keeps one rank's copy, and under pipeline parallel that copy
        names only the first stage's parameters (the other stages lost their hyperparameters on
        resume: KeyError 'betas'). They hold nothing a checkpoint must carry: one group, its
        hyperparameters from the config, its lr set from the schedule at every step.

        An optimizer with no state yet (every step so far skipped as non-finite, or none taken) is
        filled by get_state_dict with one AdamW step at lr 0: the weights unchanged, but each
        parameter's step count 1, so a save there (a request, a notice) put AdamW's bias
        correction one step off in the run and its checkpoint. The count goes back to 0, which is
        AdamW's own first state (zero moments, step 0)."""
        fresh = not optim.state
        msd, osd = get_state_dict(model, optim, options=self._options(model))
        if fresh:
            for st in (*optim.state.values(), *osd["state"].values()):
                if torch.is_tensor(st.get("step")):
                    st["step"].zero_()
                elif "step" in st:
                    st["step"] = 0
        groups = osd.pop("param_groups")
        return {"model": msd, "optim": osd}, groups

    def _shapes(self, model) -> dict[str, tuple]:
        """The model's tensors as a checkpoint names them (FQN -> global shape), from every rank:
        under pipeline parallel each rank holds only its stages."""
        mine = shapes_of(get_model_state_dict(model, options=self._options(model)))
        if self.world == 1:
            return mine
        every: list = [None] * self.world
        dist.all_gather_object(every, mine)
        return {k: v for d in every for k, v in d.items()}

    def _save_state(self, model, optim) -> dict:
        """`_state` for a save, reused from the previous save while it still holds the very tensors
        of the model and the optimizer: the optimizer updates them in place, so the previous state
        dict (views of them) shows their current values. Walking them again took 7-12 ms of the
        training loop at every save of a 97 MiB model (a third of an async save's blocked time).
        Any tensor replaced (a parameter or buffer re-assigned, optimizer state re-created: a new
        identity) builds it anew."""
        live = (*model.parameters(), *model.buffers(), *(v for st in optim.state.values() for v in st.values()))
        held = self.saved_state[0] if self.saved_state else ()  # held: their ids cannot be reused
        if len(live) != len(held) or not all(map(operator.is_, live, held)):
            self.saved_state = live, self._state(model, optim)[0]
        return self.saved_state[1]

    def save(self, step: int, model, optim, extra: dict, final: bool = False) -> bool:
        """Save (async: blocks only for staging); commit when the shards are written. False, on every
        rank, when a synchronous save was not committed: another attempt has claimed the folder since
        this one last read the fence (fence.py), so this one is stale and stops (exit 83). An async
        save commits later, in the background (True here): a fence taken meanwhile stops the loop at
        its next step.

        A `final` save (the last step, a preemption) is synchronous: the run waits for it anyway,
        and an async one would first start the writer process and stage a copy. An earlier async
        save that failed is logged, not raised, before it: it is saved all the same. Nor is it
        counted in `blocked_seconds`, the time the training loop waited for saves before it went on."""
        t_blocked = time.monotonic()
        if final:  # the checkpoint that matters most: an earlier async save's failure must not keep it from being tried
            self._wait_logging(f"saving step {step} synchronously anyway")
        else:
            self.wait()  # waiting for the previous async save blocks training too; its failure stops the run
        t0 = time.monotonic()
        d = step_dir(self.root, step)
        if self.rank == 0:
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
        dist.barrier()
        (d / "rng").mkdir(parents=True, exist_ok=True)
        # Synced by the rank that writes it: rank 0's fsync at the commit would not flush another node's cache.
        with open(d / "rng" / f"rank-{self.rank}.pt", "wb") as f:
            torch.save({"cpu": torch.get_rng_state(), "world": self.world,
                        # This rank's own device only: all visible devices' states did not fit a resume
                        # with fewer GPUs per pod (an IndexError on every attempt).
                        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, f)
            sync(f)
        state = self._save_state(model, optim)
        if self.async_save and not final and self._async_ready(state):
            r, failed = None, None
            try:
                r = dcp.async_save(state, storage_writer=self._writer(d), planner=self._planner(), **self._async_options())
            except Exception as e:  # noqa: BLE001  (a torch without this staging path: save synchronously)
                failed = f"{type(e).__name__}: {str(e)[:200]}"
                # Said here, before the agreement: a peer that stops the attempt may get this rank
                # killed (the launcher's agent ends the others) before its own error is printed.
                log.warning("the async checkpoint of step %d failed on this rank (%s)", step, failed)
            if not self._async_failed(step, failed):
                if isinstance(r, AsyncSaveResponse):  # staging may go on in the background
                    self.staging, fut = r.staging_completion, r.upload_completion
                else:
                    fut = r
                self.pending = (fut, step, self._commit_when_written(fut, step, extra, t0) if self.rank == 0 else None)
                self._blocked(step, time.monotonic() - t_blocked, done=self.staging is None)
                return True
        dcp.save(state, storage_writer=self._writer(d), planner=self._planner())
        committed = self._commit(step, extra, t0)
        if not final:
            self._blocked(step, time.monotonic() - t_blocked)
        return committed

    @staticmethod
    def _planner() -> DefaultSavePlanner:
        """DCP's planner with its plan cache (as torchtitan uses it): a save whose local plan is the
        previous save's (the same tensors, shapes and layout: every save of a run) sends no plan to
        the coordinator and reuses the global plan and metadata; a changed plan is planned anew."""
        return DefaultSavePlanner(enable_plan_caching=True)

    def _writer(self, d: Path) -> FileSystemWriter:
        # On a GPU one writer thread (DCP overlaps the device-to-host copies only with one; four were
        # slower on an H200: 731 against 992 MiB/s, bench/gpu.py). On the CPU two, one file each:
        # a 1.27 GiB save went from 63 % to 107-113 % of dd's sequential speed (bench/trainer.py).
        return Writer(str(d), thread_count=1 if torch.cuda.is_available() else 2, sync_files=True)

    def _async_options(self) -> dict:
        """The writes in a separate process (no GIL shared with the training loop); the state is
        staged into shared memory (pinned, on a side stream, on a GPU) by a background thread while
        the next step's forward and backward go on: only `wait_staging` (before the optimizer
        changes the weights) may block. Staging in the call instead blocked a 1.27 GiB CPU save for
        0.37 s of every save; in the background, 0.00 s (bench/trainer.py)."""
        cuda = torch.cuda.is_available()
        if self.stager is None:
            self.stager = _kept_open(DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=True,
                                                                  use_async_staging=True, use_non_blocking_copy=cuda)))
        return {"async_checkpointer_type": AsyncCheckpointerType.PROCESS, "async_stager": self.stager}

    def _async_failed(self, step: int, failed: str | None) -> bool:
        """Whether the async save of `step` failed, agreed by every rank (each calls this at the same
        point): on every rank, each saves synchronously from now on, saying so; on some only, every
        rank stops (this step cannot be committed, and the writers of the others wait for peers that
        will not come). A rank that went on alone would stand in other collectives than its peers."""
        seen = torch.tensor([1.0 if failed else 0.0, 0.0 if failed else 1.0])  # [a rank failed, a rank did not]
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if seen[0] and seen[1]:
            raise RuntimeError(f"the async checkpoint of step {step} failed on some ranks only "
                               f"({failed or 'on another rank, whose log says why'}): stopping this attempt")
        if failed:
            log.warning("async checkpointing failed (%s); saving synchronously from now on", failed)
            self.async_save = False
        return bool(failed)

    def wait_staging(self, blocking: bool = True, agree: bool = False) -> None:
        """Block until an async save's copy of the state is taken (call before optimizer.step).
        `agree` (the training loop's call, on every rank at the same step): a copy that failed is
        `_async_failed`'s to judge; on every rank (a stager that cannot copy this state, as torch
        2.11's could not) that save is dropped, never written nor committed, and the run goes on
        saving synchronously (it raised here: every attempt crashed at its first save, spending
        the job's failure budget). Elsewhere its failure is raised."""
        if self.staging is None:
            return
        t0 = time.monotonic()
        staging, self.staging = self.staging, None
        step = self.pending[1] if self.pending else 0
        if not agree:
            staging.result()
        else:
            failed = None
            try:
                staging.result()
            except Exception as e:  # noqa: BLE001  (whatever the copy raised: agreed on below)
                failed = f"{type(e).__name__}: {one_line(e)[:200]}"
                log.warning("the async checkpoint of step %d failed on this rank while staging (%s)", step, failed)
            if self._async_failed(step, failed):
                self.pending = None  # its writes waited for the copy and failed with it: nothing to commit
        self._blocked(step, time.monotonic() - t0 if blocking else 0.0)

    def _blocked(self, step: int, seconds: float, done: bool = True) -> None:
        """Count time the training loop waited for a save; log each save's total once it is known
        (an async save's when its staging is waited for)."""
        self.blocked_seconds += seconds
        self.blocked_this += seconds
        if done:
            log.info("checkpoint step %d blocked training for %.4f s", step, self.blocked_this)
            self.blocked_this = 0.0

    def close(self) -> None:
        """Wait for an async save still pending, and for pruning. The run ends with a code of its own
        (83 for a fenced-off attempt, 85), which a pending save's failure raised here replaced with
        a crash's: it is logged instead."""
        self._wait_logging("nothing more is saved")
        self._join_pruner()
        if self.stager is not None:
            _close_stager(self.stager)
            self.stager = None

    def _wait_logging(self, then: str) -> None:
        """`wait` (not counted as blocking training), logging an earlier async save's failure instead
        of raising it. For a final save: before, its `wait` raised that failure, so a preemption's
        checkpoint was never attempted and the exit was a crash, not 83. Whatever its own writer
        did, every rank goes on to the same synchronous save (the same collectives)."""
        failed = self.pending[1] if self.pending else None
        try:
            self.wait(blocking=False)
        except SAVE_ERRORS as e:  # noqa: BLE001  (any failure of that save: it is not committed)
            self.staging = self.pending = None
            log.error("the async checkpoint of step %s failed (%s); %s", failed, one_line(e), then)

    def wait(self, blocking: bool = True) -> None:
        """Wait until an async save is written and committed (`blocking`: the training loop waits);
        raise if it failed."""
        self.wait_staging(blocking)
        if self.pending is None:
            return
        fut, _, commit = self.pending
        self.pending = None
        fut.result()  # every rank: a failed write stops the run, as a failed sync save does
        if commit is not None:
            commit.result()

    def _commit_when_written(self, fut, step: int, extra: dict, t0: float) -> Future:
        """Rank 0 commits an async save as soon as it is written, from the thread that completes its
        future, while training goes on. Committed only at the next save (as before), a checkpoint
        was lost to a node lost without a notice in between, and status.lastCheckpoint lagged an
        interval behind. No barrier is needed: rank 0's save completes after DCP's metadata, which
        its coordinator writes once every rank's writer has reported its shards written, and each
        rank wrote its RNG file before handing its state to its writer."""
        commit: Future = Future()

        def done(f) -> None:
            try:
                if f.exception() is None:  # a failed write: the training loop's fut.result() raises it
                    self._mark(step, extra, t0)
                commit.set_result(None)
            except BaseException as e:  # noqa: BLE001  (raised by the training loop's next wait)
                commit.set_exception(e)

        fut.add_done_callback(done)
        return commit

    def _commit(self, step: int, extra: dict, t0: float) -> bool:
        """Commit a synchronous save: every rank's shards and RNG file are on disk, then rank 0 marks
        it. Whether it did, on every rank: only rank 0 reads the fence, and a last step's save that
        it refused went unsaid, the run exiting 0 with that step not checkpointed."""
        dist.barrier()
        done = torch.tensor([0])
        if self.rank == 0:
            done[0] = int(self._mark(step, extra, t0))
        dist.broadcast(done, src=0)  # also what the barrier after the marker was: no rank goes on before it
        return bool(done)

    def _written(self, d: Path) -> list[str]:
        """The files a save of this world writes into `d`: DCP's metadata and the data files it names
        (each with its CRC32 file), every rank's RNG state, extra.json."""
        data = sorted({s.relative_path for s in dcp.FileSystemReader(str(d)).read_metadata().storage_data.values()})
        return [".metadata", "extra.json", *data, *(n + CRC for n in data), *(f"rng/rank-{r}.pt" for r in range(self.world))]

    def _mark(self, step: int, extra: dict, t0: float) -> bool:
        """Rank 0 commits a written save; False when the fence is taken (nothing committed)."""
        d = step_dir(self.root, step)
        taken = self.fence.taken_by(now=True)
        if taken:  # a stale attempt: its save stays uncommitted, never loaded, removed by the next commit
            log.warning("checkpoint step %d not committed: %s has claimed %s since this attempt started", step, taken, self.root)
            return False
        write_synced(d / "extra.json", json.dumps(extra))
        # What the save wrote, by name: a listing alone made a marker of whatever was there, so a
        # shard gone before the commit (removed by a stale attempt's clean-up, not yet in a network
        # file system's cached listing of another node's writes) made a checkpoint that verified
        # and never loaded, tried again by every attempt while the one before it was good.
        missing = [n for n in self._written(d) if not (d / n).exists()]
        if missing:
            raise CheckpointIncomplete(f"checkpoint {d}: {len(missing)} file(s) the save wrote are missing at its commit "
                                       f"({', '.join(missing[:3])}): not committed")
        paths = [p for p in sorted(d.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(d)): p.stat().st_size for p in paths}
        # Data files' CRC32s come from their writers; the small files (DCP's metadata, each rank's
        # RNG, extra.json) are read here.
        crcs = {str(p.relative_to(d)): int(Path(str(p) + CRC).read_text()) if p.suffix == ".distcp" else file_crc(p)
                for p in paths if p.suffix != CRC}
        # Durable in this order, or a node's crash could leave a marker listing files that are empty
        # or gone (the checkpoint no longer verifies) while pruning had deleted the older ones: every
        # file is synced by its writer (the data files and DCP's metadata by DCP, their .crc32 files,
        # each rank's RNG, extra.json above); here the folders' entries, then the marker, then its
        # rename, then `latest` and the step folder's own entry in the root. Pruning comes after.
        if (d / "rng").is_dir():
            sync_folder(d / "rng")
        sync_folder(d)
        tmp = d / (MARKER + ".tmp")
        write_synced(tmp, json.dumps({"step": step, "world": self.world, "time": time.time(), "files": files,
                                      "crc32": crcs, **self.fence.fields()}))
        os.replace(tmp, d / MARKER)
        sync_folder(d)
        self._point_latest(d)
        # Deleting old checkpoints took 0.1 s of every 97 MiB save's blocked time here (longer on
        # network file systems): a thread does it while training goes on. It only touches folders
        # older than this one; the next commit and `close` wait for it.
        self._join_pruner()
        # Saved anew over a skipped step: a checkpoint like any other, from now (not before the
        # previous pruning is done: it would have counted the skipped folder still there as the newest).
        self.unusable.discard(step)
        self.pruner = threading.Thread(target=self._prune, args=(d,), name="checkpoint-prune", daemon=True)
        self.pruner.start()
        self.last_step, self.last_time = step, time.time()
        self.save_seconds = time.monotonic() - t0
        log.info("checkpoint step %d committed in %.2f s", step, self.save_seconds)
        return True

    def _point_latest(self, d: Path) -> None:
        """`latest` names `d`, durably (with the step folder's own entry in the root)."""
        latest_tmp = self.root / "latest.tmp"
        write_synced(latest_tmp, d.name)
        os.replace(latest_tmp, self.root / "latest")
        sync_folder(self.root)

    def _prune(self, d: Path) -> None:
        # Of the steps up to the one just committed: a newer one there (a stale attempt's, committed
        # as this attempt started) counted among the last K, and with `keep: 1` each commit
        # removed itself, leaving `latest` naming a folder gone.
        mine = int(d.name.split("-")[1])
        for old in [s for s in committed_steps(self.root) if s not in self.unusable and s <= mine][:-self.keep]:
            # The marker first: a deletion cut short (the process killed) leaves a folder without
            # one, removed by the next prune, not a committed one missing files.
            (step_dir(self.root, old) / MARKER).unlink(missing_ok=True)
            shutil.rmtree(step_dir(self.root, old), ignore_errors=True)
        # Folders without a marker older than this one were cut short: remove them.
        for p in self.root.glob("step-*"):
            if not (p / MARKER).exists() and p.name < d.name:
                shutil.rmtree(p, ignore_errors=True)

    def _join_pruner(self) -> None:
        if self.pruner is not None:
            self.pruner.join()
            self.pruner = None

    def load(self, model, optim) -> dict | None:
        """Load the newest checkpoint that verifies; returns its extra dict, or None to start fresh
        (no committed checkpoint). Newer ones that do not verify are skipped, saying why, and set
        aside once it has loaded. Raises `LoadFailed` when the one to load could not be read or
        did not load (nothing set aside: the next attempt tries it again), `NoneVerifies` when
        committed checkpoints are there and none verifies (none is loaded, none set aside), and
        `OtherModel`.

        A stale attempt (fenced off, docs/trainer-contract.md) that passed its fence check just
        before this one claimed the folder still commits that save and prunes the older ones,
        maybe the very one being verified here: its files vanish mid-check. When none verified,
        the committed checkpoints are listed again, and checked again if they changed."""
        candidates = self._committed()
        shapes = self._shapes(model) if candidates else {}
        for rounds in range(1, LIST_ROUNDS + 1):
            extra, skipped = self._load_newest(candidates, model, optim, shapes)
            if extra is not None or not candidates:
                return extra
            if rounds == LIST_ROUNDS:
                break
            again = self._committed()
            if again == candidates or not again:  # none left: not a fresh start, what was there did not verify
                break
            if self.rank == 0:
                log.warning("the committed checkpoints under %s changed while they were checked (%s, now %s): "
                            "checking them again", self.root, [step_dir(self.root, s).name for s in candidates],
                            [step_dir(self.root, s).name for s in again])
            candidates = again
        raise NoneVerifies(
            f"none of the {len(skipped)} committed checkpoint(s) under {self.root} verifies "
            f"({'; '.join(f'{d.name}: {why}' for d, why in skipped)}); they are kept as they are. Resuming from "
            f"none would start the run over from step 0: to do that, move them out of {self.root} (or give "
            "checkpoint.path a new folder); a good copy put back resumes as usual")

    def _committed(self) -> list[int]:
        """The committed steps, newest first, as rank 0 lists them: each rank listing for itself
        could see other steps (a stale attempt committing meanwhile, a network file system's cached
        listing), and the agreement on each would then pass with the ranks on different checkpoints."""
        candidates = committed_steps(self.root)[::-1] if self.root.exists() else []
        if self.world > 1:
            box = [candidates]
            dist.broadcast_object_list(box, src=0)
            candidates = box[0]
        return candidates

    def _load_newest(self, candidates: list[int], model, optim, shapes: dict) -> tuple[dict | None, list[tuple[Path, str]]]:
        """Load the first of `candidates` that verifies: (its extra dict, []), or (None, the ones
        skipped and why) when none does."""
        skipped: list[tuple[Path, str]] = []
        for step in candidates:
            d = step_dir(self.root, step)
            problem = self._agreed_problem(d)
            if problem:
                if self.rank == 0:
                    log.warning("checkpoint %s is not usable (%s); falling back to the previous one", d, problem)
                skipped.append((d, problem))
                self.unusable.add(step)
                continue
            extra = self._load_verified(d, step, model, optim, shapes)
            if self.rank == 0 and skipped:  # every rank is done with them: past the load's collectives
                for bad, _ in skipped:
                    self._set_aside(bad)
                try:  # it named a skipped one: the checkpoint resumed from is the newest usable
                    self._point_latest(d)
                except OSError as e:  # rank 0 alone, past the collectives: the run goes on (the next commit writes it)
                    log.warning("could not point latest at %s (%s)", d.name, e)
            return extra, []
        return None, skipped

    def _agreed_problem(self, d: Path) -> str | None:
        """Why `d` does not verify on some rank (sizes on every rank, the checksums shared: each
        rank reads its files), or None: the same answer on every rank, before any loads (DCP's
        load is a collective). A file that could not be read (an I/O error) proves nothing about
        the checkpoint: `LoadFailed`, on every rank."""
        problem = unreadable = None
        try:
            problem = verify(d, raise_io=True) or checksum_problem(d, share=(self.rank, self.world), raise_io=True)
        except OSError as e:
            unreadable = f"{type(e).__name__}: {e}"
        # A fault found by one rank is the checkpoint's, whatever another could not read.
        problem, unreadable = self._agreed(problem, unreadable)
        if problem:
            return problem
        if unreadable:
            raise LoadFailed(f"checkpoint {d} could not be read ({unreadable}): "
                             "stopping with nothing set aside; the next attempt reads it again")
        return None

    def _load_verified(self, d: Path, step: int, model, optim, shapes: dict[str, tuple]) -> dict:
        """Load a checkpoint that verifies into the model and the optimizer, and this rank's RNG;
        its extra dict. Any failure, on any rank, is `LoadFailed` on every rank (before: the
        previous checkpoint was tried, and with none left the run started over from step 0 with
        the model and optimizer partly overwritten by the failed load); another model is `OtherModel`."""
        other, failed = self._agreed_mismatch(d, shapes)
        if other:  # found by a rank that read the metadata: the checkpoint's, whatever another could not read
            raise OtherModel(
                f"{d} holds another model than this config's model{' and lora' if has_frozen(model) else ''} "
                f"({other}): a checkpoint resumes only into the model that saved it; set the config back, or "
                "give checkpoint.path a new folder (model.initFrom starts from an exported model)")
        if failed:
            raise self._load_failed(d, failed)
        try:
            state, groups = self._state(model, optim)
            dcp.load(state, checkpoint_id=str(d))
            set_state_dict(model, optim, model_state_dict=state["model"],
                           optim_state_dict={**state["optim"], "param_groups": groups}, options=self._options(model))
        except LOAD_ERRORS as e:  # noqa: BLE001  (any failure: the run stops, below, on every rank)
            failed = one_line(e)  # DCP's text is every failed rank's traceback: the cause was cut from status
            if self.rank != 0:
                log.error("checkpoint %s did not load: %s", d, failed)
        (failed,) = self._agreed(failed)
        if failed:
            raise self._load_failed(d, failed)
        extra = json.loads((d / "extra.json").read_text())
        rng = d / "rng" / f"rank-{self.rank}.pt"
        saved = torch.load(rng, weights_only=False) if rng.exists() else None
        if saved and saved["world"] == self.world:
            torch.set_rng_state(saved["cpu"])
            cuda = saved.get("cuda")
            if isinstance(cuda, list):  # saved before: every visible device's state, this rank's at its index
                i = torch.cuda.current_device() if torch.cuda.is_available() else 0
                cuda = cuda[i] if i < len(cuda) else None
            if cuda is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(cuda)
        else:
            torch.manual_seed(extra.get("seed", 0) * 7919 + self.rank + step)
            if self.rank == 0:
                log.warning("resuming step %d saved by %s ranks on %d: per-rank RNG re-derived from the seed",
                            step, saved["world"] if saved else "?", self.world)
        self.last_step, self.last_time = step, json.loads((d / MARKER).read_text())["time"]
        if self.rank == 0:
            log.info("resumed from %s", d)
        return extra

    def _agreed_mismatch(self, d: Path, shapes: dict[str, tuple]) -> tuple[str | None, str | None]:
        """(how the model saved in `d` differs from this one, why DCP's metadata could not be read),
        the same on every rank, before any rank enters DCP's load (a collective). Each rank reads the
        metadata itself (as the load will); had one rank's read failed (a transient I/O error) while
        the others went on, that rank stood in the verdict's collective and the others in the load's:
        a hang until the collective timeout. Another rank's answer is named by its rank."""
        other = failed = None
        try:
            other = model_mismatch(d, shapes)
        except LOAD_ERRORS as e:  # noqa: BLE001  (an unreadable .metadata: LoadFailed on every rank)
            failed = f"{type(e).__name__}: {e}"
        return self._agreed(other, failed)

    def _agreed(self, *mine: str | None) -> tuple[str | None, ...]:
        """Each of this rank's answers, else the first other rank's naming that rank: the same on
        every rank (a collective: every rank calls it at the same point)."""
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        return tuple(self._first(m, [e[i] for e in every]) for i, m in enumerate(mine))

    @staticmethod
    def _first(mine: str | None, every: list) -> str | None:
        """This rank's answer, else the first other rank's, naming that rank."""
        return mine or next((f"rank {r}: {x}" for r, x in enumerate(every) if x), None)

    def _load_failed(self, d: Path, why: str) -> LoadFailed:
        return LoadFailed(
            f"checkpoint {d} verifies but did not load ({why}): "
            "stopping with nothing set aside, as the model and optimizer may hold part of it; the next attempt "
            f"loads it again. Should it be damaged in a way its marker cannot show (a marker without checksums), "
            f"move it out of {self.root} to resume from the previous one")

    def _set_aside(self, d: Path) -> None:
        """Rename a committed checkpoint that did not verify out of the run's steps, once every rank
        is done with it (an older one has loaded), so that it is never counted as the newest again:
        pruning keeps the last `keep` committed steps, and it would have kept this one in place of a
        good one saved after the fallback (with keep 1, every new save was deleted). An older
        folder set aside under the same name is replaced."""
        aside = d.with_name(d.name + UNUSABLE)
        try:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(d, aside)
            log.warning("set %s aside as %s", d.name, aside.name)
        except OSError as e:  # the run goes on (pruning passes over it); the next save of this step replaces it
            log.warning("could not set %s aside (%s)", d, e)
