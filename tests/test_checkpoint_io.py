"""The pieces under hf-to-mcore's streaming: kernel-copied (spliced) tensors, the DCP writer with late sharded
objects and unwrapped errors, megatron-core's side files, and the layout child's failure report."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch.utils.serialization import config as serialization_config

from megatron_slim.checkpoint.dcp_io import (
    MCORE_COMMON_FILE,
    MCORE_CONFIG,
    MCORE_CONFIG_FILE,
    write_checkpoint,
)
from megatron_slim.checkpoint.layout import LayoutJob
from megatron_slim.checkpoint.mcore_reader import McoreReader
from megatron_slim.checkpoint.splice import MIN_SPLICE_BYTES, Splices, SpliceStream
from megatron_slim.errors import CheckpointError

SOURCE_BYTES = 1 << 16


@pytest.fixture
def source(tmp_path) -> tuple[Path, bytes]:
    data = torch.randint(0, 256, (SOURCE_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "source.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, path.read_bytes()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes make NaNs, which torch.equal calls unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _save(tensor: torch.Tensor, f) -> None:
    """torch.save as the checkpoint writer calls it (CRC32 off)."""
    with serialization_config.patch({"save.compute_crc32": False}):
        torch.save(tensor, f)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read_fallback"])
def test_spliced_tensor_is_written_as_torch_save_writes_it(tmp_path, source, kernel_copy):
    """A placeholder whose bytes are three out-of-order file ranges comes out byte for byte as torch.save of the
    real tensor, at a non-zero offset, with writes before and after it."""
    path, blob = source
    ranges = [(path, 40000, 8192), (path, 8, 4096), (path, 20000, 12288)]
    real = torch.frombuffer(bytearray(b"".join(blob[o:o + n] for _, o, n in ranges)), dtype=torch.bfloat16)
    real = real.reshape(64, -1).clone()
    want = tmp_path / "want"
    with open(want, "wb") as f:
        f.write(b"header")
        _save(real, f)
        f.write(b"trailer")

    got = tmp_path / "got"
    splices = Splices()
    splices.kernel_copy = kernel_copy
    placeholder = torch.empty_like(real)
    splices.add(placeholder, ranges)
    with open(got, "wb") as f:
        stream = SpliceStream(f, splices)
        stream.write(b"header")
        _save(placeholder, stream)
        splices.check_written(placeholder, "real")
        stream.write(b"trailer")
    splices.close()
    assert got.read_bytes() == want.read_bytes()
    with open(got, "rb") as f:
        f.seek(6)
        assert _same_bits(torch.load(f, weights_only=True), real)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read_fallback"])
def test_spliced_range_past_the_end_of_its_file_is_an_error(tmp_path, source, kernel_copy):
    path, _ = source
    splices = Splices()
    splices.kernel_copy = kernel_copy
    placeholder = torch.empty(8192, dtype=torch.uint8)
    splices.add(placeholder, [(path, SOURCE_BYTES - 4096, 8192)])
    with open(tmp_path / "out", "wb") as f:
        _save(placeholder, SpliceStream(f, splices))
    with pytest.raises(CheckpointError, match="truncated at byte 65536"):
        splices.check_written(placeholder, "x")
    splices.close()


def test_splicing_with_crc32_on_is_refused(tmp_path, source):
    """With torch.save's CRC32 on, a placeholder would have to be read: refused, and reported after the write."""
    path, _ = source
    splices = Splices()
    placeholder = torch.empty(8192, dtype=torch.uint8)
    splices.add(placeholder, [(path, 0, 8192)])
    with open(tmp_path / "out", "wb") as f:
        torch.save(placeholder, SpliceStream(f, splices))
    with pytest.raises(RuntimeError, match="CRC32 off"):
        splices.check_written(placeholder, "x")
    splices.close()


def test_splices_take_only_what_they_can_write_whole(source):
    path, _ = source
    splices = Splices()
    with pytest.raises(ValueError, match="ranges of"):
        splices.add(torch.empty(MIN_SPLICE_BYTES, dtype=torch.uint8), [(path, 0, 16)])
    with pytest.raises(ValueError, match="own exactly its storage"):
        splices.add(torch.empty(2 * MIN_SPLICE_BYTES, dtype=torch.uint8)[:MIN_SPLICE_BYTES],
                    [(path, 0, MIN_SPLICE_BYTES)])


def test_write_checkpoint_names_objects_late_and_reads_back(tmp_path, source):
    """Sharded objects named only after the last tensor land in the metadata; spliced and computed tensors read
    back exactly; megatron-core's side files are its own."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
    from torch.distributed.checkpoint import FileSystemReader

    path, blob = source
    computed = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    spliced_real = torch.frombuffer(bytearray(blob[:MIN_SPLICE_BYTES * 2]), dtype=torch.float32).reshape(32, -1)
    placeholder = torch.empty_like(spliced_real)
    splices = Splices()
    splices.add(placeholder, [(path, 0, MIN_SPLICE_BYTES * 2)])
    asked: list[str] = []

    def produce(key: str) -> torch.Tensor:
        asked.append(key)
        return {"a": computed, "b": placeholder}[key]

    def objects() -> list[str]:
        assert asked == ["a", "b"], "objects are named after the tensors"
        return ["layer._extra_state/shard_0_1"]

    entries = [("a", (8, 8), torch.float32), ("b", tuple(spliced_real.shape), torch.float32)]
    write_checkpoint(tmp_path / "ckpt", entries, objects, produce, splices)
    splices.close()
    metadata = FileSystemReader(str(tmp_path / "ckpt")).read_metadata()
    assert sorted(metadata.state_dict_metadata) == ["a", "b", "layer._extra_state/shard_0_1"]
    reader = McoreReader(tmp_path / "ckpt")  # reads the metadata as records, without DCP's classes
    assert reader.tensors == {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
                              if k in ("a", "b")}
    a, b = reader.read(["a", "b"])
    assert _same_bits(a, computed) and _same_bits(b, spliced_real)
    assert MCORE_CONFIG == asdict(CheckpointingConfig(sharded_backend="torch_dist"))
    assert MCORE_COMMON_FILE == COMMON_STATE_FNAME
    assert (tmp_path / "ckpt" / MCORE_CONFIG_FILE).is_file() and (tmp_path / "ckpt" / MCORE_COMMON_FILE).is_file()


@pytest.mark.parametrize("where", ["produce", "objects"])
def test_write_checkpoint_raises_errors_unwrapped(tmp_path, where):
    """A corrupt input found mid-write surfaces as itself (the CLI prints it as one line), not as DCP's
    CheckpointException with a traceback in its message."""
    def produce(key: str) -> torch.Tensor:
        if where == "produce":
            raise CheckpointError("bad shard")
        return torch.zeros(4)

    def objects() -> list[str]:
        raise CheckpointError("bad shard")

    with pytest.raises(CheckpointError, match="^bad shard$"):
        write_checkpoint(tmp_path / "ckpt", [("a", (4,), torch.float32)], objects, produce)


def test_layout_child_failure_is_reported_with_its_output(tmp_path):
    with LayoutJob(tmp_path / "no-such-checkpoint") as job, pytest.raises(RuntimeError) as e:
        job.result()
    assert "learn its checkpoint layout failed" in str(e.value) and "no-such-checkpoint" in str(e.value)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read_fallback"])
def test_mcore_tensor_bytes_splice_into_hf_shards_exactly(tmp_path, kernel_copy):
    """mcore-to-hf's spliced path: each stored tensor's byte range (found from the item's zip record and its
    pickle) holds exactly its values, and pieces of it copied file to file by the HF writer, next to tensors
    written from memory, read back bit-exact from the safetensors shards."""
    from safetensors.torch import load_file

    from megatron_slim.checkpoint.safetensors_io import HFWriter

    gen = torch.Generator().manual_seed(2)
    stored = {"small": torch.randn(3, 5, generator=gen),
              "stack": torch.randn(4, 6, 512, generator=gen).to(torch.bfloat16),
              "wide": torch.randn(64, 130, generator=gen)}
    write_checkpoint(tmp_path / "ckpt", [(k, tuple(t.shape), t.dtype) for k, t in stored.items()], lambda: [],
                     stored.__getitem__)
    reader = McoreReader(tmp_path / "ckpt")
    for key, t in stored.items():
        path, start, nbytes = reader.tensor_bytes(key)
        with open(path, "rb") as f:
            f.seek(start)
            raw = bytearray(f.read(nbytes))
        assert nbytes == t.nbytes and _same_bits(torch.frombuffer(raw, dtype=t.dtype).view(t.shape), t), key

    path, start, _ = reader.tensor_bytes("stack")
    experts = list(stored["stack"].unbind(0))  # expert e is bytes [e * n, (e + 1) * n) of the stack
    plan = [("small", (3, 5), torch.float32)] + [(f"e{i}", (6, 512), torch.bfloat16) for i in range(4)]
    splices = Splices()
    splices.kernel_copy = kernel_copy
    out = tmp_path / "hf"
    out.mkdir()
    writer = HFWriter(out, plan, shard_bytes=2 * experts[0].nbytes, splices=splices)
    writer.write("small", stored["small"])
    for i, e in enumerate(experts):
        writer.write_ranges(f"e{i}", (6, 512), torch.bfloat16, [(path, start + i * e.nbytes, e.nbytes)])
    writer.close()
    splices.close()
    assert len(writer.files) > 1, "the copies span shards"
    back = {}
    for name in writer.files:
        back |= load_file(out / name)
    assert _same_bits(back["small"], stored["small"])
    for i, e in enumerate(experts):
        assert _same_bits(back[f"e{i}"], e), i
