"""Documents of the shipped lm-eval tasks, cut deterministically from the held-out Wikipedia paragraphs (the demo's
evaluation split, disjoint from its calibration and training text). lm-eval imports this file by path from the
YAMLs beside it (`!function wiki_docs.NAME`) and calls NAME(**metadata) for the task's dataset."""
from __future__ import annotations

import re
from typing import Any

from megatron_slim.data.wiki import wiki_splits

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]][.!?])\s+(?=[A-Z])")  # not after initials ("C. N. Yang")
_LAST_WORD = re.compile(r"^(.{20,}?)\s+([A-Za-z]{3,})\.$")
MAX_CHARS = 240  # sentences longer than this are skipped: the tasks stay cheap on a CPU
CHOICES = 4


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _test_split(docs: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def cloze_docs() -> list[dict[str, str]]:
    """{"context", "word"}: the first sentence of each paragraph ending in a plain word and a full stop, that
    word cut off (LAMBADA-style last-word prediction)."""
    docs = []
    for paragraph in wiki_splits().heldout:
        first = _sentences(paragraph)[0]
        match = _LAST_WORD.match(first) if len(first) <= MAX_CHARS else None
        if match:
            docs.append({"context": match.group(1), "word": match.group(2)})
    return docs


def continuation_docs() -> list[dict[str, Any]]:
    """{"context", "choices", "label"}: a paragraph's first sentence and CHOICES candidate second sentences, the
    true one at position i % CHOICES, the others the second sentences of the next paragraphs in the list."""
    pairs = [(s[0], s[1]) for s in map(_sentences, wiki_splits().heldout)
             if len(s) >= 2 and len(s[0]) <= MAX_CHARS and len(s[1]) <= MAX_CHARS]
    docs = []
    for i, (context, true) in enumerate(pairs):
        others = [pairs[(i + k) % len(pairs)][1] for k in range(1, CHOICES)]
        label = i % CHOICES
        docs.append({"context": context, "choices": others[:label] + [true] + others[label:], "label": label})
    return docs


def paragraph_docs() -> list[dict[str, str]]:
    """{"text"}: whole held-out paragraphs, for rolling log-likelihood (perplexity per word and per byte)."""
    return [{"text": p} for p in wiki_splits().heldout]


def cloze(**metadata: Any) -> Any:
    return _test_split(cloze_docs())


def continuation(**metadata: Any) -> Any:
    return _test_split(continuation_docs())


def paragraphs(**metadata: Any) -> Any:
    return _test_split(paragraph_docs())
