"""Deployment efficiency of HF checkpoints (exports): peak memory, prefill latency and decode throughput with
transformers, the paper's efficiency table (teacher vs students). `BenchInferenceJob` holds the `bench-inference`
command's flags; `bench_models` measures, `format_table` prints, `run_bench_inference` does both.

Each model is measured in a fresh spawned process, so that one model's allocations never count toward the next
one's peak. In that process: a batch of random prompts (seeded, the same for every model of one vocabulary size)
goes through `--warmup` untimed rounds, then `--repeats` timed rounds of prefill (one forward over the prompts,
filling the KV cache) and decode (`--gen-len` greedy steps of one token each through the cache); the medians are
reported. Peak memory is what the model adds to the process: on CUDA `torch.cuda.max_memory_allocated`, on the
CPU the process's resident high-water mark (reset just before loading the weights, the model's code already
imported) minus its resident set at that moment.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from megatron_slim.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class BenchInferenceJob:
    """The `bench-inference` command's flags, by the same names."""

    models: tuple[str, ...]  # HF checkpoint directories; the first is the baseline of the ratios
    batch: int = 1
    prompt_len: int = 512
    gen_len: int = 64
    dtype: str = "bfloat16"
    device: str = "auto"  # "auto": cuda when available, else cpu
    warmup: int = 1
    repeats: int = 3
    json: bool = False

    def settings_problems(self, name: Callable[[str], str] = lambda f: "--" + f.replace("_", "-")) -> list[str]:
        """What is wrong with the measurement settings (not the models), each naming its setting through `name`
        (the command's flags by default; a recipe names its keys)."""
        problems = []
        for key in ("batch", "prompt_len", "gen_len", "repeats"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name(key)} must be an integer >= 1, got {value!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            problems.append(f"{name('warmup')} must be an integer >= 0, got {self.warmup!r}")
        if self.dtype not in DTYPES:
            problems.append(f"{name('dtype')} must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"{name('device')} must be auto, cpu or cuda, got {self.device!r}")
        return problems

    def validate(self) -> None:
        """Refuse what cannot be measured, before any model is loaded; messages name the command's flags."""
        import torch

        if not self.models:
            raise UserError("give at least one --model")
        problems = self.settings_problems()
        if problems:
            raise UserError(problems[0])
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        for model in self.models:
            path = Path(model)
            if not (path / "config.json").is_file():
                megatron = (path / "model_config.json").is_file()
                hint = " (a Megatron checkpoint: export it to HF first)" if megatron else ""
                raise UserError(f"--model {model} is not an HF checkpoint directory (config.json){hint}")

    def resolved_device(self) -> str:
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device


@dataclass(frozen=True)
class Measurement:
    """One model's figures (the `--json` object's entries)."""

    path: str
    params: int
    peak_memory_bytes: int
    prefill_s: float  # median seconds of one prefill of the whole batch
    decode_tokens_per_s: float  # median generated tokens per second over the batch (batch * gen_len / decode time)


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise UserError(f"/proc/self/status has no {field}: CPU peak memory is measured on Linux only")


def _reset_peak_resident() -> int:
    """Reset this process's resident high-water mark to its current resident set (Linux clear_refs 5) and return
    that. Not getrusage's ru_maxrss: it survives fork and exec, so a process started by a large parent (a run
    that has trained models) would report the parent's peak."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def measure(path: str, job: BenchInferenceJob) -> Measurement:
    """One model's figures, in this process (`bench_models` calls it in a fresh one per model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(job.resolved_device())
    cuda = device.type == "cuda"
    with torch.device("meta"):  # imports the model's code (and its libraries) before the baseline is taken
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_peak_resident()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, job.dtype), local_files_only=True,
                                                 trust_remote_code=False).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (job.batch, job.prompt_len), generator=gen).to(device)

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    prefill_times, decode_times = [], []
    with torch.inference_mode():
        for round_ in range(job.warmup + job.repeats):
            start = clock()
            out = model(prompts, use_cache=True)
            prefilled = clock()
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(job.gen_len):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            done = clock()
            if round_ >= job.warmup:
                prefill_times.append(prefilled - start)
                decode_times.append(done - prefilled)
            del out, cache
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else _status_bytes("VmHWM") - base
    return Measurement(path=str(path), params=params, peak_memory_bytes=int(peak),
                       prefill_s=statistics.median(prefill_times),
                       decode_tokens_per_s=job.batch * job.gen_len / statistics.median(decode_times))


def bench_models(job: BenchInferenceJob) -> list[Measurement]:
    """Every model of the job measured in its own fresh process, in order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    job.validate()
    results = []
    for path in job.models:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(measure, path, job).result())
    return results


def settings_line(job: BenchInferenceJob) -> str:
    return (f"batch {job.batch}, prompt {job.prompt_len} tokens, {job.gen_len} generated tokens, {job.dtype} on "
            f"{job.resolved_device()}, median of {job.repeats}")


def markdown_table(results: list[tuple[str, Measurement]]) -> str:
    """The efficiency table of labelled measurements in markdown, ratios against the first (the run report's)."""
    base = results[0][1]
    lines = [f"| model | params | peak memory | prefill | decode | vs {results[0][0]}: params, memory, prefill "
             "speed-up, decode speed-up |", "|---|---|---|---|---|---|"]
    for label, r in results:
        lines.append(f"| {label} | {r.params / 1e6:.1f}M | {r.peak_memory_bytes / 1e9:.3f} GB | "
                     f"{r.prefill_s * 1e3:.1f} ms | {r.decode_tokens_per_s:.1f} tok/s | "
                     f"{r.params / base.params:.3f}x, {r.peak_memory_bytes / base.peak_memory_bytes:.3f}x, "
                     f"{base.prefill_s / r.prefill_s:.2f}x, {r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x |")
    return "\n".join(lines)


def format_table(results: list[Measurement], job: BenchInferenceJob) -> str:
    """The paper's efficiency table: figures per model and ratios to the first model."""
    base = results[0]
    lines = [settings_line(job),
             f"{'model':<40} {'params':>12} {'peak memory':>12} {'prefill':>10} {'decode':>12}  vs first: "
             "params, memory, prefill speed-up, decode speed-up"]
    for r in results:
        lines.append(f"{Path(r.path).name[-40:]:<40} {r.params / 1e6:>11.1f}M {r.peak_memory_bytes / 1e9:>10.3f}GB "
                     f"{r.prefill_s * 1e3:>8.1f}ms {r.decode_tokens_per_s:>8.1f}tok/s  "
                     f"{r.params / base.params:.3f}x {r.peak_memory_bytes / base.peak_memory_bytes:.3f}x "
                     f"{base.prefill_s / r.prefill_s:.2f}x {r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x")
    return "\n".join(lines)


def run_bench_inference(job: BenchInferenceJob) -> int:
    """Measure every model and print the table, or with `job.json` one JSON object; the exit status."""
    results = bench_models(job)
    if job.json:
        print(json.dumps({"models": [asdict(r) for r in results],
                          "settings": {"batch": job.batch, "prompt_len": job.prompt_len, "gen_len": job.gen_len,
                                       "dtype": job.dtype, "device": job.resolved_device(), "repeats": job.repeats}}))
    else:
        print(format_table(results, job))
    return 0
