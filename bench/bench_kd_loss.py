"""Peak memory and time of the chunked `kd_loss` versus a naive full-logits implementation (forward + backward).

The naive version is what one writes first: log_softmax of both logits in fp32, the divergence, autograd. It keeps
several tokens x vocab fp32 tensors alive for the backward. Ours keeps the gradient (one tensor shaped like the
student logits) plus a few chunk buffers, so its peak extra memory should stay <= 1.3x the two logits tensors.

Peak extra memory = peak during forward+backward minus the memory held just before (the logits). On CUDA it comes
from torch.cuda.max_memory_allocated; on CPU from the process RSS sampled every millisecond in a thread (torch's
CPU allocations are invisible to tracemalloc; large buffers are mmap-backed, so freeing them lowers RSS).

At tensor parallelism (`--tp N`, CPU/gloo or one GPU per rank) each measurement runs in fresh processes, one per
rank (`--fresh R` launches R such groups one after the other): a fresh process's allocator holds nothing yet, so
the chunks it requests and keeps (freed buffers it does not hand back to the system) count in the peak, as they
would in the first training step. Each rank holds its vocabulary shard (`--vocab` columns) of both logits; the
loss is reduced over the TP group as in training; every rank's reading is printed, and the largest is held
against the target.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_kd_loss.py --device cpu --tokens 2048
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_kd_loss.py --device cpu --tp 2 --fresh 3 --tokens 1024 --vocab 75968
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil
import torch
import torch.nn.functional as F

from megatron_slim.distill.losses import KD_KINDS, kd_loss

GIB = 1024 ** 3


def naive_kd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str,
             temperature: float) -> torch.Tensor:
    """Full-vocabulary reference: fp32 log-softmaxes, elementwise divergence, autograd does the rest."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "fkl":
        per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    elif kind == "rkl":
        per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    else:
        log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0))
        per_token = 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
                           + F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))
    return temperature ** 2 * (per_token * mask).sum() / mask.sum()


class RssPeak:
    """Highest resident set size seen by a sampling thread while the context is open."""

    def __init__(self, interval_s: float = 1e-3) -> None:
        self._proc = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval_s)

    def __enter__(self) -> RssPeak:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure(step: Callable[[], torch.Tensor], student: torch.Tensor, device: torch.device,
            repeats: int) -> tuple[float, float, torch.Tensor]:
    """(peak extra bytes of the last run, best forward+backward seconds, loss); leaves the gradient in student."""
    best = float("inf")
    for _ in range(repeats):
        student.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = step()
            loss.backward()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = psutil.Process().memory_info().rss
            with RssPeak() as rss:
                start = time.perf_counter()
                loss = step()
                loss.backward()
                best = min(best, time.perf_counter() - start)
            peak = rss.peak - base
    return float(peak), best, loss.detach()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_tp(args: argparse.Namespace) -> None:
    """--fresh groups of --tp fresh worker processes; each rank prints one JSON line, gathered here."""
    readings = []
    for run in range(args.fresh):
        port = _free_port()
        argv = list(sys.argv[1:])
        procs = []
        for rank in range(args.tp):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE=str(args.tp))
            procs.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker"], env=env,
                                          stdout=subprocess.PIPE, text=True))
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"rank {rank} of run {run + 1} failed ({proc.returncode})")
            reading = json.loads(out.strip().splitlines()[-1])
            readings.append(reading)
            print(f"run {run + 1} rank {rank}: peak extra {reading['peak'] / GIB:.3f} GiB = "
                  f"{reading['peak'] / reading['logits_bytes']:.2f}x its two logits shards "
                  f"({reading['logits_bytes'] / GIB:.3f} GiB), fwd+bwd {reading['seconds']:.3f} s, "
                  f"loss {reading['loss']:.6f}", flush=True)
    ratios = [r["peak"] / r["logits_bytes"] for r in readings]
    losses = {r["loss"] for r in readings}
    print(f"TP{args.tp}, fresh processes, {len(readings)} rank readings: peak extra / two logits shards "
          f"{min(ratios):.2f}-{max(ratios):.2f}x (target <= 1.30x: {'met' if max(ratios) <= 1.3 else 'MISSED'}); "
          f"loss {'equal on every rank and run' if len(losses) == 1 else f'DIFFERS: {sorted(losses)}'}")


def worker(args: argparse.Namespace) -> None:
    """One rank of a --tp measurement, in a process of its own: its shards of both logits, one forward+backward."""
    import torch.distributed as dist

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["RANK"]) % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device).manual_seed(1000 + rank)  # a different vocabulary shard on every rank
    student = torch.randn(args.tokens, args.vocab, generator=gen, device=device).mul_(3).to(dtype)
    teacher = torch.randn(args.tokens, args.vocab, generator=gen, device=device).mul_(3).to(dtype)
    student.requires_grad_()
    mask = torch.ones(args.tokens, device=device)
    dist.barrier()

    def ours() -> torch.Tensor:
        return kd_loss(student, teacher, kind=args.kind, temperature=args.temperature, loss_mask=mask,
                       tp_group=dist.group.WORLD, chunk_tokens=args.chunk_tokens)

    peak, seconds, loss = measure(ours, student, device, 1)
    dist.destroy_process_group()
    print(json.dumps({"peak": peak, "seconds": seconds, "loss": loss.item(),
                      "logits_bytes": student.nbytes + teacher.nbytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="batch x sequence tokens")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (one TP shard)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--kind", choices=KD_KINDS, default="fkl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default: the library's automatic choice")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--skip-naive", action="store_true", help="only ours (the naive needs ~8x the logits)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, each in a fresh process (ours only)")
    parser.add_argument("--fresh", type=int, default=1, help="with --tp: groups of fresh processes to run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.tp > 1:
        return launch_tp(args)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    gen = torch.Generator(device).manual_seed(0)
    student = torch.randn(args.tokens, args.vocab, generator=gen, device=device).mul_(3).to(dtype)
    teacher = torch.randn(args.tokens, args.vocab, generator=gen, device=device).mul_(3).to(dtype)
    student.requires_grad_()
    mask = torch.ones(args.tokens, device=device)
    logits_bytes = student.nbytes + teacher.nbytes
    print(f"device={device} tokens={args.tokens} vocab={args.vocab} dtype={args.dtype} kind={args.kind} "
          f"T={args.temperature} threads={torch.get_num_threads()}")
    print(f"two logits tensors: {logits_bytes / GIB:.3f} GiB")

    def ours() -> torch.Tensor:
        return kd_loss(student, teacher, kind=args.kind, temperature=args.temperature, loss_mask=mask,
                       chunk_tokens=args.chunk_tokens)

    def naive() -> torch.Tensor:
        return naive_kd(student, teacher, mask, args.kind, args.temperature)

    results = {}
    for name, step in [("ours", ours)] + ([] if args.skip_naive else [("naive", naive)]):
        peak, seconds, loss = measure(step, student, device, repeats)
        results[name] = (peak, seconds, loss, student.grad)
        print(f"{name:>5}: peak extra {peak / GIB:7.3f} GiB = {peak / logits_bytes:5.2f}x logits, "
              f"fwd+bwd {seconds:7.3f} s, loss {loss.item():.6f}")
    ours_peak, ours_s, ours_loss, ours_grad = results["ours"]
    print(f"ours peak extra / two logits = {ours_peak / logits_bytes:.2f}x (target <= 1.30x)")
    if "naive" in results:
        naive_peak, naive_s, naive_loss, naive_grad = results["naive"]
        print(f"naive / ours: peak extra {naive_peak / ours_peak:.2f}x, time {naive_s / ours_s:.2f}x")
        print(f"|loss diff| {abs(ours_loss.item() - naive_loss.item()):.3e}, "
              f"max |grad diff| {(ours_grad.float() - naive_grad.float()).abs().max().item():.3e} "
              f"(max |grad| {naive_grad.float().abs().max().item():.3e})")


if __name__ == "__main__":
    main()
