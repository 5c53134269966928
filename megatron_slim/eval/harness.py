"""lm-evaluation-harness tasks scored by a Megatron-Core model at any TP/PP/EP layout, in place.

`MegatronLM` is lm-eval's `LM` interface over a built, loaded model: `loglikelihood`, `loglikelihood_rolling` and
greedy `generate_until`. Every rank of the job runs `score_tasks` with the same tasks, so lm-eval builds the same
requests on every rank (the LM reports rank 0 of 1: lm-eval does not split requests itself). Requests are sorted by
length and batched; the batch rows are dealt to data-parallel ranks as in eval/heldout.py (`dp_share`: equal
counts, weight-0 padding rows), every forward is right-padded to one width across the world (causal layers, so
padding on the right changes nothing before it, and expert-parallel collectives see equal shapes), and the last
pipeline stage's answers reach every rank through one all-reduce to which only the reporting rank of each replica
(last stage, TP rank 0) contributes. Scores are computed on vocab-parallel logits (eval/metrics.py), never
gathering the vocabulary.

Generation is batched greedy decoding (eval/generate.py): with a KV cache (and Gated DeltaNet states) where it
serves (no sequence parallelism: TP1 at any PP/EP/DP), else one forward of each row's whole prefix per new token
through the pipeline schedules. Both give the same tokens as transformers' greedy `generate`.

Tasks come from lm-eval's registry, the tasks shipped in megatron_slim/eval/tasks/ (built from the demo's held-out
Wikipedia text) and `include_path` YAML directories. Data are read as the user's environment allows
(`HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1` for no network at all); a task whose data cannot be loaded is refused
before any scoring, naming the task.
"""
from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from megatron_slim.data.calibration import encoded_text, load_tokenizer
from megatron_slim.errors import UserError
from megatron_slim.eval.generate import greedy_steps, kv_cache_blocker
from megatron_slim.eval.heldout import dp_share
from megatron_slim.eval.metrics import token_logprobs, vocab_parallel_argmax
from megatron_slim.models.config import ModelConfig
from megatron_slim.models.forward import forward_rows, right_padded, tp_group
from megatron_slim.runtime.distributed import local_device, world_reduce

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's HF backend default when neither config nor tokenizer gives a context length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend default when a task gives no max_gen_toks
_LENGTH_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")  # the HF backend's order


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Which lm-eval tasks to score and how (the `evaluate --tasks` flags; a recipe's evaluation section)."""

    tasks: tuple[str, ...]  # task or group names
    num_fewshot: int | None = None  # None: each task's own default (0 when it names none)
    limit: float | None = None  # documents per task (a fraction when < 1); None: all
    include_path: tuple[Path, ...] = field(default_factory=tuple)  # extra YAML task directories

    def validate(self, name: Callable[[str], str] = lambda f: "--" + f.replace("_", "-")) -> None:
        """Refuse what lm-eval would fail on later; `name` names a field in the message (the command's flag by
        default; a recipe names its key)."""
        if not self.tasks or any(not t.strip() for t in self.tasks):
            raise UserError(f"{name('tasks')} needs at least one task name (comma-separated, no empty names)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError(f"{name('num_fewshot')} must be >= 0")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"{name('limit')} must be > 0")
        for path in self.include_path:
            if not Path(path).is_dir():
                raise UserError(f"{name('include_path')} {path} is not a directory")


def text_tokenizer(tokenizer_dir: Path | None) -> Any:
    """The checkpoint's HF tokenizer, refused when missing or empty: lm-eval tasks are text."""
    if tokenizer_dir is None:
        raise UserError("lm-eval tasks are text, and the checkpoint carries no tokenizer files (convert or export it "
                        "from an HF directory that has them)")
    tokenizer = load_tokenizer(tokenizer_dir)
    encoded_text(tokenizer("The")["input_ids"], "The", f"lm-eval tasks need the tokenizer in {tokenizer_dir}")
    return tokenizer


def context_length(hf_config: dict[str, Any], tokenizer: Any) -> int:
    """The model's context length as lm-eval's HF backend resolves it (config fields, tokenizer, default), so both
    backends truncate alike."""
    for name in _LENGTH_FIELDS:
        if hf_config.get(name) is not None:
            return int(hf_config[name])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < int(1e30) else DEFAULT_MAX_LENGTH


class MegatronLM(TemplateLM):
    """lm-eval's LM over a Megatron-Core model built and loaded on every rank of the job. Collective: every rank
    must make the same calls with the same requests; every rank gets the same answers."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, *, batch_size: int = 8,
                 micro_batch: int = 1) -> None:
        super().__init__()
        if batch_size < 1 or micro_batch < 1:
            raise ValueError(f"batch_size and micro_batch must be >= 1, got {batch_size}, {micro_batch}")
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer defines no EOS token, which lm-eval needs to end generations and to "
                            "condition on empty contexts")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self._device = local_device()
        self._told_no_cache = False

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS (as lm-eval's HF backend)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's ids; special tokens as the tokenizer adds them by default, except that a string already
        starting with the prefix token does not get a second one (as lm-eval's HF backend)."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ lm-eval's request types

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per (key, context ids,
        continuation ids); a sequence longer than the context length + 1 loses tokens on the left."""
        seqs, conts = [], []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"need a context, and a continuation of 1..{self.max_length} tokens; got "
                                 f"{len(context)} and {len(continuation)} tokens")
            seqs.append((context + continuation)[-(self.max_length + 1):])
            conts.append(len(continuation))
        scores = score_sequences(self.model, seqs, conts, self.batch_size, self.micro_batch)
        return [(float(lp), bool(greedy)) for lp, greedy in scores.tolist()]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-likelihood in disjoint windows of at most the context length, the first
        conditioned on the prefix token, each later one with the longest context that fits."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence (the task's `until` and EOS) or after
        `max_gen_toks` tokens; requests with the same generation settings are batched together."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        why = kv_cache_blocker(self.model)
        if why is not None and not self._told_no_cache and dist.get_rank() == 0:
            print(f"generating without a KV cache because of {why}: each new token re-forwards its whole prefix",
                  file=sys.stderr)
            self._told_no_cache = True
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise UserError(f"task {requests[members[0]].task_name}: only greedy generation is supported "
                                f"(the task asks for sampling: {requests[members[0]].args[1]})")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self.max_length:
                raise UserError(f"task {requests[members[0]].task_name}: max_gen_toks {max_new} leaves no room for "
                                f"a prompt in the context length {self.max_length}")
            prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-(self.max_length - max_new):]
                       for i in members]

            def finished(tokens: list[int], stops: list[str] = until) -> bool:
                text = self.tok_decode(tokens)
                return bool(tokens) and (tokens[-1] == self.eot_token_id or any(s and s in text for s in stops))

            for i, tokens in zip(members, greedy_generate(self.model, prompts, max_new, finished, self.batch_size,
                                                          self.micro_batch)):
                out[i] = postprocess_generated_text(self.tok_decode(tokens), until, None)
        return out


# ---------------------------------------------------------------------- collective scoring and generation on ids

def _reporting() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def _my_batches(count: int, lengths: list[int], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This DP rank's (row indices, weights) in batches of `batch_size`, rows sorted longest first (so a batch pads
    little), the same number of batches of the same sizes on every DP rank."""
    from megatron.core import parallel_state as ps

    order = torch.tensor(sorted(range(count), key=lambda i: -lengths[i]), dtype=torch.long)
    idx, weights = dp_share(count, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    return [(order[idx[lo:lo + batch_size]], weights[lo:lo + batch_size]) for lo in range(0, len(idx), batch_size)]


def score_sequences(model: torch.nn.Module, seqs: list[list[int]], conts: list[int], batch_size: int,
                    micro_batch: int) -> torch.Tensor:
    """[n, 2] float64 on every rank: (sum of log P(token) over the last conts[i] tokens of seqs[i] given the tokens
    before them, 1.0 if each of those tokens is the argmax else 0.0). Collective over every rank.

    Only the logits that score a continuation are computed (forward_rows' `positions`): the output layer, the
    log-softmax and the argmax run on each batch's longest continuation instead of its whole width (a cloze
    word is one or two tokens of a sentence)."""
    out = torch.zeros(len(seqs), 2, dtype=torch.float64, device=local_device())
    if not seqs:
        return out
    tp, reporting = tp_group(), _reporting()
    for rows, weights in _my_batches(len(seqs), [len(s) for s in seqs], batch_size):
        batch = [seqs[i] for i in rows.tolist()]
        tokens = right_padded(batch, world_reduce(max(len(s) for s in batch))).to(local_device())
        counts = [conts[i] for i in rows.tolist()]
        # position n - 1 - c + k predicts token n - c + k (k < c); columns past a row's c repeat its last position
        offsets = torch.minimum(torch.arange(max(counts))[None, :], torch.tensor(counts)[:, None] - 1)
        positions = torch.tensor([len(s) - 1 - c for s, c in zip(batch, counts)])[:, None] + offsets
        labels = tokens.gather(1, positions.to(tokens.device) + 1)

        def on_logits(logits: torch.Tensor, sl: slice, labels: torch.Tensor = labels, rows: torch.Tensor = rows,
                      weights: torch.Tensor = weights, counts: list[int] = counts) -> None:
            logp = token_logprobs(logits, labels[sl], tp)
            hits = vocab_parallel_argmax(logits, tp) == labels[sl]
            for r in range(sl.start, sl.stop):
                if reporting and weights[r] > 0:
                    n = counts[r]
                    out[int(rows[r]), 0] = logp[r - sl.start, :n].double().sum()
                    out[int(rows[r]), 1] = float(hits[r - sl.start, :n].all())
        forward_rows(model, tokens, micro_batch, on_logits, positions=positions)
    dist.all_reduce(out)  # each row has one contributor: the reporting rank of the DP rank that scored it
    return out


def greedy_generate(model: torch.nn.Module, prompts: list[list[int]], max_new: int,
                    finished: Callable[[list[int]], bool], batch_size: int, micro_batch: int, *,
                    kv_cache: bool = True) -> list[list[int]]:
    """Each prompt's greedy continuation (main head), ended after the first token where `finished(continuation)`
    holds or after `max_new` tokens; the same lists on every rank. Collective over every rank; `finished` must be
    deterministic. eval/generate.py decides how (megatron-core's KV cache where it serves)."""
    device = local_device()
    result = torch.zeros(len(prompts), max_new, dtype=torch.long, device=device)  # token id + 1; 0: none
    for rows, weights in _my_batches(len(prompts), [len(p) for p in prompts], batch_size):
        conts: list[list[int]] = [[] for _ in rows]
        done = [w == 0 for w in weights.tolist()]  # padding rows never hold the loop open
        with closing(greedy_steps(model, [prompts[i] for i in rows.tolist()], micro_batch, max_new,
                                  kv_cache=kv_cache)) as steps:
            for ids, fresh in steps:
                for r, token in enumerate(ids):
                    if fresh[r] and not done[r]:
                        conts[r].append(token)
                        done[r] = finished(conts[r]) or len(conts[r]) == max_new
                if world_reduce(int(not all(done))) == 0:
                    break
        if _reporting():
            for r, i in enumerate(rows.tolist()):
                if weights[r] > 0:
                    result[i, :len(conts[r])] = torch.tensor(conts[r], dtype=torch.long, device=device) + 1
    dist.all_reduce(result)  # each row has one contributor: the reporting rank of the DP rank that generated it
    return [[t - 1 for t in row if t > 0] for row in result.tolist()]


# ---------------------------------------------------------------------- tasks

@functools.lru_cache(maxsize=8)
def _task_index(include_path: tuple[Path, ...], defaults: bool) -> Any:
    """lm-eval's task index over the shipped tasks and `include_path`, and over its own registry when `defaults`
    (indexing the registry's ~14,000 YAMLs costs ~14 CPU-seconds: built once per process, and only when asked)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(SHIPPED_TASKS), *map(str, include_path)], include_defaults=defaults)


def _task_manager(spec: TaskSpec) -> Any:
    """The index that resolves `spec.tasks`: the shipped tasks and `include_path` alone when they define every
    requested name as a task, else lm-eval's whole registry as well (`needs_registry`)."""
    small = _task_index(tuple(spec.include_path), False)
    return _task_index(tuple(spec.include_path), True) if needs_registry(small, spec.tasks) else small


def needs_registry(local: Any, names: Sequence[str]) -> bool:
    """Whether `names` need lm-eval's registry beyond the `local` index (shipped and include-path YAMLs): yes for a
    name `local` lacks (a registry task, or an unknown name that check_tasks names among all known ones) and for a
    group or tag (its members may be registry tasks); a task `local` defines overrides the registry's anyway."""
    from lm_eval.tasks._index import Kind

    index = local.task_index
    return not all(name in index and index[name].kind in (Kind.TASK, Kind.PY_TASK) for name in names)


def check_tasks(spec: TaskSpec) -> None:
    """Every task name is known and its data loads; otherwise one UserError naming each failing task and how to
    make its data available. Runs before any model is built (the command calls it before spawning ranks)."""
    manager = _task_manager(spec)
    known = set(manager.all_tasks)
    problems = [f"task {name}: unknown (not in lm-eval's registry, the shipped tasks "
                f"{', '.join(shipped_task_names())} or an --include-path directory)"
                for name in spec.tasks if name not in known]
    for name in spec.tasks:
        if name not in known:
            continue
        try:
            manager.load([name])
        except Exception as e:  # datasets/hub raise many types (ConnectionError, FileNotFoundError, ValueError...)
            problems.append(f"task {name}: its data could not be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}), make it available offline: run lm-eval "
                            "once with network access so the HF datasets cache holds it (HF_HOME / "
                            "HF_DATASETS_CACHE), or define the task in a YAML with local data_files and pass its "
                            "directory with --include-path")
    if problems:
        raise UserError("cannot score the tasks:\n  " + "\n  ".join(problems))


def shipped_task_names() -> list[str]:
    """Names of the tasks under megatron_slim/eval/tasks/."""
    return sorted(p.stem for p in SHIPPED_TASKS.glob("*.yaml"))


def _metric_values(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{"acc,none": v, "alias": ..., "sample_len": n}` as `{"acc": v}`; a filter other than "none"
    stays in the name ("exact_match,strict-match")."""
    out = {}
    for key, value in task_results.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = float(value)
    return {k: v for k, v in out.items() if not math.isnan(v)}


def score_tasks(model: torch.nn.Module, cfg: ModelConfig, tokenizer_dir: Path | None, spec: TaskSpec, *,
                batch_size: int = 8, micro_batch: int = 1) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """({task: {metric: value}}, {task: error}) of lm-eval's tasks scored by `model` (built and loaded on every
    rank of the job at its layout); collective over every rank, the same on each. Each requested task (or group)
    is scored on its own, so one that fails (its data, its metric) costs only its own scores: the others' are
    kept and the failure is named. `tokenizer_dir`: the checkpoint's HF tokenizer files (None refuses: text tasks
    cannot run on ids alone)."""
    from lm_eval import simple_evaluate

    spec.validate()
    tokenizer = text_tokenizer(tokenizer_dir)
    lm = MegatronLM(model, tokenizer, context_length(cfg.hf_config, tokenizer), batch_size=batch_size,
                    micro_batch=micro_batch)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    scores: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for task in spec.tasks:
        try:
            results = simple_evaluate(model=lm, tasks=[task], num_fewshot=spec.num_fewshot, limit=spec.limit,
                                      task_manager=_task_manager(spec), log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")  # no bootstrap: values, not stderrs
        except Exception as e:  # noqa: BLE001 - any task failure is reported with the others' scores kept
            errors[task] = f"{type(e).__name__}: {e}"
            continue
        if dist.get_rank() == 0 and results is not None:  # rank 0 holds the results
            scores |= {name: _metric_values(values) for name, values in results["results"].items()}
    out = [(scores, errors)]
    dist.broadcast_object_list(out, src=0)
    return out[0]
