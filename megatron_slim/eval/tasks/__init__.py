"""lm-eval tasks built from the demo's held-out Wikipedia paragraphs (data/wiki.py), readable with no network and
no dataset cache: each YAML's `custom_dataset` calls a function of wiki_docs.py. `evaluate --tasks` always finds
them (eval/harness.py adds this directory to lm-eval's task paths)."""
