"""`prepare` is deterministic and its manifest changes when one input byte does; the loader's
order is a pure function of the seed and its slices partition each global batch; data that cannot
be used (a missing or too small folder, a manifest without a key, a checkpoint of other data) is a
permanent error naming the field; a resume with another seed or window length says so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("tokenizers", reason="the trainer extra is installed by `make test`")
pytest.importorskip("torch", reason="the trainer extra is installed by `make test`")


def _corpus(d: Path) -> Path:
    src = d / "src"
    src.mkdir()
    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        (src / f.name).write_text(f.read_text())
    return src


def _prepare(src: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(out),
                    "--vocab-size", "300"], check=True, capture_output=True)
    return json.loads((out / "manifest.json").read_text())


def test_prepare_is_deterministic_and_its_manifest_tracks_every_input_byte(tmp_path):
    src = _corpus(tmp_path)
    a, b = _prepare(src, tmp_path / "a"), _prepare(src, tmp_path / "b")
    assert a == b
    for f in ["tokenizer.json"] + [s["file"] for s in a["shards"]]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert a["totalTokens"] > 1000 and len(a["files"]) == len(list(src.glob("*.py")))
    target = sorted(src.glob("*.py"))[0]
    data = bytearray(target.read_bytes())
    data[10] = (data[10] + 1) % 128
    target.write_bytes(bytes(data))
    c = _prepare(src, tmp_path / "c")
    assert c["sha256"] != a["sha256"]
    changed = [f["path"] for f, g in zip(a["files"], c["files"]) if f["sha256"] != g["sha256"]]
    assert changed == [target.name]


def test_prepare_leaves_out_an_out_folder_inside_its_input_and_separates_documents_with_a_real_end_of_text(tmp_path):
    # --out inside --input: the second run read the first one's manifest and tokenizer as text
    # (other tokens, another hash: its checkpoints refused as other data).
    src = _corpus(tmp_path)
    a, b = _prepare(src, src / "prepared"), _prepare(src, src / "prepared")
    assert a == b and not [f for f in a["files"] if f["path"].startswith("prepared")]
    # A given tokenizer's end-of-text under another name (Llama 2's </s>) separates the documents;
    # without one, `prepare` refuses (the last id, an ordinary subword, stood in for it).
    from tokenizers import Tokenizer
    tok = json.loads((src / "prepared" / "tokenizer.json").read_text())
    for t in tok["added_tokens"]:
        t["content"] = "</s>"
    tok["model"]["vocab"]["</s>"] = tok["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "renamed.json").write_text(json.dumps(tok))
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(tmp_path / "r"),
                        "--tokenizer", str(tmp_path / "renamed.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["eot"] == Tokenizer.from_file(str(tmp_path / "renamed.json")).token_to_id("</s>")
    tok["added_tokens"] = []
    del tok["model"]["vocab"]["</s>"]
    (tmp_path / "none.json").write_text(json.dumps(tok))
    for given, said in ((tmp_path / "none.json", "has no end-of-text token to separate documents with (one of <|endoftext|>"),
                        (tmp_path / "missing.json", f"--tokenizer {tmp_path / 'missing.json'} cannot be read as a tokenizer.json")):
        r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(tmp_path / "n"),
                            "--tokenizer", str(given)], capture_output=True, text=True)
        assert r.returncode != 0 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "n").exists()


def test_a_given_tokenizers_truncation_and_padding_do_not_cut_or_pad_the_documents(tmp_path):
    # A tokenizer.json saved by a fine-tuning script keeps its truncation and padding: each file
    # came out 16 tokens long, padded or cut, and the manifest said nothing of it.
    from tokenizers import Tokenizer
    src = _corpus(tmp_path)
    plain = _prepare(src, tmp_path / "plain")
    tok = Tokenizer.from_file(str(tmp_path / "plain" / "tokenizer.json"))
    tok.enable_truncation(16)
    tok.enable_padding(length=16, pad_id=0)
    tok.save(str(tmp_path / "cut.json"))
    r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "prepare", "--input", str(src), "--out", str(tmp_path / "given"),
                        "--tokenizer", str(tmp_path / "cut.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    given = json.loads((tmp_path / "given" / "manifest.json").read_text())
    assert given["totalTokens"] == plain["totalTokens"] > 16 * len(plain["files"])
    assert [f["tokens"] for f in given["files"]] == [f["tokens"] for f in plain["files"]]
    for s in plain["shards"]:
        assert (tmp_path / "given" / s["file"]).read_bytes() == (tmp_path / "plain" / s["file"]).read_bytes()


def test_the_loader_partitions_each_global_batch_over_data_parallel_ranks(tmp_path):
    import torch
    from pretrain_trainer.data import Blend, Loader, TokenSource
    src = Blend([TokenSource("", 512, seed=7)], [1.0], 16)
    whole = Loader(src, 16, 8, 2, 0, 1, seed=7).next_batch()
    parts = [Loader(src, 16, 8, 2, r, 2, seed=7).next_batch() for r in range(2)]
    rows = torch.cat([x for x, _ in whole])
    assert torch.equal(rows, torch.cat([x for p in parts for x, _ in p]))
    other = Loader(Blend([TokenSource("", 512, seed=8)], [1.0], 16), 16, 8, 2, 0, 1, seed=8).next_batch()
    assert not torch.equal(rows, torch.cat([x for x, _ in other]))


def test_shards_are_read_where_a_window_falls_never_copied_into_memory_whole(tmp_path, monkeypatch):
    # A 100 GB corpus cannot be read into every rank's memory: the shards stay memory-mapped, and a
    # window across a shard boundary reads the same tokens as a single shard would hold.
    import tracemalloc

    import numpy as np
    import torch
    from pretrain_trainer import data
    src = _corpus(tmp_path)
    data.prepare(str(src), str(tmp_path / "one"), vocab_size=300)
    monkeypatch.setattr(data, "SHARD_TOKENS", 997)  # many shards, boundaries at odd places
    data.prepare(str(src), str(tmp_path / "many"), vocab_size=300)
    one, many = (data.TokenSource(str(tmp_path / d), 512, seed=0) for d in ("one", "many"))
    shards = json.loads((tmp_path / "many" / "manifest.json").read_text())["shards"]
    assert len(shards) > 10 and len(one.tokens) == len(many.tokens) == sum(s["tokens"] for s in shards)
    whole = one.tokens[:]
    for a in range(0, len(whole), 331):
        assert np.array_equal(many.tokens[a:a + 700], whole[a:a + 700])
    blends = [data.Blend([s], [1.0], 32) for s in (one, many)]
    loaders = [data.Loader(b, 32, 8, 2, 0, 1, seed=3) for b in blends]
    for _ in range(20):
        x, y = (torch.cat([t for t, _ in ld.next_batch()]) for ld in loaders)
        assert torch.equal(x, y)
    assert torch.equal(blends[0].heldout_rows(8), blends[1].heldout_rows(8))
    # A data-parallel rank reads only its slices of the held-out batches (rank 1 of 2, batches of 4).
    whole_rows = blends[0].heldout_rows(8)
    assert torch.equal(blends[0].heldout_rows(8, keep=lambda i: i % 4 // 2 == 1), whole_rows[[2, 3, 6, 7]])
    # An 8 MB folder by hand (the same format): opening it and reading windows allocates a small
    # fraction of that (numpy reports its allocations to tracemalloc; memory-mapped pages are not allocations).
    big = tmp_path / "big"
    big.mkdir()
    tokens = np.random.default_rng(0).integers(0, 512, size=1 << 22).astype(np.uint16)
    cuts = [0, 1, 600_000, 600_001, 2_000_000, 3_500_000, 1 << 22]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        tokens[a:b].tofile(big / f"tokens-{i:05d}.bin")
    (big / "manifest.json").write_text(json.dumps({
        "vocabSize": 512, "dtype": "uint16", "sha256": "big", "totalTokens": len(tokens),
        "shards": [{"file": f"tokens-{i:05d}.bin", "tokens": b - a} for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]}))
    tracemalloc.start()
    try:
        blend = data.Blend([data.TokenSource(str(big), 512, seed=0)], [1.0], 1024)
        loader = data.Loader(blend, 1024, 8, 8, 0, 1, seed=0)
        rows = [loader.next_batch() for _ in range(3)] + [blend.heldout_rows(8)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < tokens.nbytes // 20, f"{peak} bytes allocated opening a {tokens.nbytes}-byte corpus"
    train = blend.train[0]
    for a in cuts[1:-1]:  # windows across each boundary
        assert np.array_equal(train[a - 5:a + 5], tokens[a - 5:a + 5])
    assert len(rows) == 4 and len(train) + len(blend.held[0]) == len(tokens)
    assert np.array_equal(blend.held[0][:], tokens[len(train):])


def test_a_corpus_of_more_shards_than_a_containers_file_descriptors_reads_with_a_few_open(tmp_path):
    # Each memory-mapped shard holds a file descriptor: a 100 GB corpus has about 12,800 shards at
    # the default size, and a container's soft limit is often 1024. 300 shards under a limit of 200.
    import numpy as np
    d = tmp_path / "many"
    d.mkdir()
    tokens = np.random.default_rng(0).integers(0, 512, size=300 * 50).astype(np.uint16)
    for i in range(300):
        tokens[i * 50:(i + 1) * 50].tofile(d / f"tokens-{i:05d}.bin")
    (d / "manifest.json").write_text(json.dumps({
        "vocabSize": 512, "dtype": "uint16", "sha256": "many", "totalTokens": len(tokens),
        "shards": [{"file": f"tokens-{i:05d}.bin", "tokens": 50} for i in range(300)]}))
    np.save(tmp_path / "want.npy", tokens)
    script = f"""
import resource, sys, numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from pretrain_trainer.data import Blend, Loader, TokenSource
src = TokenSource({str(d)!r}, 512, seed=0)
want = np.load({str(tmp_path / "want.npy")!r})
assert np.array_equal(src.tokens[:], want)  # every shard, in one read
for a in range(0, len(want) - 120, 37):
    assert np.array_equal(src.tokens[a:a + 120], want[a:a + 120])
loader = Loader(Blend([src], [1.0], 32), 32, 8, 2, 0, 1, seed=0)
for _ in range(30):
    loader.next_batch()
print("read", len(want))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0 and "read 15000" in r.stdout, r.stderr[-2000:]
    # A shard that does not hold what the manifest says is found at the start, naming it.
    (d / "tokens-00007.bin").write_bytes(b"xx")
    from pretrain_trainer.data import DataError, TokenSource
    with pytest.raises(DataError, match="tokens-00007.bin has 2 bytes, its manifest says 50 uint16 tokens"):
        TokenSource(str(d), 512, seed=0)


def test_data_that_cannot_be_used_is_a_permanent_error_that_names_data_path(tmp_path):
    # Exit 85: the operator fails the job at once instead of retrying a run that cannot succeed.
    from pretrain_operator import contract as c
    from tests.trainer_util import cmd, env, free_port, write_config
    prepared = tmp_path / "prepared"
    _prepare(_corpus(tmp_path), prepared)  # a 300-token vocabulary
    other = tmp_path / "other-manifest"  # of another tool or version: exit 1 with a bare KeyError before
    shutil.copytree(prepared, other)
    manifest = json.loads((other / "manifest.json").read_text())
    del manifest["dtype"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    for name, path, vocab, says in (
            ("missing", tmp_path / "nowhere", 512, f"data.path {tmp_path / 'nowhere'} is not a prepared folder"),
            ("too-big", prepared, 256, "the tokenizer's vocabulary (300) exceeds model.vocabSize (256); prepare it again with `--vocab-size 256`"),
            ("no-dtype", other, 512, f"data.path {other}: its manifest.json has no 'dtype'")):
        d = tmp_path / name
        d.mkdir()
        data_spec = {"seqLen": 32, "globalBatchSize": 4, "microBatchSize": 2, "path": str(path)}
        cfg = write_config(d, nproc=2, data=2, extra={"data": data_spec, "model": {"preset": "tiny", "vocabSize": vocab}})
        message = d / "termination-log"
        # Two ranks through the pods' launcher (plain torchrun would turn 85 into 1).
        r = subprocess.run(cmd(cfg, 2, d / "losses.txt", launch=True), capture_output=True, text=True, timeout=120,
                           env={**env(), "PET_NPROC_PER_NODE": "2", "PET_MASTER_PORT": free_port(),
                                c.ENV_TERMINATION_MESSAGE: str(message)})
        assert r.returncode == c.EXIT_PERMANENT, r.stderr[-2000:]
        assert says in r.stderr, r.stderr[-2000:]
        # The container's termination message: the error of the rank that wrote first, whole (both failed).
        error = json.loads(message.read_text())["error"]
        assert error.split(": ", 1)[0] in ("rank 0", "rank 1") and says in error, error


def test_a_checkpoint_of_other_data_or_too_little_data_is_a_permanent_error(tmp_path):
    # Exit 85, not 1: a retry would meet the same data (before, SystemExit with a message: exit 1).
    from tests.trainer_util import env, write_config
    prepared = tmp_path / "prepared"
    _prepare(_corpus(tmp_path), prepared)

    def train(cfg) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)], env=env(),
                              capture_output=True, text=True, timeout=120)

    assert train(write_config(tmp_path, steps=2, interval=2)).returncode == 0  # synthetic data, checkpoint at step 2
    r = train(write_config(tmp_path, steps=4, extra={"data": {"path": str(prepared), "seqLen": 32, "globalBatchSize": 4}}))
    assert r.returncode == 85 and "the checkpoint was made with other data" in r.stderr, r.stderr[-2000:]
    few = tmp_path / "few"
    few.mkdir()
    r = train(write_config(few, steps=2, extra={"data": {"path": str(prepared), "seqLen": 32, "globalBatchSize": 100000,
                                                         "microBatchSize": 1}}))
    assert r.returncode == 85 and "fewer than one global batch (data.globalBatchSize 100000)" in r.stderr, r.stderr[-2000:]


def test_a_resume_with_another_seed_or_window_length_says_the_data_order_changes(tmp_path):
    # The position counts samples of this seed's order and this window length: with another, the
    # run goes on from elsewhere in the data without a word (samples seen again, others never).
    from tests.trainer_util import env, write_config

    def train(seq_len: int = 32, **training) -> subprocess.CompletedProcess:
        cfg = write_config(tmp_path, steps=training.pop("steps"), interval=2,
                           extra={"training": training, "data": {"seqLen": seq_len}})
        r = subprocess.run([sys.executable, "-m", "pretrain_trainer", "train", "--config", str(cfg)], env=env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    train(steps=2, seed=1, logEverySteps=1)
    r = train(steps=4, seed=1, logEverySteps=1)
    assert "the checkpoint's was" not in r.stderr
    r = train(steps=6, seed=2, logEverySteps=1)
    assert "training.seed is 2, the checkpoint's was 1: the data position (16 samples) is carried over" in r.stderr
    assert "data.seqLen" not in r.stderr
    r = train(steps=8, seed=2, logEverySteps=1, seq_len=16)
    assert "data.seqLen is 16, the checkpoint's was 32: the data position (24 samples) is carried over" in r.stderr
    assert "training.seed" not in r.stderr


def test_the_synthetic_corpus_serves_a_llama_presets_long_windows_and_stays_the_same_where_it_already_did():
    # 65,536 tokens, 5% (at least 8 windows) held out: seqLen 4096 left 7 windows for a batch of
    # 8, and 8192 none ("data.path: too few tokens", of a data.path left empty).
    import numpy as np
    from pretrain_operator import api
    from pretrain_trainer.data import Loader, TokenSource
    from pretrain_trainer.train import open_data
    for seq, batch in ((4096, 8), (8192, 8), (8192, 64)):
        spec = api.PretrainJobSpec.model_validate({"model": {"preset": "llama3-8b"}, "data": {"seqLen": seq, "globalBatchSize": batch}})
        blend = open_data(spec, 128256)
        x, y = Loader(blend, seq, batch, 1, 0, 1, 1).next_batch()[0]
        assert x.shape == (1, seq) and blend.windows[0] >= 4 * batch and len(blend.heldout_rows(8)) == 8
    tiny = api.PretrainJobSpec.model_validate({"model": {"preset": "tiny"}, "data": {"seqLen": 32, "globalBatchSize": 4}})
    assert np.array_equal(open_data(tiny, 512).sources[0].tokens[:], TokenSource("", 512, 1234).tokens[:])  # a resume sees the same
    # A validation of more windows than 5% of 65,536 tokens hold (25 of 128): the synthetic corpus grows to hold them.
    from pretrain_trainer.validation import windows
    checked = api.PretrainJobSpec.model_validate({"model": {"preset": "tiny"}, "data": {"seqLen": 128, "globalBatchSize": 32},
                                                  "validation": {"everySteps": 1}})
    assert len(open_data(checked, 512).heldout_rows(windows(checked))) == windows(checked) == 32
    small = api.PretrainJobSpec.model_validate({**checked.model_dump(), "validation": {"everySteps": 1}, "data": {"seqLen": 32, "globalBatchSize": 4}})
    assert np.array_equal(open_data(small, 512).sources[0].tokens[:], TokenSource("", 512, 1234).tokens[:])
