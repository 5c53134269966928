"""Enter flash-linear-attention's package without running its `__init__`.

megatron-core's Gated DeltaNet imports three fla kernel modules (`fla.modules.convolution`, `fla.modules.l2norm`,
`fla.ops.gated_delta_rule`). Importing any fla submodule first runs `fla/__init__.py`, which imports every fla layer
and model, and transformers with them: about 2.5 CPU-s of each process that builds a Qwen3-Next model, for names
megatron-slim never uses. Entered so by CPU runs (`runtime.cpu_compat`), the layout child (a meta-device build) and
the helpers that load transformers' Qwen3-Next; a GPU run's model build imports fla as it is. Registering the package
module without executing its `__init__` imports only the submodules asked for; `fla.<submodule>` imports and
everything they import work as before, only the package-level re-exports (`fla.GatedDeltaNet`, ...) are absent.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import pkgutil
import sys


def enter_fla_without_its_init() -> None:
    """Register the `fla` package (path, spec, `__version__`) unexecuted, unless it is imported already or absent
    (then megatron-core's own `ImportError` path stays as it is)."""
    if "fla" in sys.modules:
        return
    spec = importlib.util.find_spec("fla")
    if spec is None:
        return
    fla = importlib.util.module_from_spec(spec)
    fla.__path__ = pkgutil.extend_path(fla.__path__, "fla")  # as its __init__ does: every `fla` directory on the path
    fla.__version__ = importlib.metadata.version("fla-core")  # what its __init__ sets and fla.utils imports
    sys.modules["fla"] = fla
