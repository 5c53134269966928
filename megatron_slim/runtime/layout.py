"""The parallel layout of a job (`ParallelLayout`): tensor, pipeline, expert, expert-tensor and context parallel
sizes; data parallelism is what the world size leaves. One object from the command line (`parse`), recipes and
run configs (the YAML `parallel:` section, keys tp/pp/ep/etp/cp) to megatron-core's process groups
(`runtime/distributed.py:init_model_parallel`) and the model builder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_slim.errors import UserError

SIZES = ("tp", "pp", "ep", "etp", "cp")


@dataclass(frozen=True)
class ParallelLayout:
    """Model-parallel sizes; data parallelism takes what is left of the world. Sequence parallelism is on whenever
    tp > 1 (megatron-core requires it for MoE layers with tensor parallelism)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None = same as tp (megatron-core's default)
    cp: int = 1

    @classmethod
    def parse(cls, text: str) -> ParallelLayout:
        """A layout from a command-line string such as "tp=1,pp=4,ep=8" (missing sizes keep their defaults)."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in SIZES:
                raise UserError(f"parallel layout {text!r}: {part!r} is not one of {'/'.join(SIZES)}=N")
            if name in sizes:
                raise UserError(f"parallel layout {text!r}: {name} is given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise UserError(f"parallel layout {text!r}: {name}={value.strip()!r} is not an integer") from None
            if sizes[name] < 1:
                raise UserError(f"parallel layout {text!r}: {name} must be >= 1")
        return cls(**sizes)

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) is not None)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1

    @property
    def model_parallel_size(self) -> int:
        """Ranks one copy of the dense part of the model spans (tp * pp * cp)."""
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        self.validate_world(world_size)
        return world_size // self.model_parallel_size

    def validate_world(self, world_size: int) -> None:
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if world_size % self.model_parallel_size:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}")
        expert = self.ep * self.expert_tp * self.pp
        if world_size % expert:
            raise ValueError(
                f"world size {world_size} is not divisible by ep*expert_tp*pp = {self.ep}*{self.expert_tp}*{self.pp}"
            )
