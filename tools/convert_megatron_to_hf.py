#!/usr/bin/env python
"""Thin wrapper: `megatron-slim convert mcore-to-hf ...` (see `--help`)."""
import sys

from megatron_slim.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
