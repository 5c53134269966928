#!/usr/bin/env bash
# Run a megatron-slim command on one process, on a local torchrun, or on a SLURM allocation; see --help.
set -euo pipefail

# Exit code by which the program asks to be requeued (EX_TEMPFAIL from sysexits.h).
readonly EXIT_REQUEUE=75

usage() {
    cat <<'EOF'
Usage:
  launch.sh [options] -- <megatron-slim args>              run here: inside a SLURM job (sbatch/salloc) with
                                                           srun, otherwise with torchrun (or python for 1 process)
  sbatch [sbatch options] launch.sh [options] -- <args>    submit yourself
  launch.sh --submit [options] -- <megatron-slim args>     build and run the sbatch command from the options
  launch.sh --submit --chain [options] -- run RECIPE --workdir DIR [run args]
                                                           one job per stage of the recipe, each after the one
                                                           before it; with --cpu-partition P the single-process
                                                           steps run as jobs of their own on CPU nodes
  launch.sh --submit --array N [--cpu-partition P] [options] -- <megatron-slim args>
                                                           N one-task jobs on CPU nodes (a SLURM job array)

Inside a SLURM job, srun starts one task per GPU on every node of the job (the task count per node comes from
--tasks-per-node, else --gpus-per-node, else the job's SLURM_NTASKS_PER_NODE / GPUs / tasks). Each task runs
`python -m megatron_slim.cli <args>` with SLURM's environment plus MASTER_ADDR (first host of the job) and
MASTER_PORT (15000 + job id % 15000), from which the program derives RANK/WORLD_SIZE/LOCAL_RANK. Called from
within a job step (SLURM_STEP_ID set, e.g. `srun launch.sh ...`), it runs the program directly.
srun runs with --kill-on-bad-exit=1: when one task dies, SLURM ends the others and the job fails at once, instead of
the surviving ranks waiting in a collective until the process-group timeout while the whole allocation idles.

Options for every mode:
  --python PATH            Python interpreter (default: <repo>/.venv/bin/python when present, else python3;
                           `python` inside a container)
  --exec                   the words after -- are a whole command to run per process, not megatron-slim args
  --env KEY=VAL            export KEY=VAL to every process (repeatable; the value may hold spaces/commas)
  --gpus-per-node N        GPUs per node; one task per GPU. 0 = CPU-only nodes, tasks from --tasks-per-node
                           (default with --submit: 8)
  --tasks-per-node N       processes per node (default: --gpus-per-node, or 1 when that is 0)
  --nproc-per-node N       alias of --tasks-per-node
  --container-image IMG    run each srun task in this container (pyxis: srun --container-image)
  --container-mounts M     pyxis srun --container-mounts (SRC:DST[,...])
  --dry-run                print the command (sbatch, srun, torchrun or python) instead of running it
  -h, --help               this help

Options for --submit (become sbatch options; launch.sh itself is the batch script):
  --nodes N                number of nodes (default 1)
  --time T                 time limit (sbatch --time, e.g. 04:00:00)
  --partition P            sbatch --partition
  --account A              sbatch --account (every job, the CPU jobs too)
  --qos Q                  sbatch --qos (the GPU jobs)
  --job-name NAME          sbatch --job-name (default megatron-slim)
  --log-dir DIR            write DIR/<job-name>-<job id>.out/.err (created if missing)
  --dependency SPEC        sbatch --dependency, e.g. afterok:123
  --requeue                allow requeue (sbatch --requeue; output files are then appended to, not truncated)
  --signal SPEC            sbatch --signal; with --requeue the default is B:USR1@120 (USR1 to this script
                           120 s before the time limit)
  --wait                   sbatch --wait: block until the job ends and exit with its exit code
  --sbatch-arg ARG         pass ARG to sbatch as is (repeatable), e.g. --sbatch-arg=--exclusive (not to CPU jobs)
  On submit the job id is printed (sbatch --parsable).

Job chains (--submit --chain):
  --chain                  submit one job per stage of `run RECIPE --workdir DIR [run args]` (the words after
                           --), in order. Each job runs `megatron-slim run RECIPE --workdir DIR [run args]
                           --stage NAME` with the same options; each after the one before it succeeded
                           (--dependency=afterok:<previous job id> --kill-on-invalid-dep=yes, so a failed stage
                           cancels the rest; --dependency applies to the first job). The stages come from
                           `megatron-slim run RECIPE --workdir DIR [run args] --list-stages`, run here.
                           Prints one line per job: `<job id> <stage>`; job names are <job-name>-<stage>.
                           With --requeue every job requeues itself; dependants wait through its requeues.
                           --wait blocks until the chain has ended and exits with the status of the first
                           stage that failed (0 when all completed). --dry-run prints the sbatch commands,
                           one per stage, `<STAGE>` standing for that stage's job id.
                           A recipe with variants lists `shared` (the steps its variants share) and then
                           VARIANT/STAGE: each variant becomes its own chain after the shared job, so variants
                           train side by side (job names <job-name>-VARIANT-STAGE).
  --stages A,B,...         submit these stages instead of listing them (e.g. where this machine cannot run
                           the program, or to continue a chain from a later stage); with --cpu-partition the
                           jobs of `run --list-jobs`, each NAME:cpu or NAME:gpu (NAME alone: gpu)
  A chain of multi-node jobs without --cpu-partition is refused unless the run args hold
  --allow-single-process-steps: its stage jobs would convert, tokenize, prune and export on one process while
  every other GPU of the allocation waits (`run` itself refuses those steps in a multi-node job).

CPU jobs (--chain --cpu-partition, --array): one task on one node, no GPUs, shaped by
  --cpu-partition P        sbatch --partition of the CPU jobs; with --chain it splits the chain (below)
  --cpu-time T             their time limit (default: the partition's)
  --cpu-qos Q              their sbatch --qos
  --cpu-mem M              their sbatch --mem (teacher conversion and pruning of a large MoE hold the whole
                           checkpoint: e.g. 900G for an 80B model)
  --cpu-cpus N             their sbatch --cpus-per-task (srun gets it too)
  --cpu-sbatch-arg ARG     pass ARG to the CPU jobs' sbatch as is (repeatable)
  --requeue, --signal, --log-dir, --account and --env apply to them as to the GPU jobs.

  --chain --cpu-partition P: the jobs are those `megatron-slim run RECIPE --workdir DIR --list-jobs` prints
  (megatron_slim/run/chain.py), each running `run RECIPE --workdir DIR [run args] --job NAME`, each after the one
  before it. CPU jobs: `prepare` (teacher conversion, tokenization of jsonl/parquet data), `STAGE.prune` (the
  stage's plan and pruning), `final.export`; GPU jobs: `STAGE.importance` (before the first pruning: the teacher's
  evaluation and importance), `STAGE` (the stage's evaluations and distillation, then the next stage's
  importance), `final.bench_inference`. A two-stage recipe: prepare, depth.importance, depth.prune, depth,
  width.prune, width, final.export. With variants: shared.JOB for the steps they share, then VARIANT/JOB, each
  variant's chain after the last shared job. Printed lines are `<job id> <job name>`.

  --array N[%M]            submit the command as a job array of N CPU tasks (at most M at once); task I sees
                           SLURM_ARRAY_TASK_ID=I and SLURM_ARRAY_TASK_COUNT=N (what `preprocess --shard auto`
                           reads to pick its share of the inputs); logs <job-name>-<array id>_<I>.out/.err

Preemption and requeue contract (batch jobs):
  launch.sh traps SIGUSR1 and SIGTERM and forwards them to the program's processes (USR1 through srun, TERM
  with `scancel --signal=TERM` to the job's steps, since srun turns a TERM into a kill). The program saves a
  checkpoint when it receives SIGUSR1 or SIGTERM and exits with code 75 (EX_TEMPFAIL) to ask for a requeue;
  if the step exits 75, launch.sh runs `scontrol requeue $SLURM_JOB_ID` and the job starts again later with
  the same id and arguments, and the program resumes from its checkpoint. Any other exit code ends the job.
  Use --requeue with --time so SLURM sends USR1 before the limit (see --signal).

Examples:
  launch.sh -- info                                           # one process here
  launch.sh --nproc-per-node 2 -- info --distributed          # torchrun, 2 processes
  launch.sh --submit --nodes 2 --gpus-per-node 8 --time 04:00:00 --partition gpu --log-dir logs \
      --requeue --container-image nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts "$PWD:$PWD" -- demo
  launch.sh --submit --chain --nodes 16 --time 04:00:00 --requeue --log-dir logs --cpu-partition cpu \
      --cpu-time 12:00:00 --cpu-mem 900G -- run examples/slimqwen/recipe.yaml --workdir runs/slimqwen
                                                              # prints `<job id> <job>` per job
  launch.sh --submit --array 64 --cpu-partition cpu --cpu-time 06:00:00 --log-dir logs -- \
      preprocess --input corpus/ --output-prefix data/corpus --tokenizer teacher_hf --shard auto
EOF
}

die() {
    printf 'launch.sh: %s\n' "$*" >&2
    exit 2
}

note() { printf 'launch.sh: %s\n' "$*" >&2; }

# Print a command so that a shell reads back the same words (shlex-compatible single quoting).
print_command() {
    local out=() word
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+=("$word")
        else
            out+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    printf '%s\n' "${out[*]}"
}

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_positive() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }

# ---------------------------------------------------------------------------------------------- options
submit=0 dry_run=0 exec_mode=0 wait=0 requeue=0 chain=0 stages_opt="" array=""
python_opt="" step_pid="" submit_only="" gpus_per_node="" tasks_per_node="" container_image="" container_mounts=""
nodes=1 time_limit="" partition="" account="" qos="" job_name="megatron-slim" log_dir="" dependency="" signal=""
cpu_partition="" cpu_time="" cpu_qos="" cpu_mem="" cpu_cpus=""
envs=() sbatch_extra=() cpu_sbatch_extra=()

while [ "$#" -gt 0 ]; do
    opt="$1"
    case "$opt" in
        --*=*) set -- "${opt%%=*}" "${opt#*=}" "${@:2}"; continue ;;
        --wait|--requeue|--nodes|--time|--partition|--account|--qos|--job-name|--log-dir|--dependency|--signal|\
        --sbatch-arg|--chain|--stages|--array|--cpu-partition|--cpu-time|--cpu-qos|--cpu-mem|--cpu-cpus|\
        --cpu-sbatch-arg) submit_only="$opt" ;;
    esac
    case "$opt" in
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        --submit) submit=1 ;;
        --dry-run) dry_run=1 ;;
        --exec) exec_mode=1 ;;
        --wait) wait=1 ;;
        --requeue) requeue=1 ;;
        --chain) chain=1 ;;
        --python|--env|--gpus-per-node|--tasks-per-node|--nproc-per-node|--container-image|--container-mounts|\
        --nodes|--time|--partition|--account|--qos|--job-name|--log-dir|--dependency|--signal|--sbatch-arg|--stages|\
        --array|--cpu-partition|--cpu-time|--cpu-qos|--cpu-mem|--cpu-cpus|--cpu-sbatch-arg)
            [ "$#" -ge 2 ] || die "$opt needs a value"
            value="$2"
            shift
            case "$opt" in
                --python) python_opt="$value" ;;
                --env)
                    [[ "$value" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VAL, got '$value'"
                    envs+=("$value") ;;
                --gpus-per-node) is_count "$value" || die "$opt: not a count: $value"; gpus_per_node="$value" ;;
                --tasks-per-node|--nproc-per-node)
                    is_positive "$value" || die "$opt: not a positive count: $value"
                    tasks_per_node="$value" ;;
                --container-image) container_image="$value" ;;
                --container-mounts) container_mounts="$value" ;;
                --nodes) is_positive "$value" || die "--nodes: not a positive count: $value"
                    nodes="$value" ;;
                --time) time_limit="$value" ;;
                --partition) partition="$value" ;;
                --account) account="$value" ;;
                --qos) qos="$value" ;;
                --job-name) job_name="$value" ;;
                --log-dir) log_dir="$value" ;;
                --dependency) dependency="$value" ;;
                --signal) signal="$value" ;;
                --sbatch-arg) sbatch_extra+=("$value") ;;
                --stages) stages_opt="$value" ;;
                --array)
                    [[ "$value" =~ ^[1-9][0-9]*(%[1-9][0-9]*)?$ ]] ||
                        die "--array wants N or N%M (N tasks, at most M at once), got '$value'"
                    array="$value" ;;
                --cpu-partition) cpu_partition="$value" ;;
                --cpu-time) cpu_time="$value" ;;
                --cpu-qos) cpu_qos="$value" ;;
                --cpu-mem) cpu_mem="$value" ;;
                --cpu-cpus) is_positive "$value" || die "--cpu-cpus: not a positive count: $value"
                    cpu_cpus="$value" ;;
                --cpu-sbatch-arg) cpu_sbatch_extra+=("$value") ;;
            esac ;;
        *) die "unknown option '$opt' (megatron-slim arguments go after --; see --help)" ;;
    esac
    shift
done
args=("$@")
[ "$submit" = 1 ] || [ -z "$submit_only" ] || die "$submit_only only applies with --submit"
[ "$chain" = 1 ] || [ -z "$stages_opt" ] || die "--stages only applies with --chain"
[ "$chain" = 0 ] || [ -z "$array" ] || die "--array runs one command as a job array, not a --chain"
if [ -z "$cpu_partition" ] && [ -z "$array" ]; then
    for opt in cpu_time cpu_qos cpu_mem cpu_cpus; do
        [ -z "${!opt}" ] || die "--${opt//_/-} shapes the CPU jobs of --chain --cpu-partition P or of --array N"
    done
    [ "${#cpu_sbatch_extra[@]}" = 0 ] || die "--cpu-sbatch-arg applies to the CPU jobs of --cpu-partition or --array"
fi
[ "${#args[@]}" -gt 0 ] || die "nothing to run: give megatron-slim arguments after -- (see --help)"

# The repository: where this script lives, or (inside a batch job, where SLURM runs a copy of the script) the
# root recorded at submit time, or the submit directory.
root=""
for candidate in "${MEGATRON_SLIM_ROOT:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)" "${SLURM_SUBMIT_DIR:-}"; do
    if [ -n "$candidate" ] && [ -d "$candidate/megatron_slim" ]; then
        root="$candidate"
        break
    fi
done

python="$python_opt"
if [ -z "$python" ]; then
    if [ -n "$container_image" ]; then
        python=python
    elif [ -n "$root" ] && [ -x "$root/.venv/bin/python" ]; then
        python="$root/.venv/bin/python"
    else
        python=python3
    fi
fi

if [ "$exec_mode" = 1 ]; then
    program=("${args[@]}")
else
    program=("$python" -m megatron_slim.cli "${args[@]}")
fi

# Per-node task count from the options (empty: not given).
tasks_from_options() {
    if [ -n "$tasks_per_node" ]; then
        echo "$tasks_per_node"
    elif [ -n "$gpus_per_node" ] && [ "$gpus_per_node" -gt 0 ]; then
        echo "$gpus_per_node"
    fi
}

# ---------------------------------------------------------------------------------------------- --submit
# The sbatch options shared by every job of a kind (gpu: the job the options describe; cpu: one task on one CPU
# node, from the --cpu-* options) except --job-name, --dependency and --wait; then the job's own extra sbatch
# arguments; and the batch script's own command line, up to its `--`: launch.sh itself, with the run-time options
# as arguments (argv keeps spaces intact).
sbatch_common=() job_extra=() inner=()

build_submit() {
    local kind="$1" gpus tasks nnodes
    if [ "$kind" = cpu ]; then
        gpus=0 tasks=1 nnodes=1
        sbatch_common=(--nodes=1 --ntasks-per-node=1)
        [ -n "$cpu_cpus" ] && sbatch_common+=("--cpus-per-task=$cpu_cpus")
        [ -n "$cpu_mem" ] && sbatch_common+=("--mem=$cpu_mem")
        [ -n "$cpu_time" ] && sbatch_common+=("--time=$cpu_time")
        [ -n "$cpu_partition" ] && sbatch_common+=("--partition=$cpu_partition")
        [ -n "$cpu_qos" ] && sbatch_common+=("--qos=$cpu_qos")
        job_extra=("${cpu_sbatch_extra[@]}")
    else
        gpus="${gpus_per_node:-8}" nnodes="$nodes"
        tasks="$(tasks_from_options)"
        [ -n "$tasks" ] || tasks="$(( gpus > 0 ? gpus : 1 ))"
        sbatch_common=("--nodes=$nnodes" "--ntasks-per-node=$tasks")
        [ "$gpus" -gt 0 ] && sbatch_common+=("--gpus-per-node=$gpus")
        [ -n "$time_limit" ] && sbatch_common+=("--time=$time_limit")
        [ -n "$partition" ] && sbatch_common+=("--partition=$partition")
        [ -n "$qos" ] && sbatch_common+=("--qos=$qos")
        job_extra=("${sbatch_extra[@]}")
    fi
    [ -n "$account" ] && sbatch_common+=("--account=$account")
    if [ "$requeue" = 1 ]; then
        sbatch_common+=(--requeue --open-mode=append "--signal=${signal:-B:USR1@120}")
    elif [ -n "$signal" ]; then
        sbatch_common+=("--signal=$signal")
    fi
    if [ -n "$log_dir" ]; then
        # An array's tasks: <job name>-<array job id>_<task index>.
        local id='%j'
        [ -n "$array" ] && id='%A_%a'
        sbatch_common+=("--output=$log_dir/%x-$id.out" "--error=$log_dir/%x-$id.err")
    fi

    local script
    script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    inner=("$script" --tasks-per-node "$tasks" --gpus-per-node "$gpus")
    [ -n "$python_opt" ] && inner+=(--python "$python_opt")
    [ -n "$container_image" ] && inner+=(--container-image "$container_image")
    [ -n "$container_mounts" ] && inner+=(--container-mounts "$container_mounts")
    [ "$exec_mode" = 1 ] && inner+=(--exec)
    local kv
    for kv in "${envs[@]}"; do
        inner+=(--env "$kv")
    done
    return 0
}

prepare_submit() {
    [ -n "$log_dir" ] && mkdir -p "$log_dir"
    # The copy of this script that SLURM runs finds the repository through this variable.
    if [ -n "$root" ]; then
        export MEGATRON_SLIM_ROOT="$root"
    fi
}

submit_job() {
    local count="${array%%%*}" throttle=""
    [[ "$array" == *%* ]] && throttle="%${array#*%}"
    if [ -n "$array" ]; then
        build_submit cpu
    else
        build_submit gpu
    fi
    local cmd=(sbatch --parsable "--job-name=$job_name" "${sbatch_common[@]}")
    # Task I of N sees SLURM_ARRAY_TASK_ID=I and SLURM_ARRAY_TASK_COUNT=N (e.g. for `preprocess --shard auto`).
    [ -n "$array" ] && cmd+=("--array=0-$((count - 1))$throttle")
    [ -n "$dependency" ] && cmd+=("--dependency=$dependency")
    [ "$wait" = 1 ] && cmd+=(--wait)
    cmd+=("${job_extra[@]}" "${inner[@]}" -- "${args[@]}")

    if [ "$dry_run" = 1 ]; then
        print_command "${cmd[@]}"
        return 0
    fi
    prepare_submit
    exec "${cmd[@]}"
}

# The chain's jobs of `run RECIPE --workdir DIR ...`: from --stages, else from the program's --list-stages (one
# job per stage) or, with CPU jobs, --list-jobs (NAME:cpu or NAME:gpu).
chain_stages() {
    local listed rc=0 list=--list-stages
    if [ -n "$stages_opt" ]; then
        tr ',' '\n' <<<"$stages_opt"
        return 0
    fi
    [ -n "$cpu_partition" ] && list=--list-jobs
    listed="$(env "${envs[@]}" "$python" -m megatron_slim.cli "${args[@]}" "$list")" || rc=$?
    [ "$rc" = 0 ] || die "could not list the chain's jobs: \`$(print_command "$python" -m megatron_slim.cli \
"${args[@]}" "$list")\` exited $rc (name them with --stages A,B,...)"
    printf '%s\n' "$listed"
}

# Cancel the jobs of a chain whose submission failed half-way.
cancel_jobs() {
    [ "$#" -gt 0 ] || return 0
    note "cancelling the chain's jobs submitted so far: $*"
    scancel "$@" || note "scancel $* failed"
}

submit_chain() {
    [ "$exec_mode" = 0 ] || die "--chain runs megatron-slim's run command, not --exec"
    [ "${args[0]}" = run ] ||
        die "--chain submits the stages of \`run RECIPE --workdir DIR [run args]\`: give those after --"
    # With CPU jobs each job runs `run ... --job NAME`, else `run ... --stage NAME`.
    local word select=--stage allow=0
    [ -n "$cpu_partition" ] && select=--job
    for word in "${args[@]}"; do
        case "$word" in
            --stage|--stage=*|--list-stages|--job|--job=*|--list-jobs)
                die "--chain adds $select NAME to each job; do not give $word" ;;
            --allow-single-process-steps) allow=1 ;;
        esac
    done
    if [ "$select" = --stage ] && [ "$nodes" -gt 1 ] && [ "$allow" = 0 ]; then
        die "a chain of $nodes-node jobs runs its single-process steps (teacher conversion, tokenization, pruning," \
            "export) in jobs of their own: name a CPU partition with --cpu-partition P (or give" \
            "--allow-single-process-steps after -- to run them in the GPU jobs while the other GPUs wait)"
    fi
    local stages=() wheres=() stage where listed
    listed="$(chain_stages)" || exit "$?"
    while IFS= read -r stage; do
        [ -n "$stage" ] || continue
        where=gpu
        if [[ "$stage" == *:* ]]; then
            where="${stage##*:}" stage="${stage%:*}"
            [ -n "$cpu_partition" ] || die "'$stage:$where' names the kind of node of a job: give --cpu-partition"
            [ "$where" = cpu ] || [ "$where" = gpu ] || die "unknown kind of job '$where' in '$stage:$where' (cpu, gpu)"
        fi
        [[ "$stage" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$ ]] ||
            die "unusable stage name '$stage' (letters, digits, _ . -, not starting with . or -; VARIANT/STAGE)"
        stages+=("$stage")
        wheres+=("$where")
    done <<<"$listed"
    [ "${#stages[@]}" -gt 0 ] || die "the recipe has no stages to submit"

    # Each job's predecessor: the job before it in its chain. A recipe with variants lists the jobs of the steps
    # variants share (`shared`, or shared.JOB) and then VARIANT/STAGE (or VARIANT/JOB): each variant is its own
    # chain, starting after the last shared job.
    local i j parents=() shared_index=""
    for i in "${!stages[@]}"; do
        parents[i]=""
        if [[ "${stages[$i]}" != */* ]]; then
            parents[i]="$shared_index"
            shared_index="$i"
        else
            for ((j = i - 1; j >= 0; j--)); do
                if [ "${stages[$j]%%/*}" = "${stages[$i]%%/*}" ] && [[ "${stages[$j]}" == */* ]]; then
                    parents[i]="$j"
                    break
                fi
            done
            [ -n "${parents[$i]}" ] || parents[i]="$shared_index"
        fi
    done

    [ "$dry_run" = 1 ] || prepare_submit
    local dep cmd ids=() fds=() fd out rc id
    for i in "${!stages[@]}"; do
        stage="${stages[$i]}"
        build_submit "${wheres[$i]}"
        cmd=(sbatch --parsable "--job-name=$job_name-${stage//\//-}" "${sbatch_common[@]}")
        if [ -z "${parents[$i]}" ]; then
            dep="$dependency"
        elif [ "$dry_run" = 1 ]; then
            dep="afterok:<${stages[${parents[$i]}]}>"
        else
            dep="afterok:${ids[${parents[$i]}]}"
        fi
        if [ -n "$dep" ]; then
            # A stage whose predecessor failed is cancelled instead of pending forever.
            cmd+=("--dependency=$dep" --kill-on-invalid-dep=yes)
        fi
        [ "$wait" = 1 ] && cmd+=(--wait)
        cmd+=("${job_extra[@]}" "${inner[@]}" -- "${args[@]}" "$select" "$stage")
        if [ "$dry_run" = 1 ]; then
            print_command "${cmd[@]}"
            continue
        fi
        rc=0 id=""
        if [ "$wait" = 1 ]; then
            # sbatch --wait prints the job id at once, then returns the job's exit status when it has ended
            # (through requeues; 0 when it was cancelled because a stage before it failed). One waiting sbatch
            # per job: the failed stage's own status tells the failure even after SLURM has purged the job.
            exec {fd}< <(status=0; "${cmd[@]}" || status=$?; echo "exit $status")
            fds+=("$fd")
            IFS= read -r -u "$fd" out || out=""
            case "$out" in
                "exit "*) rc="${out#exit }" ;;
                *) id="${out%%;*}" ;;
            esac
        else
            out="$("${cmd[@]}")" || rc=$?
            id="${out%%;*}"
        fi
        if [ "$rc" != 0 ] || ! is_positive "$id"; then
            cancel_jobs "${ids[@]}"
            die "sbatch failed for stage $stage (exit $rc)"
        fi
        ids+=("$id")
        printf '%s %s\n' "$id" "$stage"
    done
    [ "$wait" = 1 ] && [ "$dry_run" = 0 ] || return 0

    # A job whose predecessor failed (or was not run) is cancelled by SLURM and reports 0: name it as not run.
    local status=0 failed=()
    for i in "${!fds[@]}"; do
        out=""
        while IFS= read -r -u "${fds[$i]}" out; do
            [[ "$out" == "exit "* ]] && break
        done
        rc="${out#exit }"
        is_count "$rc" || rc=1
        failed[i]=0
        if [ -n "${parents[$i]}" ] && [ "${failed[${parents[$i]}]}" = 1 ]; then
            note "stage ${stages[$i]} (job ${ids[$i]}): not run, stage ${stages[${parents[$i]}]} before it failed"
            failed[i]=1
        elif [ "$rc" != 0 ]; then
            note "stage ${stages[$i]} (job ${ids[$i]}) failed with exit status $rc"
            failed[i]=1
            [ "$status" != 0 ] || status="$rc"
        fi
    done
    return "$status"
}

# ---------------------------------------------------------------------------------------------- SLURM job
interrupted=0

forward_signal() {
    local sig="$1"
    interrupted=1
    [ -n "$step_pid" ] || return 0
    note "got SIG$sig: forwarding it to the job step"
    if [ "$sig" = TERM ]; then
        # srun answers TERM by killing its tasks: signal the tasks of the job's steps directly instead (or, if
        # the controller is unreachable, send USR1 through srun, which the contract treats the same).
        scancel --signal=TERM "$SLURM_JOB_ID" || kill -USR1 "$step_pid" 2>/dev/null || true
    else
        kill -s "$sig" "$step_pid" 2>/dev/null || true
    fi
}

run_in_slurm_job() {
    local master
    master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" || true
    export MASTER_ADDR="${master:-$(hostname)}"
    export MASTER_PORT="$(( 15000 + SLURM_JOB_ID % 15000 ))"
    apply_env

    if [ -n "${SLURM_STEP_ID:-}" ]; then
        # Already one process of a step (srun launch.sh ...): srun did the fan-out.
        [ "$dry_run" = 1 ] && { print_command "${program[@]}"; return 0; }
        exec "${program[@]}"
    fi

    local nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" tasks
    tasks="$(tasks_from_options)"
    if [ -z "$tasks" ]; then
        if [[ "${SLURM_NTASKS_PER_NODE:-}" =~ ^[0-9]+$ ]]; then
            tasks="$SLURM_NTASKS_PER_NODE"
        elif [[ "${SLURM_GPUS_ON_NODE:-}" =~ ^[0-9]+$ ]] && [ "$SLURM_GPUS_ON_NODE" -gt 0 ]; then
            tasks="$SLURM_GPUS_ON_NODE"
        elif [[ "${SLURM_NTASKS:-}" =~ ^[0-9]+$ ]]; then
            tasks="$(( SLURM_NTASKS / nnodes > 0 ? SLURM_NTASKS / nnodes : 1 ))"
        else
            tasks=1
        fi
    fi
    # --kill-on-bad-exit: a rank that dies ends the step (and the job) at once, instead of the others waiting for
    # it in a collective until the process-group timeout while the whole allocation idles.
    local srun=(srun --kill-on-bad-exit=1 "--nodes=$nnodes" "--ntasks-per-node=$tasks" "--ntasks=$(( nnodes * tasks ))")
    # srun does not inherit the job's --cpus-per-task on every SLURM version.
    [[ "${SLURM_CPUS_PER_TASK:-}" =~ ^[0-9]+$ ]] && srun+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    [ -n "$container_image" ] && srun+=("--container-image=$container_image")
    [ -n "$container_mounts" ] && srun+=("--container-mounts=$container_mounts")
    local cmd=("${srun[@]}" "${program[@]}")
    [ "$dry_run" = 1 ] && { print_command "${cmd[@]}"; return 0; }

    note "job $SLURM_JOB_ID: $nnodes node(s) x $tasks task(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    # srun runs in the background so that the traps can fire while we wait for it.
    trap 'forward_signal USR1' USR1
    trap 'forward_signal TERM' TERM
    "${cmd[@]}" &
    step_pid=$!
    local rc
    while :; do
        interrupted=0
        wait "$step_pid" && rc=0 || rc=$?
        # A trap interrupts `wait` with a status above 128; the step itself is still running then.
        if [ "$interrupted" = 0 ] || [ "$rc" -le 128 ]; then
            break
        fi
    done
    trap - USR1 TERM

    if [ "$rc" = "$EXIT_REQUEUE" ] && [ "${ENVIRONMENT:-}" = BATCH ]; then
        note "step exited $EXIT_REQUEUE: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || note "scontrol requeue failed (was the job submitted with --requeue?)"
    fi
    return "$rc"
}

apply_env() {
    local kv
    for kv in "${envs[@]}"; do
        export "${kv?}"   # KEY=VAL as one word; ${kv?} tells shellcheck the indirection is meant
    done
}

# ---------------------------------------------------------------------------------------------- local
run_local() {
    [ -z "$container_image" ] || die "--container-image needs a SLURM job with pyxis (use --submit)"
    local nproc
    nproc="$(tasks_from_options)"
    if [ -z "$nproc" ]; then
        nproc=1
        if [ -z "$gpus_per_node" ] && command -v nvidia-smi >/dev/null 2>&1; then
            nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
            [ "$nproc" -gt 0 ] || nproc=1
        fi
    fi
    apply_env
    local cmd
    if [ "$nproc" = 1 ]; then
        cmd=("${program[@]}")
    elif [ "$exec_mode" = 1 ]; then
        cmd=("$python" -m torch.distributed.run --standalone "--nproc-per-node=$nproc" --no-python "${program[@]}")
    else
        cmd=("$python" -m torch.distributed.run --standalone "--nproc-per-node=$nproc" -m megatron_slim.cli
             "${args[@]}")
    fi
    [ "$dry_run" = 1 ] && { print_command "${cmd[@]}"; return 0; }
    exec "${cmd[@]}"
}

# ---------------------------------------------------------------------------------------------- main
if [ -n "$root" ]; then
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$submit" = 1 ] && [ "$chain" = 1 ]; then
    submit_chain
elif [ "$submit" = 1 ]; then
    submit_job
elif [ -n "${SLURM_JOB_ID:-}" ]; then
    run_in_slurm_job
else
    run_local
fi
