"""Training data: `prepare` turns text files into token shards, the loader serves them.

    python -m pretrain_trainer prepare --input DIR --out DIR [--vocab-size N] [--tokenizer tokenizer.json]

`prepare` trains a byte-level BPE tokenizer offline with `tokenizers` (or takes the given one),
writes `tokens-NNNNN.bin` (uint16, or uint32 for vocabularies over 65535) with an end-of-text
token after each file, `tokenizer.json`, and `manifest.json` (each source file with its sha256,
the tokenizer's hash, token counts). Files are read in sorted order, so the output is a pure
function of the input.

The loader cuts the token stream into windows of seqLen + 1 and serves them in an order that is a
pure function of (seed, epoch): the global batch sequence is the same for any data-parallel degree,
each rank takes its slice, and the position (samples consumed) is all the state a checkpoint needs.
With data.path empty it serves a deterministic synthetic corpus (a repeating pattern with noise) so
a run needs nothing on disk. `data.sources` blends several prepared folders (one tokenizer): each
sample comes from the source furthest below its weight's share (`Blend`), each source keeps its own
shuffled order, and the position plus each source's count is the state.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("pretrain_trainer.data")

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".yaml", ".yml", ".html")
SHARD_TOKENS = 1 << 22
# End-of-text tokens, as tokenizers name them (GPT-2/this trainer's, Llama 3's, Llama 2's/T5's).
EOT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(input_dir: str, out_dir: str, vocab_size: int = 4096, tokenizer_path: str | None = None) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    src, out = Path(input_dir), Path(out_dir)
    # Not what an --out inside --input holds (a folder prepared there before): read as text, its
    # manifest and tokenizer made a second run's tokens, and its hash, differ from the first's.
    mine = out.resolve()
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES and not p.resolve().is_relative_to(mine))
    if not files:
        raise SystemExit(f"prepare: no text files ({', '.join(TEXT_SUFFIXES)}) under {src}")
    if tokenizer_path:
        try:
            tok = Tokenizer.from_file(tokenizer_path)
        except Exception as e:  # the tokenizers library's own error type names no file
            raise SystemExit(f"prepare: --tokenizer {tokenizer_path} cannot be read as a tokenizer.json: {e}") from e
        # A fine-tuning tokenizer.json often keeps its truncation and padding: each document was cut
        # to its max_length (or padded to it) without a word, and the corpus was a fraction of itself.
        tok.no_truncation()
        tok.no_padding()
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        # One file at a time (a generator): the corpus whole in memory did not fit a large one.
        texts = (p.read_text(errors="replace") for p in files)
        tok.train_from_iterator(texts, trainer=trainer, length=len(files))
    # The document separator: a given tokenizer's end-of-text token under one of its usual names
    # (else the last id was taken, an ordinary subword of a BPE tokenizer, and every document
    # boundary read as that word).
    eot = next((i for t in EOT_TOKENS if (i := tok.token_to_id(t)) is not None), None)
    if eot is None:
        raise SystemExit(f"prepare: --tokenizer {tokenizer_path} has no end-of-text token to separate documents with "
                         f"(one of {', '.join(EOT_TOKENS)}); add one to it as a special token")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.uint32
    buf: list[int] = []
    shards = []
    manifest_files = []

    def flush(final: bool = False):
        while len(buf) >= SHARD_TOKENS or (final and buf):
            chunk = buf[:SHARD_TOKENS]
            del buf[:SHARD_TOKENS]
            name = f"tokens-{len(shards):05d}.bin"
            np.asarray(chunk, dtype=dtype).tofile(out / name)
            shards.append({"file": name, "tokens": len(chunk)})

    for p in files:
        ids = tok.encode(p.read_text(errors="replace")).ids
        buf.extend(ids)
        buf.append(eot)
        manifest_files.append({"path": str(p.relative_to(src)), "sha256": sha256_file(p), "tokens": len(ids) + 1})
        flush()
    flush(final=True)
    manifest = {"vocabSize": tok.get_vocab_size(), "dtype": np.dtype(dtype).name, "eot": eot,
                "tokenizerSha256": sha256_file(out / "tokenizer.json"), "files": manifest_files,
                "shards": shards, "totalTokens": sum(s["tokens"] for s in shards)}
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


class DataError(ValueError):
    """The data cannot be used as configured: the run cannot succeed until someone fixes it."""


class MappedShards:
    """A prepared folder's shard files as a list of arrays, each memory-mapped when first read.
    At most `max_open` stay mapped (the least recently read is let go): each mapping holds a file
    descriptor, and a 100 GB corpus has about 12,800 shards at the default shard size, over the
    1024 descriptors a container's soft limit often is. Lengths come from the manifest, so nothing
    is opened to index the stream; each file's size is checked against them at the start."""

    def __init__(self, files: list[Path], lengths: list[int], dtype: str, max_open: int = 64):
        self.files, self.lengths, self.dtype, self.max_open = files, lengths, np.dtype(dtype), max_open
        self.open: OrderedDict[int, np.ndarray] = OrderedDict()
        for f, n in zip(files, lengths):
            size = f.stat().st_size  # OSError: missing or unreadable
            if size != n * self.dtype.itemsize:
                raise ValueError(f"{f.name} has {size} bytes, its manifest says {n} {self.dtype} tokens")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int) -> np.ndarray:
        if k in self.open:
            self.open.move_to_end(k)
            return self.open[k]
        if self.lengths[k] == 0:  # nothing to map (an empty file cannot be)
            return np.empty(0, self.dtype)
        if len(self.open) >= self.max_open:
            self.open.popitem(last=False)  # its mapping closes once no window read from it is held
        arr = self.open[k] = np.memmap(self.files[k], dtype=self.dtype, mode="r", shape=(self.lengths[k],))
        return arr


class Tokens:
    """A token stream stored in pieces (a prepared folder's memory-mapped shards, or one in-memory
    array), read as one: `tokens[a:b]` is an array of the tokens a..b-1 read from only the shards
    the window touches (a window across a boundary joins its two pieces), `tokens[i]` one token, and
    `part(a, b)` a sub-stream without reading anything. The corpus is never copied into memory
    whole; the operating system pages in what is read."""

    def __init__(self, shards: list[np.ndarray] | MappedShards, start: int = 0, stop: int | None = None):
        self.shards = shards
        lengths = shards.lengths if isinstance(shards, MappedShards) else [len(s) for s in shards]
        self.offsets = np.cumsum([0] + lengths)  # shard k: offsets[k]..offsets[k+1]-1
        self.start = start
        self.stop = int(self.offsets[-1]) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def _range(self, key: slice) -> tuple[int, int]:
        a, b, step = key.indices(len(self))
        if step != 1:
            raise IndexError("Tokens: only contiguous slices")
        return self.start + a, self.start + max(a, b)

    def part(self, a: int | None = None, b: int | None = None) -> "Tokens":
        """Tokens a..b-1 of this stream (numpy's slice rules) as a stream over the same shards."""
        lo, hi = self._range(slice(a, b))
        return Tokens(self.shards, lo, hi)

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if not isinstance(key, slice):
            i = range(len(self))[key]  # IndexError out of range, negative from the end
            return self[i:i + 1][0]
        lo, hi = self._range(key)
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi, side="left"))  # shards first..last-1 hold lo..hi-1
        ks = range(max(first, 0), last)
        if len(ks) <= 1:  # within one shard (or empty): a view, nothing copied
            k = ks[0] if ks else 0
            return self.shards[k][max(lo - self.offsets[k], 0):max(hi - self.offsets[k], 0)]
        # Across shards: copied piece by piece, so that no more shards are held open at once than
        # MappedShards keeps (a view would keep its mapping, and its file descriptor, alive).
        out = np.empty(hi - lo, self.shards[ks[0]].dtype)
        for k in ks:
            piece = self.shards[k][max(lo - self.offsets[k], 0):hi - self.offsets[k]]
            at = max(self.offsets[k] - lo, 0)
            out[at:at + len(piece)] = piece
        return out


class TokenSource:
    """The tokens of a prepared folder (its shards memory-mapped, read where a window falls), or a
    synthetic corpus, as `tokens` (`Tokens`). `field` names it in errors (data.path, data.sources[i])."""

    def __init__(self, path: str, vocab_size: int, seed: int, synthetic_tokens: int = 1 << 16, field: str = "data.path"):
        if path:
            d = Path(path)
            try:
                man = json.loads((d / "manifest.json").read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"{field} {path} is not a prepared folder ({type(e).__name__}: {e}); make one with "
                                f"`python -m pretrain_trainer prepare --input TEXT_DIR --out {path}`") from e
            try:
                if man["vocabSize"] > vocab_size:
                    raise DataError(f"{field}: the tokenizer's vocabulary ({man['vocabSize']}) exceeds model.vocabSize ({vocab_size}); "
                                    f"prepare it again with `--vocab-size {vocab_size}`, or raise model.vocabSize")
                try:
                    self.tokens = Tokens(MappedShards([d / s["file"] for s in man["shards"]], [s["tokens"] for s in man["shards"]],
                                                      man["dtype"]))
                except (OSError, ValueError) as e:
                    raise DataError(f"{field} {path}: a shard its manifest lists cannot be read ({e})") from e
                self.manifest_hash, self.tokenizer_hash = man["sha256"], man.get("tokenizerSha256", "")
            except (KeyError, TypeError) as e:  # a manifest of another tool or version, or hand-edited
                what = f"has no {e}" if isinstance(e, KeyError) else f"holds a value of the wrong type ({e})"
                raise DataError(f"{field} {path}: its manifest.json {what}; make the folder again with "
                                f"`python -m pretrain_trainer prepare --input TEXT_DIR --out {path}`") from e
        else:
            g = np.random.default_rng(seed)
            base = g.integers(0, vocab_size, size=97)
            noise = g.integers(0, vocab_size, size=synthetic_tokens)
            keep = g.random(synthetic_tokens) < 0.9
            self.tokens = Tokens([np.where(keep, np.resize(base, synthetic_tokens), noise).astype(np.int64)])
            self.manifest_hash, self.tokenizer_hash = "synthetic", "synthetic"


def holdout_tokens(total: int, seq_len: int) -> int:
    """How many of a stream's tokens are held out: the last 5%, at least 8 windows."""
    return max(total // 20, 8 * (seq_len + 1))


def split_holdout(tokens: Tokens, seq_len: int) -> tuple[Tokens, Tokens]:
    """The last 5% of the stream (at least 8 windows) is held out from training for `eval`."""
    n = holdout_tokens(len(tokens), seq_len)
    return tokens.part(None, -n), tokens.part(-n, None)


def synthetic_size(seq_len: int, global_batch: int, heldout_windows: int = 0) -> int:
    """The synthetic corpus' length: 65,536 tokens while they make a global batch of windows
    after the held-out part and `heldout_windows` held-out ones (so the corpus of every run that
    worked stays the same, token for token), else room for 4 global batches and the held-out
    windows (seqLen 4096 of a Llama preset left 7 windows for a batch of 8, and 8192 none; a
    validation of 32 windows of 128 tokens found 25 held out)."""
    def fits(n: int) -> bool:
        held = holdout_tokens(n, seq_len)
        return (n - held - 1) // seq_len >= global_batch and (held - 1) // seq_len >= heldout_windows

    if fits(n := 1 << 16):
        return n
    n = max((seq_len + 1) * (4 * global_batch + 8) * 20 // 19 + 1, 20 * (heldout_windows * seq_len + 1))
    assert fits(n), (seq_len, global_batch, heldout_windows)
    return n


def eval_batches(rows: torch.Tensor, per_forward: int = 1):
    """Held-out rows (`Blend.heldout_rows`) as (inputs, targets) pairs of `per_forward` rows."""
    for part in rows.split(per_forward):
        yield part[:, :-1], part[:, 1:]


def _window(tokens: Tokens, w: int, seq_len: int) -> np.ndarray:
    return np.asarray(tokens[w * seq_len:w * seq_len + seq_len + 1], dtype=np.int64)


class Blend:
    """The training data: one source, or several blended. Sample n (of the training, or of the
    held-out set) comes from the source k furthest below its share: the largest
    weight_k * (n + 1) - taken_k, the lowest k on a tie (Megatron's blending), so after any number
    of samples each source has given its share to within one sample, whatever the layout. One
    source is simply its own stream."""

    def __init__(self, sources: list[TokenSource], weights: list[float], seq_len: int, names: list[str] | None = None):
        names = names or ["data.path"] * len(sources)
        for name, src in zip(names[1:], sources[1:]):
            if src.tokenizer_hash != sources[0].tokenizer_hash:
                raise DataError(f"{name} was tokenized with another tokenizer than {names[0]}: prepare it with "
                                f"`--tokenizer <{names[0]}.path>/tokenizer.json`")
        total = sum(weights)
        self.sources, self.weights, self.seq = sources, [w / total for w in weights], seq_len
        self.train, self.held = zip(*(split_holdout(src.tokens, seq_len) for src in sources))
        self.windows = [(len(t) - 1) // seq_len for t in self.train]
        for name, n in zip(names, self.windows):
            if n < 1:
                raise DataError(f"{name}: too few tokens for one training window of data.seqLen ({seq_len}) "
                                f"after its held-out 5%")
        self.manifest_hash = sources[0].manifest_hash if len(sources) == 1 else hashlib.sha256(json.dumps(
            [[src.manifest_hash, w] for src, w in zip(sources, weights)]).encode()).hexdigest()

    def pick(self, taken: list[int]) -> int:
        """The source of the next sample, given how many each has given so far."""
        if len(taken) == 1:
            return 0
        n = sum(taken) + 1
        errors = [w * n - t for w, t in zip(self.weights, taken)]
        return errors.index(max(errors))

    def heldout_rows(self, count: int, strict: bool = True, keep: Callable[[int], bool] | None = None) -> torch.Tensor:
        """The first `count` held-out windows of the blend, in order, as rows of seqLen + 1 tokens
        (the inputs and their next tokens); when a source has too few, a DataError (`strict`) or
        the rows before it. `keep(i)`: only the i-th windows it accepts are read and returned (a
        data-parallel rank's slices: every rank held every window, for a long validation of a large
        model hundreds of MiB each); the check that there are `count` is the same."""
        taken = [0] * len(self.sources)
        rows = []
        for i in range(count):
            k = self.pick(taken)
            have = (len(self.held[k]) - 1) // self.seq
            if taken[k] >= have:
                if not strict:
                    break
                raise DataError(f"{count} held-out windows of data.seqLen ({self.seq}) asked for, but the held-out data "
                                f"(the last 5% of the token stream{' of source ' + str(k) if len(self.sources) > 1 else ''}) "
                                f"has {have}")
            if keep is None or keep(i):
                rows.append(torch.from_numpy(_window(self.held[k], taken[k], self.seq)))
            taken[k] += 1
        return torch.stack(rows) if rows else torch.zeros((0, self.seq + 1), dtype=torch.int64)


class Loader:
    """Global batches of `global_batch` windows; this rank's slice, cut into microbatches."""

    def __init__(self, blend: Blend, seq_len: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int, seed: int):
        self.blend, self.seq = blend, seq_len
        self.global_batch, self.micro = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        if len(blend.sources) == 1 and blend.windows[0] < global_batch:
            raise DataError(f"data: {len(blend.train[0])} training tokens make {blend.windows[0]} windows of data.seqLen "
                            f"({seq_len}), fewer than one global batch (data.globalBatchSize {global_batch})")
        self.position = 0  # global samples consumed
        self.taken = [0] * len(blend.sources)  # of them, from each source: with the position, the whole state
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def accum(self) -> int:
        return self.per_rank // self.micro

    def _index(self, k: int, sample: int) -> int:
        """Source k's `sample`-th window: its epochs each in an order of (seed, epoch[, k])."""
        epoch, i = divmod(sample, self.blend.windows[k])
        if self._perms.get(k, (-1,))[0] != epoch:
            key = [self.seed, epoch] if k == 0 else [self.seed, epoch, k]  # source 0: the one-source order
            self._perms[k] = epoch, np.random.default_rng(key).permutation(self.blend.windows[k])
        return int(self._perms[k][1][i])

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's microbatches of the next global batch, as (inputs, targets). Every rank picks
        the sources of the whole global batch (so all keep the same counts) and reads its slice."""
        picks = []
        for _ in range(self.global_batch):
            k = self.blend.pick(self.taken)
            picks.append((k, self.taken[k]))
            self.taken[k] += 1
        mine = picks[self.dp_rank * self.per_rank:(self.dp_rank + 1) * self.per_rank]
        t = torch.from_numpy(np.stack([_window(self.blend.train[k], self._index(k, i), self.seq) for k, i in mine]))
        self.position += self.global_batch
        return [(t[i:i + self.micro, :-1], t[i:i + self.micro, 1:]) for i in range(0, self.per_rank, self.micro)]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seqLen": self.seq, "manifest": self.blend.manifest_hash,
                "taken": list(self.taken)}

    def load_state_dict(self, st: dict) -> None:
        if st.get("manifest") not in (None, self.blend.manifest_hash):
            raise DataError("data: the checkpoint was made with other data (its manifest hash differs from this data.path's or "
                            "data.sources'): give the data it was trained on, or a new checkpoint.path to start afresh")
        # The position counts samples in the order of this seed, of windows of this length: with
        # another, training goes on from elsewhere in another order (samples seen again or never).
        # Said, not refused: a longer context or a new order can be a deliberate choice.
        for key, field, now in (("seed", "training.seed", self.seed), ("seqLen", "data.seqLen", self.seq)):
            if st.get(key) is not None and st[key] != now and self.dp_rank == 0:
                log.warning("%s is %s, the checkpoint's was %s: the data position (%d samples) is carried over, "
                            "but its samples are taken in another order or cut otherwise from here on; some may be "
                            "seen again, others not at all", field, now, st[key], int(st["position"]))
        self.position = int(st["position"])
        self.taken = [int(x) for x in st.get("taken", [self.position])]  # before blends: one source
