"""Peak memory and time of the chunked `kd_loss` versus a naive full-logits implementation (forward + backward).

The naive version is what one writes first: log_softmax of both logits in fp32, the divergence, autograd. It keeps
several tokens x vocab fp32 tensors alive for the backward. Ours keeps the gradient (one tensor shaped like the
student logits) plus a few chunk buffers, so its peak extra memory should stay <= 1.3x the two logits tensors.

Peak extra memory = peak during forward+backward minus the memory held just before (the logits). On CUDA it comes
from torch.cuda.max_memory_allocated; on CPU from the process RSS sampled every millisecond in a thread (torch's
CPU allocations are invisible to tracemalloc; large buffers are mmap-backed, so freeing them lowers RSS).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_kd_loss.py --device cpu --tokens 2048
"""
from __future__ import annotations

import argparse
import gc
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
    args = parser.parse_args()

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
