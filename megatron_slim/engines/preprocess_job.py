"""Tokenize a corpus into a Megatron indexed dataset (.bin/.idx + manifest): `PreprocessJob`/`run_preprocess`, used
by the `preprocess` command and a run's data preparation, and `merge_datasets` for the `merge-datasets` command.

Work split: the main process reads the inputs (`megatron_slim.data.corpus`) in batches and writes the dataset;
`workers` processes decode and tokenize batches with the tokenizer's batch API. Results are consumed in submission
order, so the output is byte-identical for any number of workers. With one worker everything runs in-process.
One worker is one core: the fast tokenizer's own thread pool is switched off (TOKENIZERS_PARALLELISM=false).
What the workers cannot share is serial start-up, so it is kept small: the workers are forked (in milliseconds,
every module imported) when no other thread runs in the main process at the fork, else spawned before the
tokenizer loads (so that their start overlaps the load); the dataset is written with numpy (`data.indexed`, no
megatron-core import); the main process only finds line ends, writes token arrays and counts (an uncompressed
file's batches go to the workers as byte spans they read themselves). Each worker holds two batches, so the next is
there when it returns a result, and the input's last batches come in smaller pieces, so no worker idles long while
another finishes. A worker process that dies (the out-of-memory killer, a stray kill) fails the job at once with
WorkerDied rather than leaving it waiting for the lost batch.

Scale-out: `shard=(I, N)` takes the I-th of N contiguous, size-balanced runs of the input files and writes
`PREFIX-0000I-of-0000N`; merging shards 0..N-1 in order gives exactly the unsharded dataset. Every output file is
claimed through runtime.outputs (locked, written to a temporary sibling, renamed into place; the manifest last), so
a killed job leaves no half dataset, and a rerun skips a dataset whose manifest records the same job.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

from megatron_slim.data.corpus import (
    FORMATS,
    BadRecord,
    Batch,
    InputFile,
    decode_batch,
    detect,
    expand_inputs,
    parts,
    read_batches,
)
from megatron_slim.data.indexed import IndexedWriter
from megatron_slim.data.manifest import (
    FORMAT,
    VERSION,
    file_fingerprint,
    manifest_path,
    read_manifest,
    tokenizer_fingerprint,
)
from megatron_slim.data.tokenizer_spec import hf_tokenizer_spec
from megatron_slim.errors import UserError
from megatron_slim.runtime.config_loader import setting
from megatron_slim.runtime.outputs import check_not_overlapping, claim_output_file

OUTPUTS = (".manifest.json", ".idx", ".bin")  # claimed in this order, so put in place in reverse: manifest last
MAX_REPORTED_BAD = 10  # skipped records printed one by one; the rest are counted
BATCH_BYTES = 1 << 20  # a batch ends at --batch-size records or about this much input text
TAIL_BATCHES, TAIL_SPLIT = 2, 8  # with workers: the last 2 batches per worker go in 8 pieces each (_finer_tail)
QUEUED = 2  # batches a worker holds (one encoding, the next waiting)


@dataclass(frozen=True, kw_only=True)
class PreprocessJob:
    """The `preprocess` command's flags, by the same names (progress: not --no-progress)."""

    inputs: tuple[str, ...] = setting(help="file, glob or directory; repeat for more (read in the order given)",
                                      flag="input", many="append", metavar="PATH")
    output_prefix: str = setting(help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json (a shard: "
                                      "PREFIX-0000I-of-0000N.*)")
    tokenizer: str = setting(help="HF tokenizer directory, a sentencepiece .model file, or 'none' for pre-tokenized "
                                  "ids")
    format: str = setting("auto", help="input format; auto reads it from the content (text must be asked for, or "
                                       "named .txt)", choices=FORMATS)
    json_key: str = setting("text", help="JSON field holding the text (or the ids, with --tokenizer none)")
    column: str | None = setting(None, help="parquet / HF dataset column holding the text (None: the --json-key "
                                            "value)")
    vocab_size: int | None = setting(None, help="the model's vocabulary size (ids must lie below it); required with "
                                                "--tokenizer none")
    eod_id: int | None = setting(None, help="end-of-document id (None: the tokenizer's EOS)")
    no_eod: bool = setting(False, help="do not append the end-of-document token")
    workers: int = setting(1, help="tokenizer processes (one core each)")
    batch_size: int = setting(512, help="documents per tokenizer call / per unit of work")
    shard: str | None = setting(None, help="write only shard I of N of the input files (auto: from the SLURM array "
                                           "task)", metavar="I/N|auto")
    skip_bad: int = setting(0, help="skip (and count) up to N bad records instead of failing on the first",
                            metavar="N")
    overwrite: bool = setting(False, help="replace an existing dataset at the prefix (one recording the same job is "
                                          "skipped otherwise)")
    progress: bool = setting(True, help="no progress bar")

    def validate(self) -> None:
        """Refuse what no input can run, before any file is read (messages name the command's flags)."""
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: need at least 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: need at least 1")
        if self.skip_bad < 0:
            raise UserError(f"--skip-bad {self.skip_bad}: must be 0 or more")
        if self.tokenizer == "none" and self.vocab_size is None:
            raise UserError("--tokenizer none needs --vocab-size")


# ---- sharding ---------------------------------------------------------------------------------------------------
def parse_shard(spec: str | None, env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(index, count) from "I/N", or from the SLURM array for "auto" (task ids need not start at 0)."""
    if spec is None:
        return None
    if spec == "auto":
        env = os.environ if env is None else env
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            raise UserError("--shard auto needs a SLURM array task (SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                            "are unset); outside SLURM pass --shard I/N")
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        index = task - first
        if env.get("SLURM_ARRAY_TASK_STEP", "1") != "1":
            raise UserError("--shard auto needs a contiguous array (--array A-B without a step); pass --shard I/N")
    else:
        try:
            index, count = (int(x) for x in spec.split("/"))
        except ValueError:
            raise UserError(f"--shard {spec!r}: expected I/N (e.g. 0/8) or auto") from None
    if not 0 <= index < count:
        raise UserError(f"--shard: shard index {index} is outside 0..{count - 1}")
    return index, count


def shard_prefix(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}"


def select_shard(files: list[InputFile], index: int, count: int) -> list[InputFile]:
    """Shard `index` of `count`: a contiguous run of the files, balanced by bytes (file i goes to the shard holding
    the middle of its bytes), so concatenating the shards in order is the whole input."""
    if count > len(files):
        raise UserError(f"--shard {index}/{count}: {count} shards but only {len(files)} input files (a shard takes "
                        "whole files); use at most as many shards as files")
    total = sum(f.size for f in files) or 1
    out, before, previous = [], 0, 0
    for i, f in enumerate(files):
        owner = min(count - 1, (2 * before + f.size) * count // (2 * total))
        owner = max(owner, previous, count - (len(files) - i))  # never leave a later shard without a file
        owner = min(owner, previous + 1 if i else 0)  # nor skip one
        before, previous = before + f.size, owner
        if owner == index:
            out.append(f)
    return out


# ---- tokenization (runs in the workers) -------------------------------------------------------------------------
@dataclass
class Encoded:
    """One batch's documents, ready to append: ids concatenated, one length per document."""

    file_index: int
    ids: np.ndarray
    lengths: np.ndarray
    bad: list[str]
    empty: int
    input_bytes: int
    worker: int
    seconds: float


@dataclass
class Encoder:
    """The tokenizer side of a job; `setup` loads it in the process that encodes (inherited by forked workers)."""

    tokenizer: str
    key: str
    column: str
    vocab_size: int | None
    eod_id: int | None
    no_eod: bool
    spec: tuple[str, str] | None = field(default=None, repr=False)  # ("tokenizers", JSON) | ("sentencepiece", path)
    encode_texts: Callable[[list[str]], list[list[int]]] | None = field(default=None, repr=False)
    vocab: int = 0
    eod: int | None = None

    def setup(self) -> None:
        """Read the tokenizer, settle vocabulary and end-of-document id (in the main process; `build` makes the
        encoder where it encodes)."""
        if self.tokenizer == "none":  # with a vocab_size (PreprocessJob.validate)
            vocab, eod = self.vocab_size, None
        elif self.tokenizer.endswith(".model"):
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=self.tokenizer)
            vocab, eod = sp.get_piece_size(), sp.eos_id()
            eod = eod if eod >= 0 else None
            self.spec = ("sentencepiece", self.tokenizer)
        else:
            backend, vocab, eod = hf_tokenizer_spec(self.tokenizer)  # cached: no transformers import once known
            self.spec = ("tokenizers", backend)
        self.eod = self.eod_id if self.eod_id is not None else eod
        if self.eod is None and not self.no_eod:
            raise UserError("the tokenizer has no EOS token: pass --eod-id or --no-eod")
        self.vocab = self.vocab_size or vocab  # the model's vocabulary bounds the ids (padding rows allowed)
        if not self.no_eod and not 0 <= self.eod < self.vocab:
            raise UserError(f"end-of-document id {self.eod} is outside the vocabulary of {self.vocab} "
                            f"(ids 0..{self.vocab - 1}); check --eod-id and --vocab-size")

    def build(self) -> None:
        """The batch encoder, from `spec` alone (cheap: a worker imports `tokenizers` or sentencepiece, not
        transformers). One worker is one core: the Rust tokenizer's thread pool is off."""
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if self.spec is None:
            return
        kind, value = self.spec
        if kind == "sentencepiece":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=value)
            self.encode_texts = lambda texts: sp.encode(texts, num_threads=1)
            return
        from tokenizers import Tokenizer

        # the Rust tokenizer's batch API, as HF's tokenizer(text, add_special_tokens=False) calls it, without the
        # truncation/padding a tokenizer.json may carry (HF switches those off for such a call too)
        backend = Tokenizer.from_str(value)
        backend.no_truncation()
        backend.no_padding()
        self.encode_texts = lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "encode_texts": None}  # rebuilt by `build` in the worker

    @property
    def dtype(self) -> type:
        return np.uint16 if self.vocab <= 65536 else np.int32

    def encode(self, batch: Batch) -> Encoded:
        start = time.perf_counter()
        batch = batch.load()
        docs = decode_batch(batch, self.column if batch.format in ("parquet", "hf") else self.key)
        texts = [d for _, d in docs if type(d) is str]
        if texts and self.encode_texts is None:
            where = next(w for w, d in docs if type(d) is str)
            raise UserError(f"{where}: text needs a tokenizer (--tokenizer none reads token ids only)")
        encoded = iter(self.encode_texts(texts) if texts else ())
        flat: list[int] = []
        lengths: list[int] = []
        bad: list[str] = []
        empty = 0
        eos = [] if self.no_eod else [self.eod]
        for where, doc in docs:
            if isinstance(doc, BadRecord):
                bad.append(str(doc))
                continue
            ids = next(encoded) if type(doc) is str else doc
            problem = self._check(where, doc, ids)
            if problem:
                bad.append(problem)
                continue
            if not ids and not eos:
                empty += 1
                continue
            flat += ids
            flat += eos
            lengths.append(len(ids) + len(eos))
        return Encoded(batch.file_index, np.array(flat, dtype=self.dtype), np.array(lengths, dtype=np.int64), bad,
                       empty, batch.input_bytes, os.getpid(), time.perf_counter() - start)

    def _check(self, where: str, doc: str | list, ids: list) -> str | None:
        if type(doc) is str:
            if not ids and doc.strip():
                return (f"{where}: the text tokenizes to no token at all; is the tokenizer complete? (a checkpoint "
                        "directory without tokenizer files yields an empty tokenizer)")
        elif not all(type(t) is int for t in ids):
            return f"{where}: 'tokens' must be a list of integer token ids"
        if ids:
            low, high = min(ids), max(ids)
            if low < 0:
                return f"{where}: negative token id {low}"
            if high >= self.vocab:
                return f"{where}: token id {high} is outside the model's vocabulary of {self.vocab}"
        return None


class WorkerDied(UserError):
    """A tokenizer worker process ended while the job needed it (a signal, such as the out-of-memory killer's
    SIGKILL, or an exit): the job stops at once instead of waiting for a result that cannot come."""


class WorkerTraceback(Exception):
    """The traceback of an error raised in a tokenizer worker: the cause of that error as the main process raises
    it."""


@dataclass
class _Failure:
    """An exception a worker sends in place of a result (made picklable), with its traceback's text."""

    error: BaseException
    trace: str


def _failure(e: BaseException) -> _Failure:
    """The exception `e` (being handled) as it can travel to the main process."""
    error = e
    try:
        pickle.dumps(e)
    except Exception:  # noqa: BLE001 - an exception that cannot travel: its text does
        error = RuntimeError(f"{type(e).__name__}: {e}")
    return _Failure(error, traceback.format_exc())


def _worker_main(conn: Connection, encoder: Encoder | None) -> None:
    """A tokenizer process: takes the encoder (forked with it, or sent it first), then answers every batch it is
    sent with its Encoded, or with the _Failure it raised (the main process raises the first in input order, so the
    error does not depend on which worker was faster), until it is sent None. A thread takes what comes off the pipe
    while batches encode, so the main process never waits to hand over a batch (nor blocks on a full pipe while this
    worker blocks sending it a result). Ctrl-C is left to the main process, which ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def receive() -> None:
        try:
            while True:
                message = conn.recv()
                inbox.put(message)
                if message is None:
                    return
        except (EOFError, OSError):  # the main process has gone
            inbox.put(EOFError)
        except BaseException as e:  # noqa: BLE001 - a message that cannot be read: raised below
            inbox.put(e)

    threading.Thread(target=receive, name="receive", daemon=True).start()
    try:
        if encoder is None:  # spawned: sent after the start
            encoder = inbox.get()
        if isinstance(encoder, BaseException):
            raise encoder
        if encoder is EOFError:
            return
        failed = None
        try:
            encoder.build()
        except Exception as e:  # noqa: BLE001 - the answer to every batch
            failed = _failure(e)
        while (batch := inbox.get()) is not None:
            if batch is EOFError:  # the main process has gone: nothing to report to
                return
            if isinstance(batch, BaseException):
                raise batch
            try:
                result = failed or encoder.encode(batch)
            except Exception as e:  # noqa: BLE001 - raised again in the main process, in input order
                result = _failure(e)
            conn.send(result)
    except (BrokenPipeError, ConnectionResetError):  # the main process has gone
        return
    except BaseException as e:  # noqa: BLE001 - raised again in the main process
        conn.send(_failure(e))


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "closed its connection"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
        oom = "; the kernel's out-of-memory killer sends it" if -code == signal.SIGKILL else ""
        return f"was killed by signal {-code} ({name}{oom})"
    return f"exited with code {code}"


def _fork_safe() -> bool:
    """Whether this process runs a single thread when it forks, so no other thread can hold a lock the child would
    inherit locked (what CPython itself warns about). Counted after a probe fork (a child that exits at once) when
    more than one thread runs now: thread pools that stop themselves at a fork, such as numpy's OpenBLAS pool
    (pthread_atfork), are down then and stay down until used again; torch's, gloo's or a Python thread are not."""
    try:
        if len(os.listdir("/proc/self/task")) == 1:
            return True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # CPython's multi-threaded fork warning
            pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # no procfs: assume threads
        return False


class _Workers:
    """`n` encoding processes. Forked when that is safe (`_fork_safe`; the CLI): in milliseconds, with every module
    imported and the encoder set up, right when the tokenizer is known (`start`). Otherwise spawned at once
    (a library caller may hold threads, torch's or a tokenizer's, that make fork unsafe), so that their interpreter
    start-up and imports overlap the main process's tokenizer load, and then sent the encoder through their pipes.
    Each takes up to `QUEUED` batches at a time: the next is there when it returns a result. A worker that dies
    (its process sentinel) fails the job at once with WorkerDied. Ended on exit."""

    def __init__(self, n: int, prefix: str) -> None:
        self.n, self.prefix = n, prefix
        self.processes: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.finished = False
        self.served: set[int] = set()  # workers that returned a result
        self.failed: dict[int, _Failure] = {}  # a worker's error, kept to raise if it ends before its turn comes
        if not _fork_safe():
            self._launch("spawn", None)

    def _launch(self, method: str, encoder: Encoder | None) -> None:
        context = multiprocessing.get_context(method)
        for i in range(self.n):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, args=(theirs, encoder), name=f"tokenizer-{i}",
                                      daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.conns.append(ours)

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.finished:  # every worker is idle: told to stop
            for conn in self.conns:
                with suppress(OSError):
                    conn.send(None)
        for process in self.processes:
            process.join(5 if self.finished else 0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()

    def start(self, encoder: Encoder) -> None:
        """Give the workers the encoder (set up): forked with it, or sent it."""
        if not self.processes:
            fork = _fork_safe()  # again: loading the tokenizer may have started threads (transformers)
            self._launch("fork" if fork else "spawn", encoder if fork else None)
            if fork:
                return
        for w in range(self.n):
            self._send(w, encoder, {})

    def encoded(self, batches: Iterable[Batch]) -> Iterator[Encoded]:
        """Encoded batches in input order; at most 4 per worker between the oldest unfinished and the newest sent
        (bounded memory when one batch is slow). A worker returns its batches in the order it was sent them."""
        source = iter(batches)
        n = len(self.conns)
        window = 4 * n
        ahead = next(source, None)  # read before it is needed: a worker that finishes gets the next at once
        done: dict[int, Encoded | _Failure] = {}
        busy: dict[int, deque[tuple[int, Batch]]] = {w: deque() for w in range(n)}  # (sequence number, batch)
        sent = received = 0
        while True:
            while ahead is not None and sent < received + window:
                w = min(range(n), key=lambda w: len(busy[w]))
                if len(busy[w]) >= QUEUED:
                    break
                busy[w].append((sent, ahead))
                self._send(w, ahead, busy)
                sent += 1
                ahead = next(source, None)
            while received in done:
                result = done.pop(received)
                if isinstance(result, _Failure):
                    raise result.error from WorkerTraceback(result.trace)
                yield result
                received += 1
            if not any(busy.values()):
                if ahead is None:
                    self.finished = True
                    return
                continue  # the window had been full: it has moved on
            for w in self._ready(busy):
                seq, _ = busy[w][0]
                done[seq] = self._receive(w, busy)
                if isinstance(done[seq], _Failure):
                    self.failed.setdefault(w, done[seq])
                busy[w].popleft()
                self.served.add(w)

    def _ready(self, busy: dict[int, deque[tuple[int, Batch]]]) -> list[int]:
        """The busy workers whose results have arrived (waits for one); a worker process that ended fails the job,
        idle or busy."""
        sentinels = {p.sentinel: w for w, p in enumerate(self.processes)}
        ready = wait([self.conns[w] for w in busy if busy[w]] + list(sentinels))
        results = [w for w in busy if busy[w] and self.conns[w] in ready]
        for w in (sentinels[r] for r in ready if r in sentinels):
            if w not in results:  # ended without a result to collect (one sent just before dying is collected)
                self._lost(w, busy)
        return results

    def _send(self, w: int, obj: Any, busy: dict[int, deque[tuple[int, Batch]]]) -> None:
        try:
            self.conns[w].send(obj)
        except OSError:  # the worker's end is closed: it failed or died
            self._lost(w, busy)

    def _receive(self, w: int, busy: dict[int, deque[tuple[int, Batch]]]) -> Encoded | _Failure:
        try:
            return self.conns[w].recv()
        except (EOFError, OSError):
            self._lost(w, busy)

    def _lost(self, w: int, busy: dict[int, deque[tuple[int, Batch]]]) -> NoReturn:
        """Raise why worker `w` is gone: the error it sent before it ended, else WorkerDied."""
        result = None
        with suppress(EOFError, OSError):
            if self.conns[w].poll():
                result = self.conns[w].recv()
        # an error it sent just before it ended, or earlier (then raised before its turn in input order came)
        failure = result if isinstance(result, _Failure) else self.failed.get(w)
        if failure is not None:
            raise failure.error from WorkerTraceback(failure.trace)
        process = self.processes[w]
        process.join(5)
        if busy.get(w):
            batch = busy[w][0][1]
            sep = ":" if batch.format in ("jsonl", "text") else ":row "
            records = f"{sep}{batch.lines()}" if batch.lines() else ""
            doing = f"while encoding {batch.path}{records}"
        else:
            doing = "between batches" if w in self.served else "before its first batch"
        raise WorkerDied(f"tokenizer worker {w} (pid {process.pid}) {_exit_reason(process.exitcode)} {doing}; "
                         f"nothing of {self.prefix} was written (a dataset is written whole or not at all): rerun "
                         "the same command to tokenize it again from the start (in a --shard array, finished "
                         "shards are skipped)")


def _finer_tail(batches: Iterator[Batch], total_bytes: int, workers: int) -> Iterator[Batch]:
    """The batches, those of the last `TAIL_BATCHES` per worker split into `TAIL_SPLIT` pieces each: when the
    input runs out, a worker waits for the others' last batch at most one piece long, not a whole batch (the
    pieces keep the records' order, so the output is the same). Span batches come that small from the reader
    (`_tails`)."""
    seen, tail = 0, TAIL_BATCHES * workers * BATCH_BYTES
    for batch in batches:
        seen += batch.input_bytes
        if total_bytes - seen < tail and batch.span is None:
            yield from batch.split(TAIL_SPLIT)
        else:
            yield batch


def _tails(files: list[InputFile], workers: int) -> list[tuple[int, int] | None]:
    """Per file, where its batches get small (byte offset, piece bytes) so that the job's last `TAIL_BATCHES` per
    worker come in `TAIL_SPLIT` pieces each (None: not within the job's tail, or one worker)."""
    if workers == 1:
        return [None] * len(files)
    tail, after, out = TAIL_BATCHES * workers * BATCH_BYTES, 0, []
    for f in reversed(files):
        out.append((max(0, f.size - (tail - after)), BATCH_BYTES // TAIL_SPLIT) if after < tail else None)
        after += f.size
    return out[::-1]


# ---- progress ---------------------------------------------------------------------------------------------------
class _Progress:
    """Documents/s, tokens/s, input MB/s and the ETA (from input bytes), in total and per worker."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not enabled,
                        mininterval=1.0, smoothing=0.1)
        self.start = time.perf_counter()
        self.documents = self.tokens = 0
        self.per_worker: dict[int, list[float]] = {}  # pid -> [documents, tokens, busy seconds]
        self.last = 0.0

    def update(self, enc: Encoded) -> None:
        self.documents += len(enc.lengths)
        self.tokens += int(enc.lengths.sum())
        w = self.per_worker.setdefault(enc.worker, [0, 0, 0.0])
        w[0] += len(enc.lengths)
        w[1] += int(enc.lengths.sum())
        w[2] += enc.seconds
        self.bar.update(enc.input_bytes)
        now = time.perf_counter()
        if now - self.last >= 1.0:
            self.last = now
            self.bar.set_postfix_str(self.rates(now), refresh=False)

    def workers(self) -> str:
        """Each worker's documents/s and tokens/s over the time it spent encoding."""
        return " ".join(f"w{i}: {w[0] / max(w[2], 1e-9):.0f} docs/s {w[1] / max(w[2], 1e-9) / 1e3:.0f}K tok/s;"
                        for i, w in enumerate(self.per_worker.values())).rstrip(";")

    def rates(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        return (f"{self.documents / elapsed:.0f} docs/s, {self.tokens / elapsed / 1e3:.0f}K tok/s "
                f"[{self.workers()}]")

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start


# ---- the job ----------------------------------------------------------------------------------------------------
def _job_record(job: PreprocessJob, files: list[InputFile], encoder: Encoder,
                shard: tuple[int, int] | None) -> dict[str, Any]:
    """What the dataset depends on: a rerun with an equal record finds the dataset already done."""
    return {"inputs": [{**file_fingerprint(f.path, parts(f)),
                        "format": f.format, "compression": f.compression} for f in files],
            "json_key": job.json_key, "column": encoder.column, "vocab_size": encoder.vocab, "eod": encoder.eod,
            "no_eod": job.no_eod, "shard": list(shard) if shard else None,
            "tokenizer": {"path": job.tokenizer if job.tokenizer == "none" else str(Path(job.tokenizer).resolve()),
                          "fingerprint": tokenizer_fingerprint(job.tokenizer)}}


def _done(prefix: str, record: dict[str, Any]) -> bool:
    """The dataset at `prefix` is complete and was made by a job with this record."""
    if not manifest_path(prefix).is_file():
        return False
    try:
        data = read_manifest(prefix).data
    except UserError:
        return False
    sizes = data.get("files", {})
    return data.get("job") == record and all(Path(prefix + ext).is_file()
                                             and Path(prefix + ext).stat().st_size == sizes.get(ext)
                                             for ext in (".bin", ".idx"))


def run_preprocess(job: PreprocessJob) -> dict[str, Any]:
    """Write the dataset (or find it done); returns its manifest."""
    job.validate()
    shard = parse_shard(job.shard)
    paths = expand_inputs(list(job.inputs))
    prefix = shard_prefix(job.output_prefix, *shard) if shard else job.output_prefix
    inputs = [str(p) for p in paths] + [s for s in job.inputs if Path(s).exists()]
    for ext in OUTPUTS:  # before reading anything: an output may not be an input
        check_not_overlapping(Path(prefix + ext), inputs)
    all_files = [detect(p, job.format) for p in paths]
    files = select_shard(all_files, *shard) if shard else all_files
    with _Workers(job.workers, prefix) if job.workers > 1 else nullcontext() as workers:
        return _run(job, shard, prefix, inputs, files, workers)


def _run(job: PreprocessJob, shard: tuple[int, int] | None, prefix: str, inputs: list[str], files: list[InputFile],
         workers: _Workers | None) -> dict[str, Any]:
    """`run_preprocess` once the inputs are known and the workers (if any) are starting."""
    encoder = Encoder(job.tokenizer, job.json_key, job.column or job.json_key, job.vocab_size, job.eod_id,
                      job.no_eod)
    encoder.setup()
    if workers:
        workers.start(encoder)
    else:
        encoder.build()
    record = _job_record(job, files, encoder, shard)
    if not job.overwrite and _done(prefix, record):
        print(f"{prefix}: already done (its manifest records this job); skipped")
        return read_manifest(prefix).data
    # a shard without a manifest is an unfinished shard of this array (a killed task): rewritten
    overwrite = job.overwrite or (shard is not None and not manifest_path(prefix).exists())
    total_bytes = sum(f.size for f in files)
    per_file = [{"documents": 0, "tokens": 0, "skipped": 0, "empty": 0} for _ in files]
    with ExitStack() as stack:
        man_tmp, idx_tmp, bin_tmp = (stack.enter_context(claim_output_file(prefix + ext, inputs=inputs,
                                                                           overwrite=overwrite))
                                     for ext in OUTPUTS)
        writer = IndexedWriter(bin_tmp, encoder.dtype)
        stack.callback(writer.file.close)  # on an error (finalize closes it otherwise)
        progress = _Progress(total_bytes, Path(prefix).name, job.progress)
        skipped = 0
        tails = _tails(files, job.workers)
        batches = (b for i, f in enumerate(files) for b in read_batches(
            i, f, encoder.column if f.format in ("parquet", "hf") else job.json_key, job.batch_size, BATCH_BYTES,
            tails[i]))
        if workers:
            batches = _finer_tail(batches, total_bytes, len(workers.conns))
        for enc in workers.encoded(batches) if workers else map(encoder.encode, batches):
            counts = per_file[enc.file_index]
            for message in enc.bad:
                skipped += 1
                if skipped > job.skip_bad:
                    more = f" (more than --skip-bad {job.skip_bad} bad records)" if job.skip_bad else ""
                    raise UserError(message + more)
                if skipped <= MAX_REPORTED_BAD:
                    print(f"skipped: {message}", file=sys.stderr)
            counts["skipped"] += len(enc.bad)
            counts["empty"] += enc.empty
            counts["documents"] += len(enc.lengths)
            counts["tokens"] += int(enc.lengths.sum())
            writer.add_documents(enc.ids, enc.lengths)
            progress.update(enc)
        writer.finalize(idx_tmp)
        seconds = max(progress.close(), 1e-9)
        documents = sum(c["documents"] for c in per_file)
        tokens = sum(c["tokens"] for c in per_file)
        manifest = {
            "format": FORMAT, "version": VERSION, "prefix": Path(prefix).name, "job": record,
            "tokenizer": record["tokenizer"], "documents": documents, "tokens": tokens, "skipped": skipped,
            "empty": sum(c["empty"] for c in per_file),
            "inputs": [{**r, **c} for r, c in zip(record["inputs"], per_file)],
            "shard": {"index": shard[0], "count": shard[1]} if shard else None,
            "shards": [],
            "files": {".bin": bin_tmp.stat().st_size, ".idx": idx_tmp.stat().st_size},
            "dtype": np.dtype(encoder.dtype).name,
        }
        man_tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    mb = total_bytes / 1e6
    print(f"wrote {prefix}.bin/.idx/.manifest.json: {documents} documents, {tokens} tokens, {skipped} skipped "
          f"records, in {seconds:.1f}s ({documents / seconds:.0f} docs/s, {tokens / seconds / 1e3:.0f}K tok/s, "
          f"{mb / seconds:.1f} MB/s input); per worker while encoding: {progress.workers()}"
          + (f"; {manifest['empty']} empty documents (--no-eod) left out" if manifest["empty"] else ""))
    return manifest


# ---- merging ----------------------------------------------------------------------------------------------------
def merge_datasets(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> dict[str, Any]:
    """Concatenate indexed datasets in the given order (megatron-core's IndexedDatasetBuilder.add_index) and write
    the merged manifest: the counts of the datasets themselves, one shard entry per input."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    if not prefixes:
        raise UserError("merge-datasets: give at least one --inputs prefix")
    entries, dtypes = [], set()
    for p in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(p + ext).is_file():
                raise FileNotFoundError(f"{p + ext} does not exist (an unfinished shard? rerun its preprocess)")
        ds = IndexedDataset(p, mmap=True)
        documents, tokens = len(ds.document_indices) - 1, int(np.asarray(ds.sequence_lengths, dtype=np.int64).sum())
        dtypes.add(np.dtype(ds.index.dtype).name)
        del ds
        entry: dict[str, Any] = {"prefix": str(Path(p).resolve()), "documents": documents, "tokens": tokens}
        if manifest_path(p).is_file():
            m = read_manifest(p)
            if (m.documents, m.tokens) != (documents, tokens):
                raise UserError(f"{m.path} records {m.documents} documents and {m.tokens} tokens, but {p}.bin/.idx "
                                f"hold {documents} and {tokens}: the dataset was changed after it was written")
            entry.update(skipped=m.skipped, tokenizer=m.data["tokenizer"], inputs=m.data.get("inputs", []),
                         shard=m.data.get("shard"))
        entries.append(entry)
    if len(dtypes) > 1:
        raise UserError(f"merge-datasets: the inputs hold different token dtypes {sorted(dtypes)} (different "
                        "vocabulary sizes): they cannot be one dataset")
    fingerprints = {e["tokenizer"]["fingerprint"] for e in entries if "tokenizer" in e}
    if len(fingerprints) > 1:
        raise UserError("merge-datasets: the inputs were tokenized with different tokenizers (their manifests' "
                        "fingerprints differ)")
    inputs = [p + ext for p in prefixes for ext in (".bin", ".idx")]
    with ExitStack() as stack:
        man_tmp, idx_tmp, bin_tmp = (stack.enter_context(claim_output_file(output_prefix + ext, inputs=inputs,
                                                                           overwrite=overwrite))
                                     for ext in OUTPUTS)
        builder = IndexedDatasetBuilder(str(bin_tmp), dtype=np.dtype(dtypes.pop()).type)
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(str(idx_tmp))
        tokenizer = next((e["tokenizer"] for e in entries if "tokenizer" in e), {"fingerprint": "unknown"})
        manifest = {
            "format": FORMAT, "version": VERSION, "prefix": Path(output_prefix).name,
            "job": {"merge": [e["prefix"] for e in entries]}, "tokenizer": tokenizer,
            "documents": sum(e["documents"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
            "skipped": sum(e.get("skipped", 0) for e in entries),
            "inputs": [i for e in entries for i in e.get("inputs", [])], "shard": None,
            "shards": [{k: v for k, v in e.items() if k not in ("inputs", "tokenizer")} for e in entries],
            "files": {".bin": bin_tmp.stat().st_size, ".idx": idx_tmp.stat().st_size},
        }
        man_tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"merged {len(prefixes)} datasets into {output_prefix}.bin/.idx/.manifest.json: {manifest['documents']} "
          f"documents, {manifest['tokens']} tokens")
    return manifest
