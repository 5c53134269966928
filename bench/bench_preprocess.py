"""Tokenization throughput of `megatron-slim preprocess` with 1 and 2 workers, and of Megatron-LM's
`tools/preprocess_data.py` on the same jsonl and tokenizer when given a checkout (--megatron-lm DIR).

Corpus (default): the shipped English Wikipedia lead paragraphs (`megatron_slim.data.wiki`), joined five at a time
into documents of a few KB (like full articles), reshuffled per pass until the file holds --mb megabytes.
Tokenizer (default): SmolLM2's, the demo's (`megatron_slim.data.assets.smollm2_hf_dir`). Each command runs as a
fresh process, as a user runs it, and is timed end to end (start-up included) for --rounds interleaved rounds;
reported: each round's times and worker ratio, the median wall time, tokens/s (tokens in the written dataset / wall
time), tokens per CPU-second (all processes of the command, workers included: comparable even on a shared machine),
the ratio of 2 workers to 1 (per round, the median of the per-round ratios, and the ratio of the median times), and
ours against Megatron-LM at the same worker count. Outputs are compared byte for byte (1 vs 2 workers, and against
Megatron-LM's, which writes the same format). The machine's load average is printed before and after: figures taken
on a busy machine are not comparable.

The machine's ceiling (unless --no-ceiling): in every round, two independent single-worker jobs run side by side,
each on one half of the corpus's documents; their tokens over the slower one's wall time, divided by the single
worker's tokens/s of the same round, is what two cores give two jobs that share nothing (no feeding, no ordering):
the most a 2-worker run can reach on this machine at this moment (a VM's two cores are often slower together than
alone). Interleaving matters because a shared machine's speed drifts by 10-20% within minutes: a ratio is only
meaningful between runs taken close together, so each round's ratio is printed and the median taken, and every
other round runs its commands in reverse order (a steady drift favours neither).

Before the rounds, one untimed run on the corpus's first documents caches the tokenizer's spec
(`megatron_slim.data.tokenizer_spec`), as any earlier run with that tokenizer has: the rounds measure the steady
state, not the one-time ~5 CPU-s of loading it with transformers.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_preprocess.py --mb 60 --rounds 5 --workdir /tmp/prepbench
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_preprocess.py --mb 200 --rounds 3 --megatron-lm /path/Megatron-LM
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Wikipedia-paragraph documents until the file holds `mb` MB; returns the number of documents."""
    from megatron_slim.data.wiki import wiki_paragraphs

    paragraphs, rng, docs, size = wiki_paragraphs(), random.Random(seed), 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < mb * 1e6:
            rng.shuffle(paragraphs)
            for i in range(0, len(paragraphs) - 4, 5):
                line = json.dumps({"text": "\n\n".join(paragraphs[i:i + 5]), "id": docs}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                docs += 1
                if size >= mb * 1e6:
                    break
    return docs


def tokens_of(prefix: str) -> int:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)  # kept alive while its memory-mapped lengths are read
    return int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum())


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and all its reaped children: workers included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def same_bytes(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


def split_halves(corpus: Path, halves: tuple[Path, Path]) -> None:
    """The corpus's documents in two files, the first half of the lines and the rest (together: the same
    documents, so the halves' tokens add up to the whole's)."""
    lines = corpus.read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    halves[0].write_bytes(b"".join(lines[:half]))
    halves[1].write_bytes(b"".join(lines[half:]))


def side_by_side(argvs: list[list[str]], env: dict[str, str]) -> tuple[list[float], float]:
    """Run the commands at once: (each one's wall seconds, CPU seconds of all of them)."""
    walls = [0.0] * len(argvs)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)

    failures: list[str] = []

    def one(i: int) -> None:
        try:
            walls[i] = timed(argvs[i], env)[0]
        except SystemExit as e:  # timed's report of a failed command
            failures.append(str(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(argvs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if failures:
        sys.exit("\n".join(failures))
    return walls, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl", type=Path, default=None, help="corpus to tokenize (default: written from Wikipedia)")
    p.add_argument("--mb", type=float, default=50.0, help="size of the default corpus in MB")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: SmolLM2's)")
    p.add_argument("--workers", default="1,2", help="worker counts to measure")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--megatron-lm", type=Path, default=None, help="a Megatron-LM checkout: run its preprocess_data.py")
    p.add_argument("--workdir", type=Path, default=None, help="where corpus and outputs go (default: a temp dir)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the two side-by-side single-worker jobs per round")
    a = p.parse_args()

    from megatron_slim.data.assets import smollm2_hf_dir

    tokenizer = a.tokenizer or str(smollm2_hf_dir())
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = a.jsonl or work / "corpus.jsonl"
    if a.jsonl is None and not corpus.is_file():
        write_corpus(corpus, a.mb)
    workers = [int(w) for w in a.workers.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    commands: dict[str, tuple[list[str], str, dict[str, str]]] = {}
    for w in workers:
        prefix = str(work / f"slim_w{w}")
        commands[f"megatron-slim w{w}"] = ([sys.executable, "-m", "megatron_slim.cli", "preprocess", "--input",
                                            str(corpus), "--output-prefix", prefix, "--tokenizer", tokenizer,
                                            "--workers", str(w), "--overwrite", "--no-progress"], prefix, env)
        if a.megatron_lm:
            mlm_env = {**env, "PYTHONPATH": f"{a.megatron_lm}{os.pathsep}{env['PYTHONPATH']}"}
            mlm_prefix = str(work / f"mlm_w{w}")
            commands[f"Megatron-LM w{w}"] = ([sys.executable, str(a.megatron_lm / "tools" / "preprocess_data.py"),
                                              "--input", str(corpus), "--output-prefix", mlm_prefix,
                                              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                              tokenizer, "--append-eod", "--workers", str(w), "--log-interval",
                                              "100000000"], mlm_prefix + "_text_document", mlm_env)
    print(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.1f} MB), tokenizer {tokenizer}; "
          f"load average before: {os.getloadavg()}")
    warm = work / "warmup.jsonl"  # untimed: caches the tokenizer's spec (see the docstring)
    with corpus.open("rb") as src:
        warm.write_bytes(b"".join(line for _, line in zip(range(20), src)))
    first = next(iter(commands.values()))[0]
    timed([*first[:first.index("--input") + 1], str(warm), "--output-prefix", str(work / "warmup"),
           *first[first.index("--tokenizer"):]], env)
    ceiling = None if a.no_ceiling or workers[0] != 1 else [str(work / "half_a.jsonl"), str(work / "half_b.jsonl")]
    if ceiling:
        split_halves(corpus, (Path(ceiling[0]), Path(ceiling[1])))
        one = commands[f"megatron-slim w{workers[0]}"][0]
        ceiling_argvs = [[*one[:one.index("--input") + 1], half, "--output-prefix", str(work / f"half_{x}"),
                          *one[one.index("--tokenizer"):one.index("--workers")], "--workers", "1",
                          *one[one.index("--workers") + 2:]] for half, x in zip(ceiling, "ab")]
    times: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    ceiling_walls: list[float] = []
    for r in range(a.rounds):
        runs: list[str | None] = [*commands, None] if ceiling else [*commands]  # None: the side-by-side pair
        for name in runs[::-1] if r % 2 else runs:  # every other round reversed: a steady drift cancels out
            if name is None:
                walls, used = side_by_side(ceiling_argvs, env)
                ceiling_walls.append(max(walls))
                print(f"round {r + 1}: two 1-worker jobs side by side, one per half: "
                      f"{' / '.join(f'{w:.1f}' for w in walls)}s wall, {used:.1f}s CPU "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
                continue
            argv, _, e = commands[name]
            wall, used = timed(argv, e)
            times[name].append(wall)
            cpu[name].append(used)
            print(f"round {r + 1}: {name}: {wall:.1f}s wall, {used:.1f}s CPU (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        line = []
        base_t = times[f"megatron-slim w{workers[0]}"][-1]
        for w in workers[1:]:
            line.append(f"{w} workers / {workers[0]}: {base_t / times[f'megatron-slim w{w}'][-1]:.2f}x")
        if ceiling:
            line.append(f"ceiling (two 1-worker jobs side by side / one): {base_t / ceiling_walls[-1]:.2f}x")
        print(f"round {r + 1}: " + "; ".join(line), flush=True)
    tokens = {name: tokens_of(prefix) for name, (_, prefix, _) in commands.items()}
    rate = {name: tokens[name] / statistics.median(t) for name, t in times.items()}
    print(f"\nload average after: {os.getloadavg()}; {os.cpu_count()} CPUs")
    for name in commands:
        print(f"{name:20s} median {statistics.median(times[name]):7.1f}s  {tokens[name]:>12,} tokens  "
              f"{rate[name] / 1e3:8.0f}K tokens/s  {tokens[name] / statistics.median(cpu[name]) / 1e3:6.0f}K tokens "
              f"per CPU-second  (rounds: {', '.join(f'{t:.1f}' for t in times[name])})")
    base = f"megatron-slim w{workers[0]}"
    for w in workers[1:]:
        per_round = [t1 / tw for t1, tw in zip(times[base], times[f"megatron-slim w{w}"])]
        print(f"megatron-slim {w} workers / {workers[0]}: median of the rounds' ratios "
              f"{statistics.median(per_round):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in per_round)}), ratio of "
              f"the median times {rate[f'megatron-slim w{w}'] / rate[base]:.2f}x; byte-identical output: "
              f"{same_bytes(commands[base][1], commands[f'megatron-slim w{w}'][1])}")
    if ceiling:
        halves = sum(tokens_of(str(work / f"half_{x}")) for x in "ab")
        if halves != tokens[base]:
            sys.exit(f"the halves hold {halves} tokens, the whole corpus {tokens[base]}: not the same documents")
        per_round = [t1 / tc for t1, tc in zip(times[base], ceiling_walls)]
        print(f"machine ceiling, two 1-worker jobs side by side / one: median {statistics.median(per_round):.2f}x "
              f"(rounds: {', '.join(f'{x:.2f}' for x in per_round)})")
    if a.megatron_lm:
        for w in workers:
            ours, theirs = f"megatron-slim w{w}", f"Megatron-LM w{w}"
            print(f"{w} worker(s): megatron-slim / Megatron-LM tokens/s = {rate[ours] / rate[theirs]:.2f}x; "
                  f"byte-identical to Megatron-LM's output: {same_bytes(commands[ours][1], commands[theirs][1])}")
        for w in workers[1:]:
            print(f"Megatron-LM {w} workers / {workers[0]}: "
                  f"{rate[f'Megatron-LM w{w}'] / rate[f'Megatron-LM w{workers[0]}']:.2f}x")


if __name__ == "__main__":
    main()
