#!/usr/bin/env python
"""Thin wrapper: `megatron-slim train ...` (see `--help`)."""
import sys

from megatron_slim.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
