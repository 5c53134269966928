"""Pretraining corpora on disk: which files `--input` names, what format each holds, and their records in batches.

Inputs are files, globs and directories (a directory's files in sorted order, recursively, hidden names skipped; a
directory written by HF `datasets.save_to_disk` is one input). A file's format comes from its content, never from
its name alone: gzip and zstandard streams by their magic bytes (then the content inside), parquet by its magic,
JSON lines when the first non-blank line is a JSON object. Plain text (one document per line) is never guessed:
it needs `--format text`, or a `.txt` name on content that is not JSON, so a mis-named JSON-lines file cannot turn
into documents that read `{"text": ...}`.

Records are read in batches (`Batch`) that a tokenizer worker decodes with `decode_batch`: JSON parsing and UTF-8
decoding happen in the workers, the reader only finds line ends or slices Arrow columns, so one process can feed many.
An uncompressed line file is not even read out to the workers: its batches are byte spans (`Batch.span`, a few dozen
bytes to send) that the worker reads itself (`Batch.load`, from the page cache the reader has just filled), so
feeding a worker costs the reader a find and a count per MB, and a queued batch never waits in a pipe.
Every record keeps where it came from (`file:line` or `file:row N`) for error messages.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_slim.errors import UserError

FORMATS = ("auto", "jsonl", "text", "parquet", "hf")
GZIP_MAGIC, ZSTD_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1"
HF_STATE = "state.json"  # datasets.save_to_disk: state.json lists the Arrow files, dataset_info.json the features
SNIFF_BYTES = 1 << 20


@dataclass(frozen=True)
class InputFile:
    """One input and how to read it."""

    path: Path
    format: str  # jsonl | text | parquet | hf
    compression: str | None  # gzip | zstd | None
    size: int  # bytes on disk (an HF dataset: its Arrow files together)


@dataclass
class Batch:
    """Consecutive records of one input: raw lines (jsonl/text, bytes) or column values (parquet/hf)."""

    file_index: int
    path: str
    format: str
    numbers: list[int]  # line numbers (1-based) or row numbers (0-based), one per item
    items: list[Any]
    input_bytes: int  # how far this batch advances through the input's `size` (for progress and ETA)
    # lines not read yet (uncompressed line files): (byte offset, bytes, number of the first line, lines), whole lines
    span: tuple[int, int, int, int] | None = None

    def lines(self) -> str:
        """Which records the batch holds, as `first-last` (line or row numbers), or "" when none."""
        if self.span is not None:
            return f"{self.span[2]}-{self.span[2] + self.span[3] - 1}" if self.span[3] else ""
        return f"{self.numbers[0]}-{self.numbers[-1]}" if self.numbers else ""

    def load(self) -> Batch:
        """The batch with its records in `items` (a span batch reads its lines, in the process that encodes it;
        blank lines are skipped, as the reader of compressed files skips them)."""
        if self.span is None:
            return self
        offset, length, first, _ = self.span
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise UserError(f"{self.path}:{first}: the file shrank while it was read ({offset + len(data)} bytes "
                            f"where {offset + length} were)")
        pieces = data.split(b"\n")
        numbers, items = [], []
        for k, piece in enumerate(pieces[:-1]):
            if piece.strip():
                numbers.append(first + k)
                items.append(piece + b"\n")  # the line as readline gives it (JSON error columns count the end)
        if pieces[-1].strip():  # the file's last line, without a line end
            numbers.append(first + len(pieces) - 1)
            items.append(pieces[-1])
        return Batch(self.file_index, self.path, self.format, numbers, items, self.input_bytes)

    def split(self, pieces: int) -> list[Batch]:
        """Consecutive smaller batches holding the same records in the same order (at most `pieces`); the input
        bytes are shared out so that they add up to this batch's."""
        if self.span is not None:
            return self.load().split(pieces)
        pieces = max(1, min(pieces, len(self.items)))
        bounds = [len(self.items) * i // pieces for i in range(pieces + 1)]
        shares = [self.input_bytes * i // pieces for i in range(pieces + 1)]
        return [Batch(self.file_index, self.path, self.format, self.numbers[a:b], self.items[a:b], y - x)
                for a, b, x, y in zip(bounds, bounds[1:], shares, shares[1:])]


class BadRecord(str):
    """A record that cannot become a document; the text is the message, starting with where it is."""


def expand_inputs(specs: list[str]) -> list[Path]:
    """Every input path named by `specs`, in order: globs sorted, directories' files sorted; each path once."""
    out: list[Path] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"--input {spec}: the pattern matches no file")
            found = [p for m in matches for p in _expand_path(Path(m))]
        elif Path(spec).exists():
            found = _expand_path(Path(spec))
            if not found:
                raise UserError(f"--input {spec}: the directory holds no input file")
        else:
            raise FileNotFoundError(f"--input {spec} does not exist")
        out += found
    seen: dict[Path, Path] = {}
    for p in out:
        key = p.resolve()
        if key in seen:
            raise UserError(f"--input names {p} twice (also as {seen[key]}): its documents would be tokenized twice")
        seen[key] = p
    return out


def _expand_path(path: Path) -> list[Path]:
    if not path.is_dir() or is_hf_dataset(path):
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise UserError(f"--input {path} is an HF DatasetDict with splits {splits}: pass one split's directory, "
                        f"e.g. {path / splits[0]}" if splits else f"--input {path} is an HF DatasetDict without splits")
    files: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        files += _expand_path(child) if child.is_dir() else [child]
    return files


def parts(f: InputFile) -> list[Path]:
    """The files holding an input's bytes: the file itself, or an HF dataset's Arrow files."""
    return hf_files(f.path) if f.format == "hf" else [f.path]


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (path / HF_STATE).is_file() and (path / "dataset_info.json").is_file()


def hf_files(path: Path) -> list[Path]:
    """The Arrow files of a datasets.save_to_disk directory, in row order."""
    try:
        state = json.loads((path / HF_STATE).read_text())
        return [path / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path / HF_STATE}: not a datasets.save_to_disk state file ({e})") from None


def detect(path: Path, fmt: str = "auto") -> InputFile:
    """How to read `path`: `fmt` when given (compression is still read from the content), else sniffed."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if path.is_dir():
        if not is_hf_dataset(path):
            raise UserError(f"{path}: a directory that is not an HF datasets.save_to_disk dataset")
        if fmt not in ("auto", "hf"):
            raise UserError(f"{path}: an HF dataset directory, not --format {fmt}")
        return InputFile(path, "hf", None, sum(f.stat().st_size for f in hf_files(path)))
    if fmt == "hf":
        raise UserError(f"{path}: --format hf reads datasets.save_to_disk directories, this is a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    compression = "gzip" if magic[:2] == GZIP_MAGIC else "zstd" if magic == ZSTD_MAGIC else None
    if magic == PARQUET_MAGIC or fmt == "parquet":
        if magic != PARQUET_MAGIC:
            raise UserError(f"{path}: --format parquet, but the file does not start with parquet's magic bytes")
        return InputFile(path, "parquet", None, size)
    if fmt in ("jsonl", "text"):
        return InputFile(path, fmt, compression, size)
    head = _sniff(path, compression)
    first = next((line.strip() for line in head.splitlines() if line.strip()), b"")
    if first.startswith(b"{"):
        return InputFile(path, "jsonl", compression, size)
    stem = path.name.removesuffix(".gz").removesuffix(".zst")
    if stem.endswith(".txt") and _is_utf8_text(head):
        return InputFile(path, "text", compression, size)
    raise UserError(f"{path}: cannot tell its format (not gzip/zstd-compressed, not parquet, the first line is not a "
                    "JSON object); pass --format text to read it as plain text, one document per line")


def _is_utf8_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a character cut by the sniffing window
    return True


def _sniff(path: Path, compression: str | None) -> bytes:
    """The (decompressed) content up to its first non-blank line, at most SNIFF_BYTES; a damaged stream gives what
    precedes the damage (the reader then reports the damage with its line)."""
    chunks: list[bytes] = []
    with path.open("rb") as raw:
        stream = raw if compression is None else _wrap(raw, compression)
        try:
            while sum(map(len, chunks)) < SNIFF_BYTES:
                line = stream.readline(SNIFF_BYTES)
                chunks.append(line)
                if not line or line.strip():
                    break
        except _stream_errors(compression):
            pass
    return b"".join(chunks)


def read_batches(index: int, f: InputFile, key: str, max_items: int = 512, max_bytes: int = 1 << 20,
                 tail: tuple[int, int] | None = None) -> Iterator[Batch]:
    """The records of input `index` in batches of at most `max_items` records or about `max_bytes` of text; with
    `tail` (offset, bytes), an uncompressed line file's batches from that byte offset on hold about `bytes` each
    (the end of a job in small pieces, so that no worker waits long for another's last batch)."""
    if f.format in ("jsonl", "text") and f.compression is None:
        yield from _line_spans(index, f, max_items, max_bytes, tail or (f.size, max_bytes))
    elif f.format in ("jsonl", "text"):
        yield from _line_batches(index, f, max_items, max_bytes)
    else:
        yield from _arrow_batches(index, f, key, max_items)


def _stream_errors(compression: str | None) -> tuple[type[BaseException], ...]:
    """What reading a damaged stream raises: gzip OSError/EOFError/zlib.error, zstandard ZstdError."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if compression == "zstd":
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def _line_batches(index: int, f: InputFile, max_items: int, max_bytes: int) -> Iterator[Batch]:
    errors = _stream_errors(f.compression)
    raw = f.path.open("rb")
    stream = raw if f.compression is None else _wrap(raw, f.compression)
    numbers: list[int] = []
    items: list[bytes] = []
    nbytes, reported, lineno = 0, 0, 0
    try:
        with stream:
            while True:
                try:
                    line = stream.readline()
                except errors as e:
                    raise UserError(f"{f.path}:{lineno + 1}: corrupt {f.compression} data ({e}); the file is "
                                    "truncated or damaged") from None
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                numbers.append(lineno)
                items.append(line)
                nbytes += len(line)
                if len(items) >= max_items or nbytes >= max_bytes:
                    pos = raw.tell() if f.compression else reported + nbytes
                    yield Batch(index, str(f.path), f.format, numbers, items, min(pos, f.size) - reported)
                    reported = min(pos, f.size)
                    numbers, items, nbytes = [], [], 0
    finally:
        raw.close()
    yield Batch(index, str(f.path), f.format, numbers, items, f.size - reported)


def _line_spans(index: int, f: InputFile, max_items: int, max_bytes: int,
                tail: tuple[int, int]) -> Iterator[Batch]:
    """Span batches of an uncompressed line file: whole lines, at most `max_items` (blank lines count) or about
    `max_bytes` (a longer line is a batch of its own). The reader reads each byte once to find line ends and count
    lines (for the line numbers of error messages); the encoder reads its span again (`Batch.load`)."""
    start, number, pending, eof = 0, 1, b"", False  # `pending` (read, in no batch yet) starts at byte `start`
    with f.path.open("rb") as raw:
        while True:
            want = tail[1] if start >= tail[0] else max_bytes
            if len(pending) < want and not eof:
                more = raw.read(want - len(pending))
                eof = len(more) < want - len(pending)
                pending += more
            if eof and len(pending) <= want:
                cut = len(pending)
            else:
                cut, searched = pending.rfind(b"\n", 0, want) + 1, want
                while not cut:  # one line longer than `want`: up to its end
                    cut = pending.find(b"\n", searched) + 1
                    if not cut and eof:
                        cut = len(pending)
                    elif not cut:
                        searched = len(pending)
                        more = raw.read(max_bytes)
                        eof = not more
                        pending += more
            if not cut:
                return
            lines = pending.count(b"\n", 0, cut)
            if lines > max_items:
                cut = 0
                for _ in range(max_items):
                    cut = pending.index(b"\n", cut) + 1
                lines = max_items
            if eof and cut == len(pending) and not pending.endswith(b"\n"):
                lines += 1  # the file's last line, without a line end
            yield Batch(index, str(f.path), f.format, [], [], cut, (start, cut, number, lines))
            number, start, pending = number + lines, start + cut, pending[cut:]


def _wrap(raw: io.BufferedReader, compression: str) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    import zstandard

    # read_across_frames: a .zst written as several frames (as parallel compressors do) is one stream
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    return io.BufferedReader(reader)  # type: ignore[arg-type,return-value]


def _arrow_batches(index: int, f: InputFile, key: str, max_items: int) -> Iterator[Batch]:
    import pyarrow as pa

    row, reported = 0, 0
    for reader, total_rows, nbytes in _arrow_sources(f):
        names = reader.schema.names
        column = key if key in names else "tokens" if "tokens" in names else None
        if column is None:
            raise UserError(f"{f.path}: no column {key!r} (columns: {', '.join(names)}); pass --column NAME")
        start, done = reported, 0
        try:
            for record_batch in reader.iter_batches(max_items, column):
                values = record_batch.column(0).to_pylist()
                done += len(values)
                pos = start + (nbytes * done // total_rows if total_rows else 0)
                yield Batch(index, str(f.path), f.format, list(range(row, row + len(values))), values,
                            pos - reported)
                reported, row = pos, row + len(values)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{f.path}:row {row}: unreadable ({e})") from None
        yield Batch(index, str(f.path), f.format, [], [], start + nbytes - reported)
        reported = start + nbytes


class _Parquet:
    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        self.schema = self.file.schema_arrow

    def iter_batches(self, size: int, column: str) -> Iterator[Any]:
        return self.file.iter_batches(batch_size=size, columns=[column])


class _ArrowStream:
    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        try:
            self.reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Arrow stream of a saved HF dataset ({e})") from None
        self.schema = self.reader.schema

    def iter_batches(self, size: int, column: str) -> Iterator[Any]:
        for batch in self.reader:
            batch = batch.select([column])
            for start in range(0, batch.num_rows, size):
                yield batch.slice(start, size)


def _arrow_sources(f: InputFile) -> Iterator[tuple[Any, int, int]]:
    """(reader, its rows or 0 when unknown up front, its bytes) for the parquet file or each Arrow file of an HF
    dataset, in the dataset's row order."""
    if f.format == "parquet":
        p = _Parquet(f.path)
        yield p, p.file.metadata.num_rows, f.size
        return
    for arrow in hf_files(f.path):
        yield _ArrowStream(arrow), 0, arrow.stat().st_size


def decode_batch(batch: Batch, key: str) -> list[tuple[str, str | list | BadRecord]]:
    """(where, document) for each record: its text, its token ids (a list, for pre-tokenized data: a JSON object
    without `key` but with `tokens`, or `key` holding a list), or a BadRecord saying why it is none."""
    out: list[tuple[str, str | list | BadRecord]] = []
    sep = ":" if batch.format in ("jsonl", "text") else ":row "
    for number, item in zip(batch.numbers, batch.items):
        where = f"{batch.path}{sep}{number}"
        out.append((where, _decode(where, batch.format, item, key)))
    return out


def _decode(where: str, fmt: str, item: Any, key: str) -> str | list | BadRecord:
    if fmt == "text":
        try:
            return item.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError as e:
            return BadRecord(f"{where}: not UTF-8 text (byte {e.start})")
    if fmt == "jsonl":
        try:
            obj = json.loads(item)
        except UnicodeDecodeError as e:
            return BadRecord(f"{where}: not UTF-8 text (byte {e.start})")
        except json.JSONDecodeError as e:
            return BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
        field = key if isinstance(obj, dict) and key in obj else "tokens"
        if not isinstance(obj, dict) or field not in obj:
            return BadRecord(f"{where}: expected a JSON object with {key!r} (text) or 'tokens' (ids)")
        item = obj[field]
    if isinstance(item, (str, list)):
        return item
    return BadRecord(f"{where}: expected text or a list of token ids, got {type(item).__name__}")
