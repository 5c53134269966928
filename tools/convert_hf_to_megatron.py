#!/usr/bin/env python
"""Thin wrapper: `megatron-slim convert hf-to-mcore ...` (see `--help`)."""
import sys

from megatron_slim.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
