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

`engines` picks who runs the models: transformers (in the spawned process) and/or vLLM (engines/vllm_engine.py: a
worker under the vLLM environment's interpreter, on the same prompts, timed by the same definitions on a warm
engine). Every vLLM measurement also checks its greedy tokens against transformers' (the first `CHECK_TOKENS` of
every row, transformers run in its own fresh process) and carries the agreement into the figures and the table.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from megatron_slim.errors import UserError
from megatron_slim.runtime import json_out
from megatron_slim.runtime.config_loader import setting
from megatron_slim.runtime.fla_package import enter_fla_without_its_init

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("transformers", "vllm")
DEVICES = ("auto", "cpu", "cuda")
CHECK_TOKENS = 16  # greedy tokens per row compared between vLLM and transformers (fewer when gen_len + 1 is less)


@dataclass(frozen=True, kw_only=True)
class BenchInferenceJob:
    """The `bench-inference` command's flags, by the same names."""

    models: tuple[str, ...] = setting(help="HF checkpoint directory (repeat; the first is the baseline of the ratios)",
                                      flag="model", many="append")
    batch: int = setting(1, help="prompts per batch")
    prompt_len: int = setting(512, help="prompt tokens")
    gen_len: int = setting(64, help="greedy tokens decoded per prompt")
    dtype: str = setting("bfloat16", help="weights and compute dtype", choices=DTYPES)
    device: str = setting("auto", help="auto: cuda when available", choices=DEVICES)
    warmup: int = setting(1, help="untimed rounds first")
    repeats: int = setting(3, help="timed rounds (medians reported)")
    engines: tuple[str, ...] = setting(("transformers",), flag="engine", many="append", choices=ENGINES,
                                       help="who runs the models (repeat for both; default transformers): vllm runs "
                                            "a worker under the vLLM environment's interpreter and checks its greedy "
                                            "tokens against transformers")
    vllm_python: str | None = setting(None, help="the vLLM environment's interpreter (default: .vllm-venv/bin/python, "
                                                 "`make vllm-env`)")
    json: bool = setting(False, help="print one JSON object")

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
        if self.device not in DEVICES:
            problems.append(f"{name('device')} must be auto, cpu or cuda, got {self.device!r}")
        engines = list(self.engines) if isinstance(self.engines, (list, tuple)) else [self.engines]
        bad = [e for e in engines if e not in ENGINES]
        if bad or not engines or len(set(engines)) != len(engines):
            problems.append(f"{name('engines')} must be distinct entries of {', '.join(ENGINES)}, got {engines!r}")
        return problems

    def python(self) -> Path:
        """The vLLM environment's interpreter this job uses."""
        from megatron_slim.engines.vllm_engine import default_python

        return Path(self.vllm_python) if self.vllm_python else default_python()

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
        if "vllm" in self.engines:
            problems = self.vllm_problems(self.models)
            if problems:
                raise UserError(problems[0])

    def vllm_problems(self, models: tuple[str | Path, ...],
                      name: Callable[[str], str] = lambda f: "--" + f.replace("_", "-")) -> list[str]:
        """Why vLLM cannot measure these HF checkpoints (others are skipped): no interpreter, or a combination
        known to fail (engines/vllm_engine.refusal)."""
        from megatron_slim.engines.vllm_engine import refusal

        problems = []
        python = self.python()
        if not os.access(python, os.X_OK) or python.is_dir():
            problems.append(f"{name('vllm_python')} {python}: no such interpreter (build the vLLM environment "
                            "with `make vllm-env`, or name one)")
        for model in models:
            if (Path(model) / "config.json").is_file():
                reason = refusal(model, self.dtype, self.resolved_device())
                if reason:
                    problems.append(f"{name('engines')}: vLLM refuses {model}: {reason}")
        return problems

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
    engine: str = "transformers"
    greedy_checked: int = 0  # vLLM: greedy tokens compared with transformers' over all rows (0: not compared)
    greedy_matching: int = 0  # of those, the tokens before each row's first disagreement

    def agreement(self) -> str:
        """The greedy check in words ("" for transformers itself)."""
        if not self.greedy_checked:
            return ""
        if self.greedy_matching == self.greedy_checked:
            return f"greedy = transformers ({self.greedy_checked} tokens)"
        return f"DIFFERS from transformers: {self.greedy_matching}/{self.greedy_checked} leading greedy tokens agree"


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


def make_prompts(vocab_size: int, job: BenchInferenceJob) -> "torch.Tensor":
    """The job's random prompts (seeded: the same for every model and engine of one vocabulary size)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (job.batch, job.prompt_len), generator=gen)


def _load(path: str, job: BenchInferenceJob, device: "torch.device"):
    import torch
    from transformers import AutoModelForCausalLM

    enter_fla_without_its_init()  # transformers' Qwen3-Next takes fla's kernels from their submodules
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, job.dtype), local_files_only=True,
                                                trust_remote_code=False).to(device).eval()


def greedy_reference(path: str, job: BenchInferenceJob, tokens: int) -> tuple[list[list[int]], int, int]:
    """Transformers' first `tokens` greedy tokens of every prompt row (argmax through the KV cache, as `measure`
    decodes), the model's parameter count and vocabulary size: what a vLLM measurement is checked against."""
    import torch

    device = torch.device(job.resolved_device())
    model = _load(path, job, device)
    prompts = make_prompts(model.config.vocab_size, job).to(device)
    out_tokens = []
    with torch.inference_mode():
        out = model(prompts, use_cache=True)
        for step in range(tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out_tokens.append(token)
            if step + 1 < tokens:
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
    rows = torch.cat(out_tokens, dim=1).tolist()
    return rows, sum(p.numel() for p in model.parameters()), model.config.vocab_size


def _leading_matches(got: list[int], want: list[int]) -> int:
    n = 0
    for a, b in zip(got, want):
        if a != b:
            break
        n += 1
    return n


def measure_vllm(path: str, job: BenchInferenceJob, reference: tuple[list[list[int]], int, int]) -> Measurement:
    """One model's figures from vLLM (engines/vllm_engine.py runs the worker), checked against transformers'
    greedy tokens `reference` (from `greedy_reference`, which also gives the parameter count and vocabulary)."""
    import torch

    from megatron_slim.engines.vllm_engine import run_worker

    rows, params, vocab = reference
    request = {"model": str(path), "dtype": job.dtype, "prompts": make_prompts(vocab, job).tolist(),
               "gen_len": job.gen_len, "warmup": job.warmup, "repeats": job.repeats}
    reply = run_worker(job.python(), request, device=job.resolved_device(), threads=torch.get_num_threads())
    decode = [g - p for p, g in zip(reply["prefill_s"], reply["generate_s"], strict=True)]
    checked = sum(len(r) for r in rows)
    matching = sum(_leading_matches(got, want) for got, want in zip(reply["greedy"], rows))
    return Measurement(path=str(path), params=params, peak_memory_bytes=int(reply["peak_memory_bytes"]),
                       prefill_s=statistics.median(reply["prefill_s"]),
                       decode_tokens_per_s=job.batch * job.gen_len / statistics.median(decode), engine="vllm",
                       greedy_checked=checked, greedy_matching=matching)


def measure(path: str, job: BenchInferenceJob) -> Measurement:
    """One model's figures, in this process (`bench_models` calls it in a fresh one per model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(job.resolved_device())
    cuda = device.type == "cuda"
    enter_fla_without_its_init()  # transformers' Qwen3-Next takes fla's kernels from their submodules
    with torch.device("meta"):  # imports the model's code (and its libraries) before the baseline is taken
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_peak_resident()
    model = _load(path, job, device)
    params = sum(p.numel() for p in model.parameters())
    prompts = make_prompts(model.config.vocab_size, job).to(device)

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
    """Every model of the job measured in its own fresh process, in order, engine by engine (all models with the
    first engine, then with the next). A vLLM disagreement with transformers is also warned about on stderr."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def fresh(fn: Callable, *args):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()

    job.validate()
    results = []
    for engine in job.engines:
        for path in job.models:
            if engine == "transformers":
                results.append(fresh(measure, path, job))
                continue
            reference = fresh(greedy_reference, path, job, min(CHECK_TOKENS, job.gen_len + 1))
            result = measure_vllm(path, job, reference)
            if result.greedy_matching != result.greedy_checked:
                print(f"warning: vLLM on {path}: {result.agreement()}", file=sys.stderr, flush=True)
            results.append(result)
    return results


def settings_line(job: BenchInferenceJob) -> str:
    return (f"batch {job.batch}, prompt {job.prompt_len} tokens, {job.gen_len} generated tokens, {job.dtype} on "
            f"{job.resolved_device()}, median of {job.repeats}, engines: {', '.join(job.engines)}")


def _baselines(results: list[tuple[str, Measurement]]) -> dict[str, Measurement]:
    """Each engine's first measurement: the baseline of that engine's ratios (engines are not compared by ratio:
    their absolute figures stand side by side)."""
    out: dict[str, Measurement] = {}
    for _, r in results:
        out.setdefault(r.engine, r)
    return out


def _ratios(r: Measurement, base: Measurement) -> tuple[float, float, float, float]:
    return (r.params / base.params, r.peak_memory_bytes / base.peak_memory_bytes, base.prefill_s / r.prefill_s,
            r.decode_tokens_per_s / base.decode_tokens_per_s)


def markdown_table(results: list[tuple[str, Measurement]]) -> str:
    """The efficiency table of labelled measurements in markdown; ratios against the first row of the same engine
    (the run report's), the vLLM rows' greedy agreement with transformers in the last column."""
    bases = _baselines(results)
    firsts = list(dict.fromkeys(label for label, r in results if r is bases[r.engine]))
    lines = [f"| model | engine | params | peak memory | prefill | decode | vs {' / '.join(firsts)} (same engine): "
             "params, memory, prefill speed-up, decode speed-up | greedy check |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results:
        p, m, f, d = _ratios(r, bases[r.engine])
        lines.append(f"| {label} | {r.engine} | {r.params / 1e6:.1f}M | {r.peak_memory_bytes / 1e9:.3f} GB | "
                     f"{r.prefill_s * 1e3:.1f} ms | {r.decode_tokens_per_s:.1f} tok/s | "
                     f"{p:.3f}x, {m:.3f}x, {f:.2f}x, {d:.2f}x | {r.agreement() or '-'} |")
    return "\n".join(lines)


def format_table(results: list[Measurement], job: BenchInferenceJob) -> str:
    """The paper's efficiency table: figures per model and engine, ratios to the engine's first model, and the
    vLLM rows' greedy agreement with transformers."""
    bases = _baselines([("", r) for r in results])
    lines = [settings_line(job),
             f"{'model':<32} {'engine':<12} {'params':>10} {'peak memory':>12} {'prefill':>10} {'decode':>12}  "
             "vs the engine's first: params, memory, prefill speed-up, decode speed-up"]
    for r in results:
        p, m, f, d = _ratios(r, bases[r.engine])
        lines.append(f"{Path(r.path).name[-32:]:<32} {r.engine:<12} {r.params / 1e6:>9.1f}M "
                     f"{r.peak_memory_bytes / 1e9:>10.3f}GB {r.prefill_s * 1e3:>8.1f}ms "
                     f"{r.decode_tokens_per_s:>8.1f}tok/s  {p:.3f}x {m:.3f}x {f:.2f}x {d:.2f}x"
                     + (f"  {r.agreement()}" if r.agreement() else ""))
    return "\n".join(lines)


def run_bench_inference(job: BenchInferenceJob) -> int:
    """Measure every model and print the table, or with `job.json` one JSON object; the exit status."""
    results = bench_models(job)
    if job.json:
        json_out.emit(({"models": [asdict(r) for r in results],
                          "settings": {"batch": job.batch, "prompt_len": job.prompt_len, "gen_len": job.gen_len,
                                       "dtype": job.dtype, "device": job.resolved_device(), "repeats": job.repeats,
                                       "engines": list(job.engines)}}))
    else:
        print(format_table(results, job))
    return 0
