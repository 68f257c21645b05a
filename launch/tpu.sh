#!/usr/bin/env bash
# Run phased-jax on Cloud TPU VM slices: every worker of every slice runs the same command, and
# `jax.distributed.initialize()` finds its peers by itself on TPU.
#
#   launch/tpu.sh create  NAME ZONE ACCELERATOR [VERSION] [--slices K]  # e.g. my-pod us-central2-b v4-64
#   launch/tpu.sh install NAME ZONE GIT_URL [REF] [--slices K]          # clone + uv install on all workers
#   launch/tpu.sh run     NAME ZONE [--slices K] [--check] [--accelerator A] -- phased-jax train --config ...
#   launch/tpu.sh logs    NAME ZONE [WORKER] [--slices K] [--slice I]   # follow one worker's log (default 0)
#   launch/tpu.sh stop    NAME ZONE [--slices K]                        # kill the job on every worker
#   launch/tpu.sh delete  NAME ZONE [--slices K]                        # delete the slice(s)
#
# VERSION (the TPU runtime image) defaults by generation: v2-v4 tpu-ubuntu2204-base, v5e
# v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e. `--slices K` (K > 1) creates K
# slices NAME-0 .. NAME-{K-1} as one queued resource NAME (multislice) and runs on all of them
# with the MEGASCALE_* variables set; pass the same --slices to every command (or set SLICES).
# `run --check` first runs `phased-jax compile` for the job's --config on worker 0 and starts
# nothing unless the train step fits (exit 3: it does not; 2: a config error).
#
# Environment: PROJECT (--project), SPOT=1 (spot VMs), SLICES, ACCELERATOR (skips a describe
# for --check), PYTHON_VERSION (3.11), JAX_VERSION (the jax[tpu] pin, as pyproject's tpu extra),
# COORDINATOR_PORT (multislice DCN port, 8080), COORDINATOR_ADDRESS (skips the describe of NAME-0),
# CHECK_LOCAL=1 (--check compiles on this machine, not on worker 0), DRY_RUN=1 (print each
# command, shell-quoted, one per line; run nothing).
# The run's checkpoint.dir should be gs:// so checkpoints outlive the VMs; rerunning `run` after
# a preemption resumes.
set -euo pipefail

PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=${JAX_VERSION:-0.10.2}
# The megascale (DCN) port; JAX's own coordinator listens on 8476 on the same worker.
COORDINATOR_PORT=${COORDINATOR_PORT:-8080}
remote_dir=phased-jax
log=/tmp/phased-jax.log
me=${0##*/}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "$me: error: $*" >&2; exit 2; }

# Shell-quote each argument only where it needs it, so a printed command pastes back unchanged.
shq() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

dry() { [ "${DRY_RUN:-0}" = 1 ]; }
# Run a command, or under DRY_RUN print it.
x() { if dry; then shq "$@"; else "$@"; fi; }
# REPLY = a command's output; under DRY_RUN print the command and use a placeholder.
query() {
  local placeholder=$1; shift
  if dry; then shq "$@"; REPLY=$placeholder; else REPLY=$("$@"); fi
  [ -n "$REPLY" ] || die "no answer from: $(shq "$@")"
}

[ $# -ge 1 ] || die "usage: $me create|install|run|logs|stop|delete NAME ZONE ... ($me --help)"
cmd=$1; shift
case "$cmd" in
  -h|--help|help) usage; exit 0 ;;
  create|install|run|logs|stop|delete) ;;
  *) die "unknown command '$cmd' (create, install, run, logs, stop, delete)" ;;
esac
[ $# -ge 2 ] || die "$cmd needs NAME ZONE"
name=$1 zone=$2; shift 2
[[ $name != -* && $zone != -* ]] || die "$cmd needs NAME ZONE before options"

slices=${SLICES:-1} check=0 accel=${ACCELERATOR:-} slice=0 pos=() job=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; job=("$@"); break ;;
    --slices|--accelerator|--slice) [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in --slices) slices=$2 ;; --accelerator) accel=$2 ;; --slice) slice=$2 ;; esac
      shift 2 ;;
    --slices=*) slices=${1#*=}; shift ;;
    --accelerator=*) accel=${1#*=}; shift ;;
    --slice=*) slice=${1#*=}; shift ;;
    --check) check=1; shift ;;
    -*) die "unknown option $1 for $cmd" ;;
    *) if [ "$cmd" = run ]; then job=("$@"); break; fi; pos+=("$1"); shift ;;
  esac
done
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
[[ $slice =~ ^[0-9]+$ ]] && [ "$slice" -lt "$slices" ] || die "--slice must be 0..$((slices - 1)), got '$slice'"
[ "$cmd" = run ] || [ "$check" = 0 ] || die "--check is an option of run"
[[ $PYTHON_VERSION =~ ^3\.([0-9]+)(\.[0-9]+)?$ ]] && [ "${BASH_REMATCH[1]}" -ge 11 ] ||
  die "PYTHON_VERSION must be 3.11 or newer (pyproject's requires-python), got '$PYTHON_VERSION'"
[[ $JAX_VERSION =~ ^[0-9]+\.[0-9]+\.[0-9]+[a-z0-9.]*$ ]] || die "JAX_VERSION must be a version like 0.10.2, got '$JAX_VERSION'"
[[ $COORDINATOR_PORT =~ ^[0-9]+$ ]] || die "COORDINATOR_PORT must be a port number, got '$COORDINATOR_PORT'"
nargs() { [ "${#pos[@]}" -ge "$1" ] && [ "${#pos[@]}" -le "$2" ] || die "$cmd: $3"; }

gc=(gcloud compute tpus tpu-vm)
opt=(--zone "$zone")
[ -n "${PROJECT:-}" ] && opt+=(--project "$PROJECT")
nodes=("$name")
if [ "$slices" -gt 1 ]; then nodes=(); for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done; fi

ssh_to() { x "${gc[@]}" ssh "$1" "${opt[@]}" --worker="$2" --command "$3"; }
on_all() { local n; for n in "${nodes[@]}"; do ssh_to "$n" all "$1"; done; }

default_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator '$1': pass VERSION after it" ;;
  esac
}

# --config FILE and every --config.FIELD override of the job, for `phased-jax compile`.
config_args() {
  local a
  while [ $# -gt 0 ]; do
    a=$1; shift
    case "$a" in
      --config) [ $# -ge 1 ] || die "run --check: --config needs a value"; cfg+=(--config "$1"); shift ;;
      --config=*) cfg+=("$a") ;;
      --config.*=*) cfg+=("$a") ;;
      --config.*) if [ $# -ge 1 ]; then cfg+=("$a" "$1"); shift; fi ;;
    esac
  done
}

case "$cmd" in
  create)
    nargs 1 2 "needs ACCELERATOR [VERSION], e.g. v4-64 or v5litepod-256"
    accel=${pos[0]}
    version=${pos[1]:-$(default_version "$accel")}
    extra=(); [ "${SPOT:-0}" = 1 ] && extra+=(--spot)
    if [ "$slices" -gt 1 ]; then
      x gcloud compute tpus queued-resources create "$name" "${opt[@]}" --accelerator-type "$accel" \
        --runtime-version "$version" --node-count "$slices" --node-prefix "$name" "${extra[@]}"
      echo "$me: queued $slices x $accel as $name-0 .. $name-$((slices - 1)); wait for ACTIVE:" \
        "gcloud compute tpus queued-resources describe $name --zone $zone" >&2
    else
      x "${gc[@]}" create "$name" "${opt[@]}" --accelerator-type "$accel" --version "$version" "${extra[@]}"
    fi
    ;;
  install)
    nargs 1 2 "needs GIT_URL [REF]"
    url=$(shq "${pos[0]}") ref=$(shq "${pos[1]:-main}")
    steps=(
      "set -eo pipefail" "export PATH=\"\$HOME/.local/bin:\$PATH\""
      "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh"
      "[ -d $remote_dir ] || git clone -q $url $remote_dir"
      "cd $remote_dir" "git fetch -q origin" "git checkout -q $ref" "{ git pull -q --ff-only || true; }"
      "rm -rf .venv" "uv venv -q --python $PYTHON_VERSION .venv"
      "uv pip install -q --python .venv/bin/python -e \".[tpu]\" \"jax[tpu]==$JAX_VERSION\""
      ".venv/bin/python -c \"import jax, phased_jax, sys; print(sys.version.split()[0], jax.__version__)\""
    )
    script=${steps[0]}; for step in "${steps[@]:1}"; do script+="; $step"; done
    on_all "$script"
    ;;
  run)
    [ "${#job[@]}" -ge 1 ] || die "run needs the job after --, e.g. -- phased-jax train --config FILE"
    if [ "$check" = 1 ]; then
      cfg=(); config_args "${job[@]}"
      [ "${#cfg[@]}" -ge 1 ] || die "run --check: the job has no --config to compile"
      if [ -z "$accel" ]; then
        query "<acceleratorType of ${nodes[0]}>" "${gc[@]}" describe "${nodes[0]}" "${opt[@]}" \
          --format='value(acceleratorType)'
        accel=$REPLY
      fi
      compile=(phased-jax compile "${cfg[@]}" --tpu "$accel")
      [ "$slices" -gt 1 ] && compile+=(--slices "$slices")
      # On worker 0, where the job's own code, config files and pinned jax/libtpu are installed;
      # JAX_PLATFORMS=cpu keeps it off the chips (the compile targets a TPU topology, not them).
      # CHECK_LOCAL=1 compiles here instead (needs phased-jax with libtpu on this machine).
      rc=0
      if [ "${CHECK_LOCAL:-0}" = 1 ]; then
        x env JAX_PLATFORMS=cpu "${compile[@]}" || rc=$?
      else
        ssh_to "${nodes[0]}" 0 "cd $remote_dir && JAX_PLATFORMS=cpu .venv/bin/$(shq "${compile[@]}")" || rc=$?
      fi
      if [ "$rc" != 0 ]; then
        echo "$me: the compile check failed (exit $rc); the job was not started" >&2
        exit "$rc"
      fi
    fi
    env=""
    if [ "$slices" -gt 1 ]; then
      [[ " ${job[*]}" == *" --config.mesh.dcn_shape"* ]] || echo "$me: warning: no" \
        "--config.mesh.dcn_shape in the job; the config's own must span the $slices slices," \
        "e.g. '($slices,1,1)' (run --check stops at one that does not)" >&2
      if [ -n "${COORDINATOR_ADDRESS:-}" ]; then
        coord=$COORDINATOR_ADDRESS
      else
        query "<worker 0 IP of ${nodes[0]}>" "${gc[@]}" describe "${nodes[0]}" "${opt[@]}" \
          --format='value(networkEndpoints[0].ipAddress)'
        coord=$REPLY
      fi
      env="export MEGASCALE_COORDINATOR_ADDRESS=$(shq "$coord:$COORDINATOR_PORT") MEGASCALE_PORT=$COORDINATOR_PORT MEGASCALE_NUM_SLICES=$slices"
    fi
    line=$(shq "${job[@]}")
    for ((i = 0; i < ${#nodes[@]}; i++)); do
      ids=""; [ -n "$env" ] && ids="$env MEGASCALE_SLICE_ID=$i; "
      ssh_to "${nodes[i]}" all "${ids}cd $remote_dir && . .venv/bin/activate && nohup $line > $log 2>&1 < /dev/null &"
    done
    dry || echo "$me: started on all workers; follow with: $me logs $name $zone$([ "$slices" -gt 1 ] && echo " --slices $slices")" >&2
    ;;
  logs)
    nargs 0 1 "takes at most one WORKER"
    ssh_to "${nodes[slice]}" "${pos[0]:-0}" "tail -n 200 -F $log"
    ;;
  stop)
    nargs 0 0 "takes no arguments"
    on_all "pkill -f '[p]hased-jax (train|generate|compile)' || true"
    ;;
  delete)
    nargs 0 0 "takes no arguments"
    if [ "$slices" -gt 1 ]; then
      x gcloud compute tpus queued-resources delete "$name" "${opt[@]}" --force --quiet
    else
      x "${gc[@]}" delete "$name" "${opt[@]}" --quiet
    fi
    ;;
esac
