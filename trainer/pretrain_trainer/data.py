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
a run needs nothing on disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".yaml", ".yml", ".html")
SHARD_TOKENS = 1 << 22


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(input_dir: str, out_dir: str, vocab_size: int = 4096, tokenizer_path: str | None = None) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    src = Path(input_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise SystemExit(f"prepare: no text files ({', '.join(TEXT_SUFFIXES)}) under {src}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path:
        tok = Tokenizer.from_file(tokenizer_path)
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        texts = [p.read_text(errors="replace") for p in files]
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.save(str(out / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    if eot is None:
        eot = tok.get_vocab_size() - 1
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


class TokenSource:
    """All tokens of a prepared folder as one array (memory-mapped shards), or a synthetic corpus."""

    def __init__(self, path: str, vocab_size: int, seed: int, synthetic_tokens: int = 1 << 16):
        if path:
            d = Path(path)
            try:
                man = json.loads((d / "manifest.json").read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"data.path {path} is not a prepared folder ({type(e).__name__}: {e}); make one with "
                                f"`python -m pretrain_trainer prepare --input TEXT_DIR --out {path}`") from e
            if man["vocabSize"] > vocab_size:
                raise DataError(f"data: the tokenizer's vocabulary ({man['vocabSize']}) exceeds model.vocabSize ({vocab_size})")
            try:
                self.tokens = np.concatenate([np.memmap(d / s["file"], dtype=man["dtype"], mode="r") for s in man["shards"]])
            except (OSError, ValueError) as e:
                raise DataError(f"data.path {path}: a shard its manifest lists cannot be read ({e})") from e
            self.manifest_hash = man["sha256"]
        else:
            g = np.random.default_rng(seed)
            base = g.integers(0, vocab_size, size=97)
            noise = g.integers(0, vocab_size, size=synthetic_tokens)
            keep = g.random(synthetic_tokens) < 0.9
            self.tokens = np.where(keep, np.resize(base, synthetic_tokens), noise).astype(np.int64)
            self.manifest_hash = "synthetic"


def split_holdout(tokens, seq_len: int):
    """The last 5% of the stream (at least 8 windows) is held out from training for `eval`."""
    n = max(len(tokens) // 20, 8 * (seq_len + 1))
    return tokens[:-n], tokens[-n:]


def eval_batches(tokens, seq_len: int, max_windows: int = 32):
    """Held-out windows in order, as (inputs, targets) pairs of one row each."""
    rows = heldout_rows(tokens, seq_len, min((len(tokens) - 1) // seq_len, max_windows))
    for row in rows.split(1):
        yield row[:, :-1], row[:, 1:]


def heldout_rows(tokens, seq_len: int, count: int) -> torch.Tensor:
    """The first `count` held-out windows, in order, as rows of seq_len + 1 tokens (the inputs and
    their next tokens); a DataError when there are fewer."""
    have = (len(tokens) - 1) // seq_len
    if count > have:
        raise DataError(f"{count} held-out windows of data.seqLen ({seq_len}) asked for, but the held-out data "
                        f"(the last 5% of the token stream) has {have}")
    return torch.stack([torch.from_numpy(np.asarray(tokens[w * seq_len:w * seq_len + seq_len + 1], dtype=np.int64))
                        for w in range(count)]) if count else torch.zeros((0, seq_len + 1), dtype=torch.int64)


class Loader:
    """Global batches of `global_batch` windows; this rank's slice, cut into microbatches."""

    def __init__(self, source: TokenSource, seq_len: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int, seed: int):
        self.src, self.seq = source, seq_len
        self.tokens, _ = split_holdout(source.tokens, seq_len)
        self.global_batch, self.micro = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.windows = (len(self.tokens) - 1) // seq_len
        if self.windows < global_batch:
            raise SystemExit(f"data: {len(self.tokens)} training tokens make {self.windows} windows of {seq_len}, fewer than one global batch ({global_batch})")
        self.position = 0  # global samples consumed: the whole state
        self._perm_epoch = -1
        self._perm = None

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def accum(self) -> int:
        return self.per_rank // self.micro

    def _index(self, sample: int) -> int:
        epoch, i = divmod(sample, self.windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's microbatches of the next global batch, as (inputs, targets)."""
        start = self.position + self.dp_rank * self.per_rank
        rows = []
        for s in range(start, start + self.per_rank):
            w = self._index(s) * self.seq
            rows.append(np.asarray(self.tokens[w:w + self.seq + 1], dtype=np.int64))
        self.position += self.global_batch
        t = torch.from_numpy(np.stack(rows))
        return [(t[i:i + self.micro, :-1], t[i:i + self.micro, 1:]) for i in range(0, self.per_rank, self.micro)]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "manifest": self.src.manifest_hash}

    def load_state_dict(self, st: dict) -> None:
        if st.get("manifest") not in (None, self.src.manifest_hash):
            raise SystemExit("data: the checkpoint was made with other data (manifest hash differs)")
        self.position = int(st["position"])
