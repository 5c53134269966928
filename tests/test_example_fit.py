"""The SlimQwen example at its real sizes fits its GPUs: `run --dry-run` against a header-only Qwen3-Next-80B
(real config.json and safetensors headers, data a sparse hole: nothing close to 160 GB is written) prints both
stages' per-GPU memory plans and says they fit; the same recipe at tp=1, pp=1, ep=8 without recomputation is
refused before any compute, with the reason and the changes that would fit."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml

from megatron_slim.cli import main as cli_main
from support import tiny_models
from support.header_only import qwen3_next_hf_shapes, write_header_only
from support.hf_checkpoints import save_tiny_hf_with_mtp, saved_shapes

EXAMPLE = Path(__file__).parent.parent / "examples" / "slimqwen"


def test_header_only_layout_is_the_hub_layout() -> None:
    """The fake lists exactly the tensors (names and shapes) of a real Qwen3-Next checkpoint with one MTP layer."""
    hf = tiny_models.qwen3_next()
    with tempfile.TemporaryDirectory() as d:
        save_tiny_hf_with_mtp(hf, d, seed=0, mtp_layers=1)
        real = {k: tuple(v) for k, v in saved_shapes(Path(d)).items()}
    assert qwen3_next_hf_shapes(hf | {"full_attention_interval": 4}, mtp_layers=1) == real


@pytest.fixture(scope="module")
def fake_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slimqwen")
    hf = json.loads((EXAMPLE / "teacher_config.json").read_text())
    claimed = write_header_only(root / "teacher", hf, qwen3_next_hf_shapes(hf, mtp_layers=1))
    assert claimed > 150e9
    on_disk = sum(os.stat(p).st_blocks * 512 for p in (root / "teacher").iterdir())
    assert on_disk < 100e6  # sparse: the headers only
    for name in ("train", "calibration", "heldout"):  # pre-tokenized: the fake teacher has no tokenizer
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"tokens": list(range(i, i + 16))}) + "\n"
                                                    for i in range(8)))
    return root


def _recipe(root: Path, **changes) -> Path:
    raw = yaml.safe_load((EXAMPLE / "recipe.yaml").read_text())
    raw["teacher"] = str(root / "teacher")
    raw["data"].update(train=str(root / "train.jsonl"), calibration=str(root / "calibration.jsonl"),
                       heldout=str(root / "heldout.jsonl"))
    raw.update(changes)
    path = root / f"recipe_{len(list(root.glob('recipe_*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_example_fits_80gb_gpus(fake_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", str(_recipe(fake_teacher)), "--workdir", str(fake_teacher / "wd"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("memory per GPU"):]
    assert "128 GPUs, layout tp=1 pp=4 ep=8" in table
    header = table.splitlines()[1].split()
    assert header[-2:] == ["depth", "width"]
    fits = next(line for line in table.splitlines() if line.startswith("fits"))
    assert fits.split()[1:] == ["yes", "yes"]
    totals = [float(x) for x in next(line for line in table.splitlines() if line.startswith("total")).split()[1:]]
    assert all(t < 0.7 * 80 for t in totals)  # headroom beyond the planned 10% margin


def test_the_papers_single_stage_layout_is_refused_before_compute(fake_teacher: Path) -> None:
    training = yaml.safe_load((EXAMPLE / "recipe.yaml").read_text())["training"]
    training.pop("memory")
    recipe = _recipe(fake_teacher, parallel={"tp": 1, "pp": 1, "ep": 8}, training=training)
    workdir = fake_teacher / "refused"
    for extra in (["--dry-run"], []):
        assert cli_main(["run", str(recipe), "--workdir", str(workdir), *extra]) == 2
    assert not workdir.exists()  # refused before the work dir, the teacher conversion or any step
    from megatron_slim.errors import UserError
    from megatron_slim.run.recipe_job import RunJob, run_recipe

    with pytest.raises(UserError) as err:
        run_recipe(RunJob(recipe=recipe, workdir=workdir, dry_run=True))
    text = str(err.value)
    assert "stage 'depth' needs" in text and "stage 'width' needs" in text
    assert "largest component: grad_buffers" in text
    assert "changes that make it fit" in text and "parallel.pp: 4" in text
