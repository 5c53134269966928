"""Convert checkpoints between Hugging Face safetensors and Megatron-Core distributed (torch_dist) format.

hf-to-mcore writes a checkpoint that loads at any TP/PP/EP/expert-TP layout chosen at load time, with the model
config the trainer needs and the tokenizer files. mcore-to-hf writes safetensors shards with an index, config.json,
generation config and tokenizer files, loadable by transformers' from_pretrained. Both stream tensor groups (bounded
memory) and write to `<out>.partial` first, renaming only when complete. Both copy tensors that only move bytes
file to file (copy_file_range); hf-to-mcore checks everything it writes against the layout megatron-core expects,
which a child process learns meanwhile by building the model on the meta device (about 10 s of one core).
Both refuse, naming the tensor, a config whose shapes disagree with the weights (before writing anything) and
weights holding NaN or Inf (as they stream; `--allow-nonfinite` converts them anyway).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_slim.commands.options import add_follow_symlinks_argument
from megatron_slim.runtime.outputs import Output

HELP = "convert checkpoints: hf-to-mcore | mcore-to-hf (streamed, any layout at load time)"


OUTPUTS = (Output("out", "dir", inputs=("hf", "mcore", "hf_template")),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="direction", metavar="<direction>", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron-Core torch_dist",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--hf", required=True, help="HF checkpoint directory (config.json, *.safetensors, index, tokenizer)")
    a.add_argument("--out", required=True, help="output Megatron-Core checkpoint directory")
    b = sub.add_parser("mcore-to-hf", help="Megatron-Core torch_dist -> HF safetensors",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--mcore", required=True, help="Megatron-Core checkpoint directory (with model_config.json)")
    b.add_argument("--out", required=True, help="output HF checkpoint directory")
    b.add_argument("--hf-template", default=None,
                   help="HF directory whose tokenizer/generation files to copy (default: those stored at conversion)")
    for q in (a, b):
        q.add_argument("--dry-run", action="store_true",
                       help="validate and print what would be written (tensors, parameters, bytes); write nothing")
        q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        q.add_argument("--allow-nonfinite", action="store_true",
                       help="convert weights holding NaN or Inf (refused by default, naming the tensor)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_follow_symlinks_argument(q)


def run(args: argparse.Namespace) -> int:
    common = dict(dry_run=args.dry_run, overwrite=args.overwrite, progress=not args.no_progress,
                  allow_nonfinite=args.allow_nonfinite)
    if args.direction == "hf-to-mcore":
        from megatron_slim.checkpoint.layout import LayoutJob

        # megatron-core's layout takes the longest to learn: its child process starts before this one imports torch
        with LayoutJob(Path(args.hf)) as job:
            from megatron_slim.checkpoint.convert import hf_to_mcore

            summary = hf_to_mcore(args.hf, args.out, layout_job=job, **common)
    else:
        from megatron_slim.checkpoint.readahead import ReadAhead

        # the data files are read into the page cache, in file order (the order they are consumed in), while torch
        # imports (seconds in which the disk would otherwise idle); the converter's own read-ahead then takes over
        files = [] if args.dry_run else sorted(Path(args.mcore).glob("*.distcp"))
        with ReadAhead([(f, 0, f.stat().st_size) for f in files]):
            from megatron_slim.checkpoint.convert import mcore_to_hf

        summary = mcore_to_hf(args.mcore, args.out, hf_template=args.hf_template, **common)
    print(("would write " if args.dry_run else f"wrote {args.out}: ") + summary.describe())
    return 0
