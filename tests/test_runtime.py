"""Launcher environments map to ranks correctly; GPU-only features fail clearly on this machine."""
import re

import pytest
import torch

from megatron_slim.models.builder import BuildOptions, transformer_config
from megatron_slim.models.registry import model_config_from_hf
from megatron_slim.models.specs import select_backend
from megatron_slim.runtime import cpu_compat
from megatron_slim.runtime.distributed import _first_slurm_host, detect_env
from megatron_slim.runtime.layout import ParallelLayout
from support import tiny_models

_LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"]


@pytest.fixture
def clean_env(monkeypatch):
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_torchrun_env(clean_env):
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="29400").items():
        clean_env.setenv(k, v)
    e = detect_env()
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 8, 1, "10.0.0.5", 29400)


def test_slurm_env(clean_env):
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5", SLURM_JOB_NODELIST="gpu[07-08]",
                     SLURM_JOB_ID="4242").items():
        clean_env.setenv(k, v)
    e = detect_env()
    assert (e.rank, e.world_size, e.local_rank, e.master_addr) == (5, 16, 5, "gpu07")
    assert e.master_port == 20000 + 4242


@pytest.mark.parametrize("nodelist, first", [("gpu[07-08]", "gpu07"), ("a1,b2", "a1"), ("n[1,3-4]", "n1"),
                                             ("single", "single")])
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_single_process_default(clean_env):
    e = detect_env()
    assert (e.rank, e.world_size, e.local_rank) == (0, 1, 0) and e.master_port > 0


def test_fp8_and_te_refused_without_transformer_engine():
    if select_backend()[0] == "transformer_engine":
        pytest.skip("Transformer Engine is available here")
    cfg = model_config_from_hf(tiny_models.qwen3_next())
    with pytest.raises(RuntimeError, match="FP8 needs Transformer Engine"):
        transformer_config(cfg, ParallelLayout(), BuildOptions(fp8="hybrid"))
    with pytest.raises(RuntimeError, match="Transformer Engine is not installed"):
        select_backend("transformer_engine")


def test_cpu_compat_refuses_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_mode", None)
    with pytest.raises(RuntimeError, match="CPU-only"):
        cpu_compat.activate()


def test_upstream_noise_is_silenced_and_nothing_else() -> None:
    """The CLI's filters drop the listed upstream chatter only: other warnings and log records still show."""
    import logging
    import warnings

    from megatron_slim.runtime.quiet import silence_upstream_noise

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.common")
    logger.addHandler(Keep())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_upstream_noise()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("a warning of ours", UserWarning)
        logger.warning("load_common is deprecated and will be removed in a future release.")
        logger.warning("a log record of ours")
    assert [str(w.message) for w in caught] == ["a warning of ours"]
    assert records == ["a log record of ours"]


def test_parallel_layout_parses_command_line_strings() -> None:
    layout = ParallelLayout.parse("tp=1,pp=4,ep=8")
    assert layout == ParallelLayout(tp=1, pp=4, ep=8) and layout.expert_tp == 1 and layout.dp(32) == 8
    assert ParallelLayout.parse(" tp=2 , etp=1, cp=2 ") == ParallelLayout(tp=2, etp=1, cp=2)
    assert ParallelLayout.parse(str(ParallelLayout(tp=2, pp=2, etp=1))) == ParallelLayout(tp=2, pp=2, etp=1)
    assert ParallelLayout.parse("") == ParallelLayout()
    assert ParallelLayout(tp=2).use_sequence_parallel and not ParallelLayout().use_sequence_parallel


@pytest.mark.parametrize("text, message", [
    ("tp=2,dp=4", "'dp=4' is not one of tp/pp/ep/etp/cp=N"),
    ("tp", "'tp' is not one of"),
    ("tp=2,tp=4", "tp is given twice"),
    ("pp=two", "pp='two' is not an integer"),
    ("ep=0", "ep must be >= 1"),
])
def test_parallel_layout_refuses_bad_strings(text: str, message: str) -> None:
    from megatron_slim.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        ParallelLayout.parse(text)


def _reinit_rank(rank: int, world_size: int) -> dict:
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_slim.runtime.distributed import init_model_parallel

    counts = []
    for layout in (ParallelLayout(tp=2), ParallelLayout(ep=2), ParallelLayout(tp=2)):
        init_model_parallel(layout)
        counts.append((len(os.listdir("/proc/self/task")), len(dist.distributed_c10d._world.pg_map)))
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
    return {"counts": counts, "tp_sum": t.item()}


def test_reinitialising_model_parallel_destroys_the_old_groups() -> None:
    """A process that re-initialises Megatron-Core's groups per step (the CPU demo) must not accumulate process
    groups and their gloo threads; the groups made last still work."""
    from support.dist import run_distributed

    for result in run_distributed(_reinit_rank, 2):
        counts = result["counts"]
        assert counts[2] == counts[0], counts
        assert result["tp_sum"] == 3.0
