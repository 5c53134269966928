"""Bad inputs at the edges are clear one-line errors naming what is wrong and where, and nothing is used silently.

Each test here reproduces a defect found by trying the tools as a new user would (see tests/README.md for the full
table of bad inputs and faults and the tests that cover them).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_slim.data.calibration import calibration_windows
from megatron_slim.errors import UserError

EOS = 0


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, message", [
    ('{"tokens": [1, -3, 2]}', r"d\.jsonl:2: negative token id -3"),
    ('{"tokens": [1, 2.0, 2]}', r"d\.jsonl:2: 'tokens' must be a list of integer token ids"),
    ('{"tokens": [1, true]}', r"d\.jsonl:2: 'tokens' must be a list of integer token ids"),
    ('{"tokens": "1 2 3"}', r"d\.jsonl:2: 'tokens' must be a list of integer token ids"),
    ('{"tokens": [1, 50, 2]}', r"d\.jsonl:2: token id 50 is outside the model's vocabulary of 50"),
    ('{"tokens": [1, 2', r"d\.jsonl:2: not valid JSON"),
    ('[1, 2, 3]', r"d\.jsonl:2: expected a JSON object"),
    ('{"text": 5}', r"d\.jsonl:2: 'text' must be a string"),
])
def test_calibration_token_ids_are_checked_with_file_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path / "d.jsonl", ['{"tokens": [4, 5, 6, 7]}', line])
    with pytest.raises(UserError, match=message):
        calibration_windows(path, 2, 4, EOS, vocab_size=50)


def test_calibration_ids_inside_the_vocabulary_pass_unchanged(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ['{"tokens": [4, 49, 6]}', '{"tokens": [0, 1, 2]}'])
    got = calibration_windows(path, 2, 3, EOS, vocab_size=50)
    assert torch.equal(got, torch.tensor([[4, 49], [6, 0], [0, 1]]))


def test_indexed_dataset_ids_outside_the_vocabulary_name_the_document(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in ([1, 2, 3], [4, 60, 5]):
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    with pytest.raises(UserError, match=r"corpus \(document 1\): token id 60 is outside .* vocabulary of 50"):
        calibration_windows(prefix, 2, 4, EOS, vocab_size=50)
    assert calibration_windows(prefix, 2, 4, EOS, vocab_size=61).shape == (4, 2)


def test_run_state_paths_survive_another_directory_and_a_moved_workdir(tmp_path, monkeypatch):
    """state.json stores work-dir paths relative to the work dir: a run resumed from another directory (or a
    moved work dir) finds its outputs; paths outside it stay absolute; numbers and structure are unchanged."""
    from megatron_slim.run.state import RunState

    (tmp_path / "launch").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "launch")
    work = Path("runs/a")
    state = RunState(work, "digest")
    state.start("prepare/data")
    (work / "data").mkdir(parents=True)
    state.finish("prepare/data", {"train": [[1.0, str(work / "data" / "train")]], "heldout": "../data.jsonl",
                                  "steps": 3})
    stored = json.loads((work / "state.json").read_text())["steps"]["prepare/data"]["outputs"]
    assert stored == {"train": [[1.0, "data/train"]], "heldout": str(tmp_path / "data.jsonl"), "steps": 3}

    (tmp_path / "moved").mkdir()
    (tmp_path / "launch" / "runs" / "a").rename(tmp_path / "moved" / "a")
    monkeypatch.chdir(tmp_path / "moved")
    out = RunState(Path("a"), "digest").outputs("prepare/data")
    assert out == {"train": [[1.0, "a/data/train"]], "heldout": str(tmp_path / "data.jsonl"), "steps": 3}
    assert Path(out["train"][0][1]).parent.is_dir()
