"""HF safetensors <-> Megatron-Core torch_dist conversion, streamed one mapping rule at a time.

Memory holds the tensors of one rule (at most one layer's experts) plus I/O buffers, whatever the model size.
Outputs are written into `<out>.partial` and renamed into place only when complete, so an interrupted or failed
conversion never leaves a directory that looks finished.
"""
from __future__ import annotations

import json
from contextlib import closing, nullcontext
from itertools import accumulate
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_slim.checkpoint.files import HF_CONFIG, TOKENIZER_DIR, copy_side_files, staged
from megatron_slim.checkpoint.finite import CheckPool, FileRangeCheck, check_finite
from megatron_slim.checkpoint.layout import LayoutCheck, LayoutJob
from megatron_slim.checkpoint.mcore import MODEL_CONFIG
from megatron_slim.checkpoint.readahead import ReadAhead
from megatron_slim.checkpoint.safetensors_io import HFWriter
from megatron_slim.checkpoint.source import open_mcore, plan_hf_to_mcore
from megatron_slim.checkpoint.splice import MIN_SPLICE_BYTES, Range, Splices, page_aligned
from megatron_slim.checkpoint.writers import Summary, is_mcore_expert, plan_mcore, summarize
from megatron_slim.errors import CheckpointError
from megatron_slim.models.mapping import BoundRule
from megatron_slim.models.registry import hf_config_from
from megatron_slim.models.transforms import IDENTITY, Specs

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")


class BufferPool:
    """Tensors of the shapes a conversion needs again and again (every layer's expert stacks), reused instead of
    allocated anew: a fresh tensor of hundreds of MB is fresh mmapped memory, which the kernel faults in and zeroes
    page by page once it is filled (at 9 GB, 2.4M page faults, most of the system time when the stacks are read
    rather than spliced). `empty` hands out a free tensor
    of that shape and dtype (or a new one); `release()` makes every tensor handed out free again."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._used: list[torch.Tensor] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype))
        t = free.pop() if free else torch.empty(shape, dtype=dtype)
        self._used.append(t)
        return t

    def release(self) -> None:
        for t in self._used:
            self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)
        self._used.clear()


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, dry_run: bool = False, overwrite: bool = False,
                progress: bool = True, layout_job: LayoutJob | None = None, allow_nonfinite: bool = False) -> Summary:
    """`layout_job`: the layout child for `hf_dir`, if the caller started it already (see `LayoutJob`).
    NaN/Inf weights are refused as they are read (`checkpoint.finite`) unless `allow_nonfinite`."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg, rules, reader = plan_hf_to_mcore(hf_dir)
    # megatron-core's layout (seconds of imports and a meta model) is made by a child process on another core while
    # the disk reads ahead and the tensors stream; the plan is checked against it as soon as it is there
    with LayoutCheck(cfg, layout_job) as layout, \
            nullcontext() if dry_run else ReadAhead(reader.ranges([k for r in rules for k in r.hf])) as read_ahead:
        planned, owner, summary = plan_mcore(cfg, layout, (
            (f"{rule.where} ({', '.join(rule.hf[:3])})",
             {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in zip(
                 rule.mcore, rule.transform.mcore_specs([(info.shape, info.dtype) for info in map(
                     reader.tensors.__getitem__, rule.hf)], cfg))})
            for rule in rules))
        if dry_run:
            layout.objects()
            return summary

        cache: dict[str, torch.Tensor] = {}
        pool = BufferPool()
        file_check = None if allow_nonfinite else FileRangeCheck()
        where = str(hf_dir)

        def checked(key: str, t: torch.Tensor) -> torch.Tensor:
            if file_check is not None:
                check_finite(where, key, t)
            return t

        def check_stored(keys: list[str]) -> None:
            """Tensors whose bytes are copied file to file: checked from the file (the page cache) first."""
            if file_check is not None:
                for k in keys:
                    info = reader.tensors[k]
                    file_check.check(where, k, info.file, info.start, info.nbytes, info.dtype)
        bar = tqdm(total=summary.bytes, unit="B", unit_scale=True, desc="hf->mcore", disable=not progress)

        def group(rule: BoundRule) -> list[torch.Tensor]:
            """The rule's megatron tensors: those that only move bytes are placeholders whose bytes the writer
            copies from the HF files (see `splice`); the others are computed from the HF tensors read."""
            infos = [reader.tensors[k] for k in rule.hf]
            if rule.transform.slots is not None:
                out, views = rule.transform.slots([reader.meta(k) for k in rule.hf], cfg, pool.empty)
                if out.nbytes < MIN_SPLICE_BYTES:
                    for k, view in zip(rule.hf, views, strict=True):
                        reader.read_into(k, view)
                        checked(k, view)
                    return [out]
                placed = sorted(zip((v.data_ptr() - out.data_ptr() for v in views), range(len(infos))))
                if [at for at, _ in placed] != list(accumulate((infos[i].nbytes for _, i in placed[:-1]), initial=0)):
                    raise RuntimeError(f"{rule.where}: the slots of {rule.transform.name} do not tile its output")
                check_stored(rule.hf)
                splices.add(out, [(infos[i].file, infos[i].start, infos[i].nbytes) for _, i in placed])
                return [out]
            if rule.transform is IDENTITY and infos[0].nbytes >= MIN_SPLICE_BYTES:
                check_stored(rule.hf)
                out = torch.empty(infos[0].shape, dtype=infos[0].dtype)  # never touched: no memory
                splices.add(out, [(infos[0].file, infos[0].start, infos[0].nbytes)])
                return [out]
            return rule.transform.to_mcore([checked(k, reader.read(k)) for k in rule.hf], cfg)

        def produce(key: str) -> torch.Tensor:
            layout.poll()
            if key not in cache:
                rule = rules[owner[key]]
                cache.clear()
                pool.release()  # the writer is done with the previous group's tensors (it writes synchronously)
                cache.update(zip(rule.mcore, group(rule)))
                read_ahead.consumed(sum(reader.tensors[k].nbytes for k in rule.hf))
            t = cache.pop(key)
            bar.update(t.numel() * t.element_size())
            return t

        from megatron_slim.checkpoint.dcp_io import write_checkpoint  # DCP: seconds to import, mcore-to-hf skips it

        with staged(out_dir, overwrite, [hf_dir]) as tmp, closing(Splices()) as splices:
            write_checkpoint(tmp, [(k, tuple(t.shape), t.dtype) for k, t in planned.items()], layout.objects,
                             produce, splices)
            (tmp / MODEL_CONFIG).write_text(json.dumps(cfg.to_json(), indent=1))
            copy_side_files(hf_dir, tmp / TOKENIZER_DIR)
        bar.close()
    return summary


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, *, hf_template: str | Path | None = None,
                dry_run: bool = False, overwrite: bool = False, progress: bool = True,
                allow_nonfinite: bool = False) -> Summary:
    """NaN/Inf weights are refused as they are read (`checkpoint.finite`) unless `allow_nonfinite`."""
    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    cfg, rules, reader = open_mcore(mcore_dir)
    needed = [k for r in rules for k in r.mcore]
    unused = sorted(k for k in reader.tensors if k.startswith(_MODEL_PREFIXES) and k not in set(needed))
    if unused:
        raise CheckpointError(f"{mcore_dir}: model tensors not consumed by the {cfg.family} mapping: {unused[:10]}")
    specs = {k: reader.tensors[k] for k in needed}  # (shape, dtype) of each megatron tensor
    hf_specs = [rule.transform.hf_specs([specs[k] for k in rule.mcore], cfg) for rule in rules]
    plan = [(k, shape, dtype) for rule, outs in zip(rules, hf_specs) for k, (shape, dtype) in zip(rule.hf, outs)]
    summary = summarize(cfg, {k: reader.meta(k) for k in needed}, is_mcore_expert)
    if dry_run:
        return summary
    bar = tqdm(total=summary.bytes, unit="B", unit_scale=True, desc="mcore->hf", disable=not progress)

    def byte_ranges(rule: BoundRule, outs: Specs) -> list[Range] | None:
        """Where each of the rule's HF tensors (of shapes and dtypes `outs`) lies, if every one is a contiguous run
        of bytes of the rule's one stored megatron tensor (a transform that only moves bytes: identity, expert
        stacks, [gate; up]): their bytes are then copied file to file. The places are the transform's `slots`,
        worked out on meta tensors (views only: no data, no torch._dynamo)."""
        stored = reader.tensor_bytes(rule.mcore[0]) if len(rule.mcore) == 1 else None
        if stored is None:
            return None
        path, start, nbytes = stored
        if rule.transform is IDENTITY:
            places = [(0, nbytes)]
        elif rule.transform.slots is not None:
            out, views = rule.transform.slots([torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in outs],
                                              cfg, lambda shape, dtype: torch.empty(shape, dtype=dtype, device="meta"))
            if out.nbytes != nbytes or not all(v.is_contiguous() for v in views):
                raise RuntimeError(f"{rule.where}: the slots of {rule.transform.name} do not tile its stored tensor")
            places = [(v.storage_offset() * v.element_size(), v.nbytes) for v in views]
        else:
            return None
        if any(n < MIN_SPLICE_BYTES for _, n in places):
            return None
        return [(path, start + at, n) for at, n in places]

    with ReadAhead(reader.ranges(needed)) as read_ahead, staged(out_dir, overwrite, [mcore_dir]) as tmp, \
            closing(Splices()) as splices, nullcontext() if allow_nonfinite else CheckPool() as checks:
        writer = HFWriter(tmp, plan, splices=splices)
        for rule, outs in zip(rules, hf_specs):
            ranges = byte_ranges(rule, outs)
            if ranges is not None:
                (stored,) = rule.mcore
                whole = reader.tensor_bytes(stored)[1:]  # the error counts over all of it
                for key, (shape, dtype), (path, start, nbytes) in zip(rule.hf, outs, ranges, strict=True):
                    piece = (str(mcore_dir), stored, path, start, nbytes, dtype)
                    if checks is None:
                        writer.write_ranges(key, shape, dtype, [(path, start, nbytes)])
                    elif page_aligned(start, writer.offset(key)):
                        # copied by the kernel, then read back from the page cache and checked by the pool's
                        # threads while this one goes on
                        writer.write_ranges(key, shape, dtype, [(path, start, nbytes)])
                        checks.submit(*piece, whole=whole)
                    else:  # the kernel would copy it at half speed: the pool's threads copy it as they check it
                        checks.submit(*piece, whole=whole, into=writer.reserve(key, shape, dtype))
                moved = sum(nbytes for _, _, nbytes in ranges)
            else:
                tensors = reader.read(rule.mcore)
                if not allow_nonfinite:
                    for key, t in zip(rule.mcore, tensors):
                        check_finite(str(mcore_dir), key, t)
                for key, t in zip(rule.hf, rule.transform.to_hf(tensors, cfg), strict=True):
                    writer.write(key, t)
                moved = sum(t.nbytes for t in tensors)
            read_ahead.consumed(moved)
            bar.update(moved)
        if checks is not None:
            checks.finish()
        writer.close()
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config_from(cfg), indent=2))
        copy_side_files(mcore_dir / TOKENIZER_DIR, tmp)
        if hf_template is not None:
            copy_side_files(Path(hf_template), tmp)
    bar.close()
    return summary
