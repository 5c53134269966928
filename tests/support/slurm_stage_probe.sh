#!/usr/bin/env bash
# Stand-in for the Python interpreter in launch.sh --chain tests (launch.sh --python
# tests/support/slurm_stage_probe.sh): called as `probe -m megatron_slim.cli run RECIPE --workdir DIR ... --stage NAME`,
# it appends `start NAME <job id>` and then `end NAME` to DIR/probe.log, a second apart, and exits 0.
set -euo pipefail
workdir="" stage=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --workdir) workdir="$2"; shift ;;
        --stage) stage="$2"; shift ;;
    esac
    shift
done
if [ -z "$workdir" ] || [ -z "$stage" ]; then
    echo "probe: needs --workdir and --stage" >&2
    exit 2
fi
mkdir -p "$workdir"
echo "start $stage ${SLURM_JOB_ID:-}" >>"$workdir/probe.log"
sleep 1
echo "end $stage" >>"$workdir/probe.log"
