"""Writing Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`) as megatron-core's `IndexedDataset` reads them,
byte for byte what its `IndexedDatasetBuilder` writes for one sequence per document (tests/test_preprocess.py
compares the two).

Why not the builder itself: importing megatron-core costs seconds of CPU (torch, its transformer modules), serial
start-up before a `preprocess` job's workers can run; and the builder keeps ~80-136 bytes of Python objects per
document, while this writer keeps 4 (an int32 length) and takes whole batches of documents as numpy arrays.

The index format (version 1): the magic `MMIDIDX\\0\\0`, the version (<Q), the token dtype's code (<B), the number of
sequences and of document boundaries (<Q each), then the sequence lengths (int32), each sequence's byte offset in
the .bin (int64) and the document boundaries (int64, starting at 0).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


class IndexedWriter:
    """Appends documents to a .bin as they come; `finalize` writes the .idx. One sequence per document."""

    def __init__(self, bin_path: str | Path, dtype: type | np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"indexed datasets hold {', '.join(d.name for d in DTYPE_CODES)} tokens, not "
                             f"{self.dtype.name}")
        self.file: BinaryIO = open(bin_path, "wb")  # noqa: SIM115 (closed by finalize)
        self.lengths: list[np.ndarray] = []

    def add_documents(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their tokens concatenated (`ids`) and one length per document."""
        if int(lengths.sum()) != ids.size:
            raise ValueError(f"{ids.size} tokens but the document lengths add up to {int(lengths.sum())}")
        self.file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.lengths.append(np.asarray(lengths, dtype=np.int32))

    def finalize(self, idx_path: str | Path) -> None:
        """Close the .bin and write the index."""
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(idx_path, "wb") as f:
            f.write(INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size) + struct.pack("<Q", lengths.size + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(lengths.size + 1, dtype=np.int64).tobytes())
