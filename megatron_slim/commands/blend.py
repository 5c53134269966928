"""Print a recipe's `data.train` blend from dataset manifests (PREFIX.manifest.json, written by preprocess).

--weights tokens weighs each dataset by its token count (every token seen equally often), uniform gives each the
same share, W1,W2,... sets them explicitly; weights are normalized to sum to 1. Datasets tokenized with different
tokenizers are refused. Paste the output into the recipe's `data:` section.
"""
from __future__ import annotations

import argparse

from megatron_slim.runtime.outputs import Output

HELP = "print a recipe data.train blend from dataset manifests"


OUTPUTS: tuple[Output, ...] = ()  # prints only


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, action="append", metavar="PATH",
                   help="a PREFIX.manifest.json (or the dataset PREFIX); repeat for each dataset")
    p.add_argument("--weights", default="tokens", help="tokens | uniform | W1,W2,... (one per --manifest)")


def run(args: argparse.Namespace) -> int:
    import json

    from megatron_slim.data.manifest import blend_weights, read_manifest

    manifests = [read_manifest(m) for m in args.manifest]
    blend = blend_weights(manifests, args.weights)
    print("data:")
    print("  train:")
    for (weight, prefix), m in zip(blend, manifests):
        print(f"    - [{weight}, {json.dumps(prefix)}]  # {m.tokens} tokens, {m.documents} documents")
    return 0
