#!/usr/bin/env bash
# Run phased-jax on Cloud TPU VM slices: every worker of every slice runs the same command, and
# `jax.distributed.initialize()` finds its peers by itself on TPU.
#
#   launch/tpu.sh create  NAME ZONE ACCELERATOR [VERSION] [--slices K]  # e.g. my-pod us-central2-b v4-64
#   launch/tpu.sh install NAME ZONE GIT_URL [REF] [--slices K]          # clone + uv install on all workers
#   launch/tpu.sh run     NAME ZONE [--slices K] [--check] [--accelerator A] [--detach] -- phased-jax train --config ...
#   launch/tpu.sh resume  NAME ZONE                                     # after a preemption: recreate, reinstall, rerun
#   launch/tpu.sh logs    NAME ZONE [WORKER] [--slices K] [--slice I]   # follow one worker's log (default 0)
#   launch/tpu.sh stop    NAME ZONE [--slices K]                        # SIGTERM the job: it saves and exits
#   launch/tpu.sh delete  NAME ZONE [--slices K]                        # delete the slice(s)
#
# VERSION (the TPU runtime image) defaults by generation: v2-v4 tpu-ubuntu2204-base, v5e
# v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e. `--slices K` (K > 1) creates K
# slices NAME-0 .. NAME-{K-1} as one queued resource NAME (multislice) and runs on all of them
# with the MEGASCALE_* variables set; pass the same --slices to every command (or set SLICES).
# `run --check` first runs `phased-jax compile` for the job's --config on worker 0 and starts
# nothing unless the train step fits (exit 3: it does not; 2: a config error).
# `run` then follows worker 0's log until the job ends and says how it ended: finished (exit 0),
# preempted (exit 75: the job saved a checkpoint at the step its hosts agreed on, or the slice
# was reclaimed), or failed (the job's exit code). `--detach` returns once the job has started.
# `resume` reruns what `create`, `install` and `run` last did for NAME (recorded under
# $PHASED_TPU_STATE, default ~/.local/state/phased-jax/tpu): a slice that is no longer READY
# (ACTIVE, for --slices) is deleted and created again, reinstalled at the same ref, and the
# recorded job runs again; the job resumes from its last checkpoint.
#
# Environment: PROJECT (--project), SPOT=1 (spot VMs), SLICES, ACCELERATOR (skips a describe
# for --check), PYTHON_VERSION (3.11), JAX_VERSION (the jax[tpu] pin, as pyproject's tpu extra),
# COORDINATOR_PORT (multislice DCN port, 8080), COORDINATOR_ADDRESS (skips the describe of NAME-0),
# CHECK_LOCAL=1 (--check compiles on this machine, not on worker 0), DRY_RUN=1 (print each
# command, shell-quoted, one per line; run nothing).
# The run's checkpoint.dir should be gs:// so checkpoints outlive the VMs.
set -euo pipefail

PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=${JAX_VERSION:-0.10.2}
# The megascale (DCN) port; JAX's own coordinator listens on 8476 on the same worker.
COORDINATOR_PORT=${COORDINATOR_PORT:-8080}
remote_dir=phased-jax
log=/tmp/phased-jax.log
exit_file=/tmp/phased-jax.exit  # the job's exit code, written when it ends
PREEMPTED=75  # phased-jax's exit code after a preemption notice (EX_TEMPFAIL)
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

[ $# -ge 1 ] || die "usage: $me create|install|run|resume|logs|stop|delete NAME ZONE ... ($me --help)"
cmd=$1; shift
case "$cmd" in
  -h|--help|help) usage; exit 0 ;;
  create|install|run|resume|logs|stop|delete) ;;
  *) die "unknown command '$cmd' (create, install, run, resume, logs, stop, delete)" ;;
esac
[ $# -ge 2 ] || die "$cmd needs NAME ZONE"
name=$1 zone=$2; shift 2
[[ $name != -* && $zone != -* ]] || die "$cmd needs NAME ZONE before options"

slices=${SLICES:-1} check=0 detach=0 accel=${ACCELERATOR:-} slice=0 pos=() job=()
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
    --detach) detach=1; shift ;;
    -*) die "unknown option $1 for $cmd" ;;
    *) if [ "$cmd" = run ]; then job=("$@"); break; fi; pos+=("$1"); shift ;;
  esac
done
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
[[ $slice =~ ^[0-9]+$ ]] && [ "$slice" -lt "$slices" ] || die "--slice must be 0..$((slices - 1)), got '$slice'"
[ "$cmd" = run ] || [ "$check" = 0 ] || die "--check is an option of run"
[ "$cmd" = run ] || [ "$detach" = 0 ] || die "--detach is an option of run"
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

# What create, install and run did for NAME in ZONE, for `resume`: one `rec_KEY=(words)` line a
# key, shell-quoted (a real run writes it; DRY_RUN leaves it alone).
record_file=${PHASED_TPU_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/phased-jax/tpu}/$zone/$name
record() {
  dry && return 0
  local key=$1 kept=""; shift
  mkdir -p "${record_file%/*}"
  [ -f "$record_file" ] && kept=$(grep -v "^rec_$key=" "$record_file" || true)
  { [ -n "$kept" ] && printf '%s\n' "$kept"; echo "rec_$key=($(shq "$@"))"; } > "$record_file.tmp"
  mv "$record_file.tmp" "$record_file"
}
# REPLY = the slice's state (READY, PREEMPTED, ...; a queued resource's ACTIVE, ...), or NOT_FOUND.
slice_state() {
  local describe=("${gc[@]}" describe "$name" "${opt[@]}" --format='value(state)')
  [ "$slices" -gt 1 ] && describe=(gcloud compute tpus queued-resources describe "$name"
    "${opt[@]}" --format='value(state.state)')
  if dry; then shq "${describe[@]}"; REPLY="<state of $name>"; return 0; fi
  REPLY=$("${describe[@]}" 2>/dev/null) || REPLY=""
  [ -n "$REPLY" ] || REPLY=NOT_FOUND
}
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
    record create "${pos[@]}"; record spot "${SPOT:-0}"; record slices "$slices"
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
    record install "${pos[@]}"
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
    # The job's exit code goes to $exit_file; its wrapper outlives a SIGTERM (`stop`, a host
    # shutting down) to write it, while the job itself saves and exits.
    wrapped=$(shq "trap true TERM; $(shq "${job[@]}"); echo \$? > $exit_file")
    for ((i = 0; i < ${#nodes[@]}; i++)); do
      ids=""; [ -n "$env" ] && ids="$env MEGASCALE_SLICE_ID=$i; "
      ssh_to "${nodes[i]}" all "${ids}cd $remote_dir && . .venv/bin/activate && rm -f $exit_file && nohup bash -c $wrapped > $log 2>&1 < /dev/null &"
    done
    record job "${job[@]}"; record slices "$slices"
    more=""; [ "$slices" -gt 1 ] && more=" --slices $slices"
    if [ "$detach" = 1 ]; then
      dry || echo "$me: started on all workers; follow with: $me logs $name $zone$more" >&2
      exit 0
    fi
    dry || echo "$me: started on all workers; following worker 0 until the job ends (Ctrl-C stops following, not the job)" >&2
    rc=0
    ssh_to "${nodes[0]}" 0 "tail -n +1 -F $log & t=\$!; while [ ! -s $exit_file ]; do sleep 5; done; sleep 1; kill \$t; exit \$(cat $exit_file)" || rc=$?
    dry && exit 0
    if [ "$rc" = 255 ]; then  # ssh itself failed: is the slice still there?
      slice_state
      case $REPLY in
        READY|ACTIVE) echo "$me: lost the connection to worker 0 ($name is $REPLY); the job may still run: $me logs $name $zone$more" >&2; exit 255 ;;
        *) echo "$me: $name was reclaimed (state $REPLY): the job was preempted; resume with: $me resume $name $zone" >&2; exit "$PREEMPTED" ;;
      esac
    fi
    case $rc in
      0) echo "$me: the job finished" >&2 ;;
      "$PREEMPTED") echo "$me: the job was preempted and saved a checkpoint; resume with: $me resume $name $zone" >&2 ;;
      *) echo "$me: the job failed (exit $rc); its log: $me logs $name $zone$more" >&2 ;;
    esac
    exit "$rc"
    ;;
  resume)
    nargs 0 0 "takes no arguments: it reruns what create, install and run recorded for NAME"
    [ -f "$record_file" ] || die "no record of $name in $zone at $record_file: resume reruns what '$me create', 'install' and 'run' did for it"
    rec_create=() rec_install=() rec_job=() rec_spot=(0) rec_slices=(1)
    # shellcheck source=/dev/null
    . "$record_file"
    [ "${#rec_create[@]}" -ge 1 ] && [ "${#rec_install[@]}" -ge 1 ] && [ "${#rec_job[@]}" -ge 1 ] ||
      die "the record $record_file lacks create, install or run: do those steps by hand"
    slices=${rec_slices[0]}
    again=(bash "$0"); sl=(--slices "$slices")
    slice_state
    case $REPLY in
      READY|ACTIVE) echo "$me: $name is $REPLY: running the job again" >&2 ;;
      *)
        [ "$REPLY" = NOT_FOUND ] || "${again[@]}" delete "$name" "$zone" "${sl[@]}"
        SPOT=${rec_spot[0]} "${again[@]}" create "$name" "$zone" "${rec_create[@]}" "${sl[@]}"
        if [ "$slices" -gt 1 ]; then  # a queued resource: wait until it is ACTIVE
          slice_state
          while ! dry && [ "$REPLY" != ACTIVE ]; do
            echo "$me: $name is $REPLY; waiting for ACTIVE" >&2; sleep 30; slice_state
          done
        fi
        "${again[@]}" install "$name" "$zone" "${rec_install[@]}" "${sl[@]}" ;;
    esac
    exec "${again[@]}" run "$name" "$zone" "${sl[@]}" -- "${rec_job[@]}"
    ;;
  logs)
    nargs 0 1 "takes at most one WORKER"
    ssh_to "${nodes[slice]}" "${pos[0]:-0}" "tail -n 200 -F $log"
    ;;
  stop)  # SIGTERM, as a preemption: a train job saves at an agreed step and exits 75
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
