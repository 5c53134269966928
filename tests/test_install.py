"""Installing megatron-slim into an environment that already has torch (an NVIDIA PyTorch container) keeps it.

The environment is a real virtual environment whose site-packages holds the installed-distribution metadata
(`*.dist-info`) of this test's own environment, except torch, which is present at another version (the GPU
image's 2.11.0, and a container build's 2.11.0a0+<commit>). pip itself resolves our freshly built wheel against it
offline (`--dry-run --report --no-index`), with the README's command: a constraints file pinning the
environment's own torch. Nothing is installed and nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# The packages the README's install command pins to the container's own builds.
KEEP = re.compile(r"^(torch|transformer[-_]engine[-_a-z0-9]*|apex|triton)==", re.IGNORECASE)


def _pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # No pip configuration of this machine (its indexes, links or constraints, in files or PIP_* variables)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """megatron-slim's wheel, built from a copy of the sources (no build/ or egg-info left in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "megatron_slim", src / "megatron_slim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src))
    (whl,) = out.glob("megatron_slim-*.whl")
    return whl


def _wheel_metadata(whl: Path):
    import zipfile

    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(z.read(name).decode())


def _container(root: Path, torch_version: str) -> Path:
    """A virtual environment holding this environment's distributions (metadata only) with torch at
    `torch_version`; returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    ours = Path(sysconfig.get_path("purelib"))
    for info in ours.glob("*.dist-info"):
        if not (info / "METADATA").is_file():
            continue
        meta = Parser().parsestr((info / "METADATA").read_text(errors="replace"), headersonly=True)
        if canonicalize_name(meta["Name"]) in ("torch", "megatron-slim"):
            continue
        (site / info.name).mkdir()
        shutil.copy(info / "METADATA", site / info.name / "METADATA")
    torch_info = site / f"torch-{torch_version}.dist-info"
    torch_info.mkdir()
    (torch_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n"
                                         "Requires-Python: >=3.10\n")
    (torch_info / "INSTALLER").write_text("pip\n")
    return root / "bin" / "python"


def _install_dry_run(python: Path, wheel: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The README's command: pin the environment's own torch/TE/apex, then install."""
    frozen = _pip("--python", str(python), "list", "--format=freeze").stdout.splitlines()
    keep = tmp / "keep.txt"
    keep.write_text("".join(f"{line}\n" for line in frozen if KEEP.match(line)))
    report = tmp / "report.json"
    proc = _pip("--python", str(python), "install", "--dry-run", "--report", str(report), "--no-index",
                "--find-links", str(wheel.parent), "-c", str(keep), "megatron-slim", check=False)
    return proc, report


@pytest.mark.parametrize("torch_version", ["2.11.0", "2.11.0a0+4d1a5ec8.nv26.03"])
def test_install_keeps_the_environments_torch(wheel, tmp_path, torch_version):
    python = _container(tmp_path / "env", torch_version)
    proc, report = _install_dry_run(python, wheel, tmp_path)
    assert proc.returncode == 0, proc.stderr
    installs = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    # Every dependency is already there; only megatron-slim itself would be installed, torch left as it is.
    assert installs == {"megatron-slim": "0.1.0"}


def test_a_torch_older_than_the_floor_is_refused_not_replaced(wheel, tmp_path):
    """The check above can fail: with torch below our floor, pip wants another torch, and the README's
    constraints make that an error instead of a silent replacement."""
    python = _container(tmp_path / "env", "2.10.0")
    proc, _ = _install_dry_run(python, wheel, tmp_path)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "conflicting dependencies" in said and "torch==2.10.0" in said and "torch>=2.11.0a0" in said, said


def test_requirements_are_ranges_and_the_lock_satisfies_them(wheel):
    meta = _wheel_metadata(wheel)
    assert meta["Requires-Python"] == ">=3.12"
    reqs = {canonicalize_name(r.name): r for r in map(Requirement, meta.get_all("Requires-Dist"))
            if r.marker is None}
    for name in ("torch", "megatron-core", "flash-linear-attention"):
        assert not any(s.operator in ("==", "===") for s in reqs[name].specifier), reqs[name]
    assert reqs["torch"].specifier.contains("2.11.0a0+4d1a5ec8.nv26.03")
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", f"constraints.txt must pin exactly: {line}"
            pins[canonicalize_name(r.name)] = Version(spec.version)
    missing = sorted(set(reqs) - set(pins))
    assert not missing, f"constraints.txt lacks pins for {missing}"
    for name, req in reqs.items():
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {req}"
