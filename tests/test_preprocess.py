"""Corpus tokenization (issue #27, megatron_slim.engines.preprocess_job and megatron_slim.data.corpus/manifest): every
input format yields the token stream of the same documents as JSON lines, any number of workers writes the same
bytes, shards merged in order equal the unsharded dataset (also after a shard is killed and redone), manifests
count what the datasets hold, and bad inputs fail with the file and the record.

| case                                                                   | test                                       |
|------------------------------------------------------------------------|--------------------------------------------|
| .jsonl, JSON lines named .json, .gz, multi-frame .zst, parquet, HF dir | test_every_format_gives_the_jsonl_tokens    |
| --workers 2 vs 1 (HF fast tokenizer; forked and spawned workers)       | test_workers_write_identical_bytes         |
| a plain file's byte-span batches hold the lines a reader reads         | test_span_batches_hold_the_lines_read      |
| --workers 2 vs 1 (sentencepiece .model)                                | test_sentencepiece_tokenizer_in_workers    |
| a worker SIGKILLed mid-run fails the run at once; a worker's error     | test_dead_worker_fails_the_run_at_once     |
| --shard 0/3..2/3 + merge-datasets                                      | test_shards_merged_equal_unsharded         |
| a shard killed (SIGKILL) midway, rerun, merge                          | test_killed_shard_is_redone_and_merge_...  |
| --shard auto under a SLURM array (ids starting at 1)                   | test_shard_auto_reads_the_slurm_array      |
| manifest counts, blend recipe                                          | test_manifest_counts_and_blend             |
| truncated gzip, damaged/null parquet, bad JSON, --skip-bad             | test_bad_records_name_file_and_record      |
| --input a --input b, a directory, a glob                               | test_repeated_inputs_globs_directories     |
| existing prefix, input == output, --eod-id outside vocab, rerun        | test_outputs_are_claimed_safely            |
| numpy .bin/.idx writer vs megatron-core's IndexedDatasetBuilder        | test_indexed_writer_writes_megatron_bytes  |
| tokenizer spec cache: read back, rebuilt when a tokenizer file changes | test_tokenizer_spec_cache                  |
"""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_slim.cli import main as cli_main
from megatron_slim.engines.preprocess_job import PreprocessJob, merge_datasets, parse_shard, run_preprocess
from megatron_slim.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EOS = 256  # the byte tokenizer's <eos>


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "δέλτα", "ε", "zeta\tη", "\"quoted\"", "日本"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) + f" #{i}" for i in range(n)]


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.hf_checkpoints import byte_tokenizer

    path = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save_pretrained(path)
    return path


def _run(tok: Path, inputs: list[Path | str], prefix: Path, **kw) -> dict:
    return run_preprocess(PreprocessJob(inputs=tuple(str(i) for i in inputs), output_prefix=str(prefix),
                                        tokenizer=str(tok), progress=False, **kw))


def _read(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), mmap=True)
    return [ds[i].tolist() for i in range(len(ds))]


def _bytes(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_every_format_gives_the_jsonl_tokens(tok: Path, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from transformers import AutoTokenizer

    docs = _docs(60)
    ref = _jsonl(tmp_path / "ref.jsonl", docs)
    _run(tok, [ref], tmp_path / "ref")
    expected = _read(tmp_path / "ref")
    hf = AutoTokenizer.from_pretrained(str(tok))  # the batch path equals HF's per-document call
    assert expected == [hf(d, add_special_tokens=False)["input_ids"] + [EOS] for d in docs]

    (tmp_path / "named.json").write_bytes(ref.read_bytes())  # JSON lines named .json: read as JSON, not text
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(ref.read_bytes())
    raw = ref.read_bytes()
    half = raw.index(b"\n", len(raw) // 2) + 1  # two zstd frames, as parallel compressors write
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "c.jsonl.zst").write_bytes(cctx.compress(raw[:half]) + cctx.compress(raw[half:]))
    pq.write_table(pa.table({"id": list(range(60)), "text": docs}), tmp_path / "c.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "hf"), max_shard_size="2KB")
    (tmp_path / "plain.data").write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    cases = {"named.json": {}, "c.jsonl.gz": {}, "c.jsonl.zst": {}, "c.parquet": {}, "hf": {"column": "content"},
             "plain.data": {"format": "text"}}
    assert len(list((tmp_path / "hf").glob("*.arrow"))) > 1
    for name, kw in cases.items():
        manifest = _run(tok, [tmp_path / name], tmp_path / f"out_{name}", batch_size=16, **kw)
        assert _read(tmp_path / f"out_{name}") == expected, name
        assert manifest["inputs"][0]["format"] == ("text" if name == "plain.data" else
                                                   "parquet" if name == "c.parquet" else "hf" if name == "hf"
                                                   else "jsonl"), name
    with pytest.raises(UserError, match="cannot tell its format.*--format text"):
        _run(tok, [tmp_path / "plain.data"], tmp_path / "never")


def test_workers_write_identical_bytes(tok: Path, tmp_path: Path) -> None:
    """Two workers write what one writes: forked (the CLI, one thread) and spawned (a caller holding a thread), fed
    byte spans (plain files, one with a blank line and no final line end) and read lines (gzip)."""
    import threading

    files = [_jsonl(tmp_path / f"part{i}.jsonl", _docs(150, seed=i)) for i in range(3)]
    text = files[0].read_text(encoding="utf-8").splitlines(keepends=True)
    files[0].write_text("".join(text[:5]) + "\n" + "".join(text[5:]).rstrip("\n"), encoding="utf-8")
    with gzip.open(tmp_path / "part1.jsonl.gz", "wb") as f:
        f.write(files[1].read_bytes())
    files[1] = tmp_path / "part1.jsonl.gz"
    _run(tok, files, tmp_path / "one", batch_size=8)
    argv = [sys.executable, "-m", "megatron_slim.cli", "preprocess", *(x for f in files for x in ("--input", str(f))),
            "--output-prefix", str(tmp_path / "forked"), "--tokenizer", str(tok), "--batch-size", "8", "--workers",
            "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(argv, env=env, check=True, capture_output=True)
    release = threading.Event()
    held = threading.Thread(target=release.wait)  # a thread of the caller's: fork would be unsafe, so spawned
    held.start()
    try:
        _run(tok, files, tmp_path / "spawned", batch_size=8, workers=2)
    finally:
        release.set()
        held.join()
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "forked") == _bytes(tmp_path / "spawned")
    assert len(_read(tmp_path / "one")) == 450


def test_span_batches_hold_the_lines_read(tmp_path: Path) -> None:
    """An uncompressed file's batches, byte spans the encoder reads itself, hold exactly the records (line numbers
    and bytes) that reading it line by line gives (the gzip reader, as for compressed input): for lines longer than
    a batch, a batch full by records, small tail pieces, blank lines and a last line without its end."""
    from megatron_slim.data.corpus import detect, read_batches

    lines = [b'{"text": "%s"}\n' % (b"x" * (i * 37 % 300)) for i in range(200)]
    lines[7] = lines[50] = b"\n"
    lines[90] = b"   \r\n"
    lines[-1] = lines[-1].rstrip(b"\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(b"".join(lines))
    with gzip.open(tmp_path / "plain.jsonl.gz", "wb") as f:
        f.write(plain.read_bytes())
    want = [(n, item) for b in read_batches(0, detect(tmp_path / "plain.jsonl.gz"), "text")
            for n, item in zip(b.numbers, b.items)]
    assert len(want) == 197
    f = detect(plain)
    for max_items, max_bytes, tail in ((512, 100, None), (9, 4096, None), (512, 2000, (f.size // 2, 150))):
        batches = list(read_batches(0, f, "text", max_items, max_bytes, tail))
        assert all(b.span is not None and not b.items for b in batches)
        assert sum(b.input_bytes for b in batches) == f.size
        assert max(len(b.load().items) for b in batches) <= max_items
        got = [(n, item) for b in batches for n, item in zip(b.load().numbers, b.load().items)]
        assert got == want, (max_items, max_bytes, tail)


def test_shards_merged_equal_unsharded(tok: Path, tmp_path: Path) -> None:
    files = [_jsonl(tmp_path / f"part{i}.jsonl", _docs(10 + 7 * i, seed=i)) for i in range(5)]
    _run(tok, files, tmp_path / "all")
    shards = []
    for i in range(3):
        m = _run(tok, files, tmp_path / "sh", shard=f"{i}/3")
        shards.append(str(tmp_path / f"sh-{i:05d}-of-00003"))
        assert m["shard"] == {"index": i, "count": 3} and m["documents"] > 0
    merged = merge_datasets(shards, str(tmp_path / "merged"))
    assert _bytes(tmp_path / "merged") == _bytes(tmp_path / "all")
    assert [s["documents"] for s in merged["shards"]] == [len(_read(Path(s))) for s in shards]
    assert [i["path"] for i in merged["inputs"]] == [str(f.resolve()) for f in files]
    with pytest.raises(UserError, match="6 shards but only 5 input files"):
        _run(tok, files, tmp_path / "sh", shard="0/6")


def test_shard_auto_reads_the_slurm_array() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard("auto", env) == (2, 3)
    assert parse_shard("auto", {**env, "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_ID": "3"}) == (0, 3)
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(UserError, match="needs a SLURM array task"):
        parse_shard("auto", {})
    with pytest.raises(UserError, match="outside 0..2"):
        parse_shard("auto", {**env, "SLURM_ARRAY_TASK_MIN": "0"})


def test_killed_shard_is_redone_and_merge_is_identical(tok: Path, tmp_path: Path) -> None:
    """Shard 1 is SIGKILLed while writing; the rerun of the array skips shard 0 (done) and rewrites shard 1."""
    files = [_jsonl(tmp_path / "a.jsonl", _docs(50)), _jsonl(tmp_path / "b.jsonl", _docs(12000, seed=1))]
    _run(tok, files, tmp_path / "all", batch_size=64)
    _run(tok, files, tmp_path / "sh", shard="0/2")
    done_at = Path(f"{tmp_path}/sh-00000-of-00002.bin").stat().st_mtime_ns
    argv = [sys.executable, "-m", "megatron_slim.cli", "preprocess", "--input", str(files[0]), "--input",
            str(files[1]), "--output-prefix", str(tmp_path / "sh"), "--tokenizer", str(tok), "--shard", "1/2",
            "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    # the staging file exists from the claim (before the first batch) to the rename (after the last)
    while time.time() < deadline and proc.poll() is None:
        if list(tmp_path.glob(".sh-00001-of-00002.bin.*.partial")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the shard finished before it could be killed"
    assert not Path(f"{tmp_path}/sh-00001-of-00002.bin").exists()  # no half dataset under the real name
    assert list(tmp_path.glob(".sh-00001-of-00002.bin.*.partial"))  # what a kill leaves behind
    for i in range(2):  # the array submitted again
        _run(tok, files, tmp_path / "sh", shard=f"{i}/2", batch_size=64)
    assert Path(f"{tmp_path}/sh-00000-of-00002.bin").stat().st_mtime_ns == done_at  # skipped, not rewritten
    assert not list(tmp_path.glob(".sh-*.partial"))  # the killed task's staging files are gone
    merge_datasets([str(tmp_path / f"sh-{i:05d}-of-00002") for i in range(2)], str(tmp_path / "merged"))
    assert _bytes(tmp_path / "merged") == _bytes(tmp_path / "all")


def test_manifest_counts_and_blend(tok: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from megatron_slim.data.manifest import read_manifest

    a = _jsonl(tmp_path / "a.jsonl", _docs(30))
    b = _jsonl(tmp_path / "b.jsonl", _docs(90, seed=2))
    for name, path in (("A", a), ("B", b)):
        _run(tok, [path], tmp_path / name)
        m = read_manifest(tmp_path / name)
        docs = _read(tmp_path / name)
        assert (m.documents, m.tokens, m.skipped) == (len(docs), sum(map(len, docs)), 0)
        assert m.data["inputs"][0]["size"] == path.stat().st_size
    capsys.readouterr()
    assert cli_main(["blend", "--manifest", str(tmp_path / "A.manifest.json"), "--manifest", str(tmp_path / "B"),
                     "--weights", "tokens"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tokens = [read_manifest(tmp_path / n).tokens for n in "AB"]
    assert lines[:2] == ["data:", "  train:"]
    assert lines[2].startswith(f"    - [{round(tokens[0] / sum(tokens), 6)}, \"{tmp_path / 'A'}\"]")
    assert cli_main(["blend", "--manifest", str(tmp_path / "A"), "--manifest", str(tmp_path / "B"),
                     "--weights", "3,1"]) == 0
    assert "[0.75," in capsys.readouterr().out
    assert cli_main(["blend", "--manifest", str(tmp_path / "A"), "--weights", "1,2"]) == 2
    assert "2 weights for 1 manifests" in capsys.readouterr().err


def test_bad_records_name_file_and_record(tok: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(400)
    raw = _jsonl(tmp_path / "ok.jsonl", docs).read_bytes()
    gz = gzip.compress(raw)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz:\d+: corrupt gzip data"):
        _run(tok, [tmp_path / "cut.jsonl.gz"], tmp_path / "o1")
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), tmp_path / "null.parquet")
    with pytest.raises(UserError, match=r"null\.parquet:row 1: expected text or a list of token ids, got NoneType"):
        _run(tok, [tmp_path / "null.parquet"], tmp_path / "o2")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(UserError, match=r"broken\.parquet: not a readable parquet file"):
        _run(tok, [tmp_path / "broken.parquet"], tmp_path / "o3")
    with pytest.raises(UserError, match=r"null\.parquet: no column 'body' \(columns: text\)"):
        _run(tok, [tmp_path / "null.parquet"], tmp_path / "o4", column="body")
    lines = raw.decode().splitlines()
    lines[4] = '{"text": "unterminated'
    lines[9] = '{"other": 1}'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:5: not valid JSON"):
        _run(tok, [tmp_path / "bad.jsonl"], tmp_path / "o5")
    with pytest.raises(UserError, match=r"bad\.jsonl:10: expected a JSON object .*more than --skip-bad 1"):
        _run(tok, [tmp_path / "bad.jsonl"], tmp_path / "o6", skip_bad=1)
    m = _run(tok, [tmp_path / "bad.jsonl"], tmp_path / "o7", skip_bad=2)
    assert (m["skipped"], m["documents"]) == (2, 398)
    assert _read(tmp_path / "o7") == [r for i, r in enumerate(_read_ref(tok, tmp_path, docs)) if i not in (4, 9)]
    for prefix in ("o1", "o2", "o3", "o5", "o6"):  # failed jobs leave nothing
        assert not list(tmp_path.glob(f"{prefix}*")) and not list(tmp_path.glob(f".{prefix}*"))


def _read_ref(tok: Path, tmp_path: Path, docs: list[str]) -> list[list[int]]:
    _run(tok, [_jsonl(tmp_path / "ref.jsonl", docs)], tmp_path / "ref")
    return _read(tmp_path / "ref")


def test_repeated_inputs_globs_directories(tok: Path, tmp_path: Path) -> None:
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    parts = [_jsonl(tmp_path / "corpus" / "b.jsonl", _docs(5, 1)), _jsonl(tmp_path / "corpus" / "a.jsonl", _docs(4)),
             _jsonl(tmp_path / "corpus" / "sub" / "c.jsonl", _docs(3, 2))]
    (tmp_path / "corpus" / ".hidden").write_text("not data")
    assert cli_main(["preprocess", "--input", str(parts[0]), "--input", str(parts[1]), "--output-prefix",
                     str(tmp_path / "two"), "--tokenizer", str(tok), "--no-progress"]) == 0
    assert len(_read(tmp_path / "two")) == 9  # both files, not only the last
    _run(tok, [tmp_path / "corpus"], tmp_path / "dir")  # sorted: a, b, sub/c
    _run(tok, [parts[1], parts[0], parts[2]], tmp_path / "listed")
    assert _bytes(tmp_path / "dir") == _bytes(tmp_path / "listed")
    _run(tok, [str(tmp_path / "corpus" / "*.jsonl")], tmp_path / "glob")
    assert len(_read(tmp_path / "glob")) == 9
    with pytest.raises(FileNotFoundError, match="matches no file"):
        _run(tok, [str(tmp_path / "*.parquet")], tmp_path / "none")
    with pytest.raises(UserError, match="twice"):
        _run(tok, [tmp_path / "corpus", parts[0]], tmp_path / "dup")


def test_outputs_are_claimed_safely(tok: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The preprocess cases of issue #28: an existing prefix is neither truncated nor mixed with a new .bin, the
    input cannot be the output, and an end-of-document id outside the vocabulary is refused, not wrapped."""
    a, b = _jsonl(tmp_path / "a.jsonl", _docs(20)), _jsonl(tmp_path / "b.jsonl", _docs(30, seed=3))
    _run(tok, [a], tmp_path / "corpus")
    before = _bytes(tmp_path / "corpus")
    _run(tok, [a], tmp_path / "corpus")  # the same job again: skipped
    assert "already done" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(tok, [b], tmp_path / "corpus")
    assert _bytes(tmp_path / "corpus") == before
    _run(tok, [b], tmp_path / "corpus", overwrite=True)
    assert len(_read(tmp_path / "corpus")) == 30
    for fmt in ("auto", "text"):
        with pytest.raises(UserError, match="is the input"):
            _run(tok, [tmp_path / "corpus.bin"], tmp_path / "corpus", overwrite=True, format=fmt)
    assert len(_read(tmp_path / "corpus")) == 30
    with pytest.raises(UserError, match="end-of-document id 70000 is outside the vocabulary of 257"):
        _run(tok, [a], tmp_path / "wrapped", eod_id=70000)
    with pytest.raises(UserError, match="--tokenizer none needs --vocab-size"):
        run_preprocess(PreprocessJob(inputs=(str(a),), output_prefix=str(tmp_path / "x"), tokenizer="none"))


def test_sentencepiece_tokenizer_in_workers(tmp_path: Path) -> None:
    """A sentencepiece .model tokenizes in the workers as it does per document in-process."""
    import sentencepiece as spm

    docs = _docs(200)
    (tmp_path / "train.txt").write_text("\n".join(docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    src = _jsonl(tmp_path / "docs.jsonl", docs)
    for workers in (1, 2):
        _run(tmp_path / "sp.model", [src], tmp_path / f"w{workers}", workers=workers, batch_size=16)
    assert _read(tmp_path / "w1") == [sp.encode(d) + [sp.eos_id()] for d in docs]
    assert _bytes(tmp_path / "w1") == _bytes(tmp_path / "w2")


def test_dead_worker_fails_the_run_at_once(tok: Path, tmp_path: Path) -> None:
    """A tokenizer worker killed mid-run (SIGKILL, as the out-of-memory killer does) makes the run fail at once with
    one line naming the worker and the signal, leaving no dataset and no process behind (it used to wait forever for
    the lost batch); an error raised in a worker reaches the caller as itself."""
    import psutil

    text = " ".join(_docs(300))  # ~40 KB: a few seconds of work per worker in all, the kill comes after one batch
    src = tmp_path / "big.jsonl"
    src.write_text((json.dumps({"text": text}) + "\n") * 400, encoding="utf-8")
    argv = [sys.executable, "-m", "megatron_slim.cli", "preprocess", "--input", str(src), "--output-prefix",
            str(tmp_path / "dead"), "--tokenizer", str(tok), "--workers", "2", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # the first batch written: workers at work
            if any(f.stat().st_size for f in tmp_path.glob(".dead.bin.*.partial")):
                break
            time.sleep(0.01)
        workers = [c for c in psutil.Process(proc.pid).children()  # forked (or spawned), not the resource tracker
                   if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(workers) == 2 and proc.poll() is None, "the run ended (or never started) before the kill"
        os.kill(workers[0].pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run hung after one of its tokenizer workers was killed")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, err  # the CLI's exit status for a UserError
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"megatron-slim preprocess: error: tokenizer worker \d \(pid {workers[0].pid}\) was "
                        rf"killed by signal 9 \(SIGKILL; [^)]*\) while encoding {src}:\d+-\d+; nothing of "
                        rf"{tmp_path / 'dead'} was written .*rerun the same command.*", line), line
    assert not list(tmp_path.glob("dead.*")) and not workers[1].is_running()

    with pytest.raises(UserError, match=rf"{src}:1: text needs a tokenizer"):  # raised in a worker
        run_preprocess(PreprocessJob(inputs=(str(src),), output_prefix=str(tmp_path / "ids"), tokenizer="none",
                                     vocab_size=300, no_eod=True, workers=2, progress=False))


def test_indexed_writer_writes_megatron_bytes(tmp_path: Path) -> None:
    """The writer `preprocess` uses writes what megatron-core's builder writes (both dtypes, an empty document,
    documents given in batches, and no document at all)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_slim.data.indexed import IndexedWriter

    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int32):
        for sizes in ([5, 0, 17, 1, 300, 2], []):
            docs = [rng.integers(0, 60000, size=n) for n in sizes]
            name = f"{np.dtype(dtype).name}_{len(docs)}"
            ref = IndexedDatasetBuilder(str(tmp_path / f"ref_{name}.bin"), dtype=dtype)
            for d in docs:
                ref.add_document(d, [len(d)])
            ref.finalize(str(tmp_path / f"ref_{name}.idx"))
            ours = IndexedWriter(tmp_path / f"ours_{name}.bin", dtype)
            for batch in (docs[:2], docs[2:]):
                if batch:
                    ours.add_documents(np.concatenate(batch), np.array([len(d) for d in batch]))
            ours.finalize(tmp_path / f"ours_{name}.idx")
            assert _bytes(tmp_path / f"ours_{name}") == _bytes(tmp_path / f"ref_{name}"), name


def test_tokenizer_spec_cache(tok: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec equals transformers' tokenizer; once cached it is read back (no transformers load), and a changed
    tokenizer file gives a new key, so the spec is built again."""
    import shutil

    from transformers import AutoTokenizer

    from megatron_slim.data.tokenizer_spec import hf_tokenizer_spec, spec_path

    monkeypatch.setenv("MEGATRON_SLIM_CACHE", str(tmp_path / "cache"))
    hf = AutoTokenizer.from_pretrained(str(tok))
    assert hf_tokenizer_spec(tok) == (hf.backend_tokenizer.to_str(), len(hf), EOS)
    cached = spec_path(tok)
    record = json.loads(cached.read_text())
    cached.write_text(json.dumps({**record, "eos": 7}))
    assert hf_tokenizer_spec(tok)[2] == 7  # what the cache holds is what a run uses
    changed = tmp_path / "changed"
    shutil.copytree(tok, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert spec_path(changed) != cached
    assert hf_tokenizer_spec(changed)[2] == EOS
