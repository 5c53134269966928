#!/usr/bin/env python
"""Thin wrapper: `megatron-slim plan ...` (see `--help`)."""
import sys

from megatron_slim.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
