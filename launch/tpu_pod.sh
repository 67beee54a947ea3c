#!/usr/bin/env bash
# Barlow Twins on a Cloud TPU VM slice (e.g. v4-32 = 4 hosts x 4 chips): create or reuse the
# slice, copy this checkout to every host, install it, and run the same bt_jax command on all
# hosts. Checkpoints/metrics (--workdir) and the TFDS data (--data_dir) live on GCS.
#
#   launch/tpu_pod.sh --accelerator-type=v4-32 --zone=us-central2-b \
#       --workdir=gs://BUCKET/bt_r50 --data_dir=gs://BUCKET/tensorflow_datasets
#   launch/tpu_pod.sh ... --dry-run          # print the commands; needs no gcloud/network
#
# Needs gcloud (authenticated, with a project whose TPU quota covers the slice) and git.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"
REMOTE_DIR="bt_jax"             # on every host, relative to the home directory
REMOTE_TARBALL="bt_jax-src.tar.gz"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --workdir=gs://BUCKET/DIR [options] [-- MORE bt_jax.main ARGS]

Creates (or reuses) a Cloud TPU VM slice, copies this checkout to every host, installs it
with pip install -e '.[tpu]', and runs python -m bt_jax.main on all hosts at once
(gcloud ... ssh --worker=all). jax.distributed needs no arguments on Cloud TPU.

Slice:
  --name NAME               TPU VM name (default bt-jax-<accelerator type>)
  --zone ZONE               (default us-central2-b, where v4 lives)
  --accelerator-type TYPE   v4-32 (default), v4-8, v5litepod-16, v5p-16, v6e-16, v3-32, ...
  --version VERSION         TPU VM runtime image (default by type: tpu-ubuntu2204-base for
                            v2/v3/v4, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
                            v2-alpha-tpuv6e for v6e)
  --project PROJECT         (default: gcloud's configured project)
  --spot | --preemptible    create a Spot (or legacy preemptible) slice: cheaper, can be
                            reclaimed at any time; rerun this command to resume
Job:
  --config FILE             bt_jax config, relative to the repository (configs/imagenet.py)
  --workdir gs://...        checkpoints and metrics (required; gs:// for multi-host slices)
  --data_dir gs://...       TFDS data folder, passed as --config.data.data_dir
  --detach                  start the job in the background on every host (log in
                            ~/bt_jax.log there) and return; safer for long runs
  --skip-setup              do not copy and install the code again (it is already there)
Other actions:
  --stop                    SIGTERM the running job on every host: it checkpoints, exits 0
  --delete                  delete the slice
  --dry-run                 print the commands (and the host-count rule) and exit
  -h, --help                this help

Options take "--opt value" or "--opt=value"; "-" and "_" are interchangeable in names.
Everything after "--" is passed to python -m bt_jax.main, e.g. -- --config.train.epochs=800

Hosts per slice (the name's number counts TensorCores up to v4/v5p, chips from v5e on):
  v2-N, v3-N    N TensorCores, 2 per chip, 4 chips per host  -> N/8 hosts (v3-32: 4)
  v4-N, v5p-N   N TensorCores, 2 per chip, 4 chips per host  -> N/8 hosts (v4-32: 4)
  v5litepod-N, v6e-N   N chips, 1 TensorCore each; up to 8 chips on 1 host, larger slices
                4 chips per host -> N/4 hosts (v5litepod-16: 4)
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  echo "Run launch/tpu_pod.sh --help for usage." >&2
  exit 2
}

q() {  # quote one word for bash, like Python's shlex.quote
  local re='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $1 =~ $re ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

qjoin() {  # quote and join words into one command line
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(q "$word")"
  done
  printf '%s\n' "$out"
}

# --- options -----------------------------------------------------------------------------
name="" zone="us-central2-b" accelerator="v4-32" version="" project="" capacity=""
config="configs/imagenet.py" workdir="" data_dir=""
action="run" detach=0 setup=1 dry_run=0
extra=()
while (($#)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    extra=("$@")
    break
  fi
  opt=${arg%%=*}
  opt=${opt//_/-}
  case $opt in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) dry_run=1 ;;
    --spot | --preemptible) capacity=$opt ;;
    --detach) detach=1 ;;
    --skip-setup) setup=0 ;;
    --stop) action=stop ;;
    --delete) action=delete ;;
    --name | --zone | --accelerator-type | --version | --project | --config | --workdir | \
      --data-dir)
      if [[ $arg == *=* ]]; then
        value=${arg#*=}
      else
        (($#)) || die "$arg needs a value"
        value=$1
        shift
      fi
      [[ -n $value ]] || die "$opt needs a non-empty value"
      case $opt in
        --name) name=$value ;;
        --zone) zone=$value ;;
        --accelerator-type) accelerator=$value ;;
        --version) version=$value ;;
        --project) project=$value ;;
        --config) config=$value ;;
        --workdir) workdir=$value ;;
        --data-dir) data_dir=$value ;;
      esac
      ;;
    *) die "unknown option $arg (bt_jax.main arguments go after --)" ;;
  esac
done

# --- hosts per slice ---------------------------------------------------------------------
[[ $accelerator =~ ^([a-z0-9]+)-([0-9]+)$ ]] ||
  die "--accelerator-type must look like v4-32 or v5litepod-16, got '$accelerator'"
family=${BASH_REMATCH[1]}
count=${BASH_REMATCH[2]}
case $family in
  v2 | v3)
    chips=$((count / 2)) hosts=$(((count + 7) / 8)) devices=$count
    rule="'$family-N' counts TensorCores (2 per chip, 4 chips = 8 cores per host): hosts = N/8"
    rule+=", one JAX device per TensorCore"
    default_version="tpu-ubuntu2204-base"
    ;;
  v4 | v5p)
    chips=$((count / 2)) hosts=$(((count + 7) / 8)) devices=$chips
    rule="'$family-N' counts TensorCores (2 per chip, 4 chips per host): hosts = N/8"
    rule+=", one JAX device per chip (megacore)"
    default_version="tpu-ubuntu2204-base"
    if [[ $family == v5p ]]; then default_version="v2-alpha-tpuv5"; fi
    ;;
  v5litepod | v6e)
    chips=$count devices=$count
    if ((count <= 8)); then hosts=1; else hosts=$((count / 4)); fi
    rule="'$family-N' counts chips (1 TensorCore each): up to 8 chips on one host, larger"
    rule+=" slices 4 chips per host: hosts = N/4"
    default_version="v2-alpha-tpuv5-lite"
    if [[ $family == v6e ]]; then default_version="v2-alpha-tpuv6e"; fi
    ;;
  *)
    die "unknown TPU family '$family' (known: v2, v3, v4, v5p, v5litepod, v6e)"
    ;;
esac
version=${version:-$default_version}
name=${name:-bt-jax-$accelerator}

# --- commands ----------------------------------------------------------------------------
gflags=("--zone=$zone")
if [[ -n $project ]]; then gflags+=("--project=$project"); fi
tpu=(gcloud compute tpus tpu-vm)

describe_cmd=$(qjoin "${tpu[@]}" describe "$name" "${gflags[@]}" "--format=value(state)")
create_words=("${tpu[@]}" create "$name" "${gflags[@]}" "--accelerator-type=$accelerator"
  "--version=$version")
if [[ -n $capacity ]]; then create_words+=("$capacity"); fi
create_cmd=$(qjoin "${create_words[@]}")
delete_cmd=$(qjoin "${tpu[@]}" delete "$name" "${gflags[@]}" --quiet)

ssh_all() {  # the gcloud command running the remote shell command $1 on every host
  qjoin "${tpu[@]}" ssh "$name" "${gflags[@]}" --worker=all "--command=$1"
}

tarball="${TMPDIR:-/tmp}/bt_jax-src-$name.tar.gz"
if git -C "$REPO_DIR" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # what the checkout holds, committed or not, minus .gitignored files
  pack_cmd="$(qjoin git -C "$REPO_DIR" ls-files -z --cached --others --exclude-standard) |"
  pack_cmd+=" $(qjoin tar -C "$REPO_DIR" --null --files-from=- --ignore-failed-read -czf \
    "$tarball")"
else
  pack_cmd=$(qjoin tar -C "$REPO_DIR" --exclude=.git -czf "$tarball" .)
fi
copy_cmd=$(qjoin "${tpu[@]}" scp "$tarball" "$name:$REMOTE_TARBALL" "${gflags[@]}" \
  --worker=all)
install_cmd=$(ssh_all "set -e; rm -rf ~/$REMOTE_DIR.new; mkdir ~/$REMOTE_DIR.new;\
 tar -xzf ~/$REMOTE_TARBALL -C ~/$REMOTE_DIR.new; rm -rf ~/$REMOTE_DIR;\
 mv ~/$REMOTE_DIR.new ~/$REMOTE_DIR; cd ~/$REMOTE_DIR;\
 python3 -m pip install --quiet --upgrade pip; python3 -m pip install --quiet -e \".[tpu]\"")

main_words=(python3 -m bt_jax.main "--config=$config" "--workdir=$workdir")
if [[ -n $data_dir ]]; then main_words+=("--config.data.data_dir=$data_dir"); fi
main_words+=(${extra[@]+"${extra[@]}"})
main_line=$(qjoin "${main_words[@]}")
if ((detach)); then
  remote_run="cd ~/$REMOTE_DIR && { nohup $main_line >> ~/bt_jax.log 2>&1 < /dev/null &"
  remote_run+=" echo \$! > ~/bt_jax.pid; }; echo \"started on \$(hostname), log ~/bt_jax.log\""
else
  remote_run="cd ~/$REMOTE_DIR && echo \$\$ > ~/bt_jax.pid && exec $main_line"
fi
run_cmd=$(ssh_all "$remote_run")
# shellcheck disable=SC2016  # expanded on the hosts, not here
stop_cmd=$(ssh_all 'kill -TERM "$(cat ~/bt_jax.pid)" && echo "SIGTERM sent on $(hostname)"')

summary="# $accelerator: $hosts host(s), $chips chips, $devices JAX devices
# rule: $rule"

# --- checks ------------------------------------------------------------------------------
if [[ $action == run ]]; then
  [[ -n $workdir ]] || die "--workdir is required (gs://BUCKET/DIR)"
  if ((hosts > 1)) && [[ $workdir != gs://* ]]; then
    die "a $hosts-host slice needs a workdir every host shares: use --workdir=gs://BUCKET/DIR"
  fi
  if [[ -n $data_dir && $data_dir != gs://* ]]; then
    echo "tpu_pod.sh: warning: --data_dir '$data_dir' is not on GCS; every host must have it" >&2
  fi
fi

# --- dry run -----------------------------------------------------------------------------
if ((dry_run)); then
  echo "$summary"
  case $action in
    delete) echo "$delete_cmd" ;;
    stop)
      echo "# SIGTERM to bt_jax on every host: checkpoint at a step all agree on, exit 0"
      echo "$stop_cmd"
      ;;
    run)
      echo "# 1. reuse the slice if its state is READY; create it if absent; delete and"
      echo "#    recreate it if PREEMPTED or TERMINATED"
      echo "$describe_cmd"
      echo "$create_cmd"
      if ((setup)); then
        echo "# 2. pack this checkout, copy it to every host, install it there"
        echo "$pack_cmd"
        echo "$copy_cmd"
        echo "$install_cmd"
      fi
      echo "# 3. the same command on all $hosts host(s); rerun this script to resume"
      echo "$run_cmd"
      ;;
  esac
  exit 0
fi

# --- run ---------------------------------------------------------------------------------
command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"

run() {
  echo "+ $1" >&2
  bash -o pipefail -c "$1"
}

echo "$summary" >&2
case $action in
  delete)
    run "$delete_cmd"
    exit 0
    ;;
  stop)
    run "$stop_cmd"
    exit 0
    ;;
esac

state=$(bash -c "$describe_cmd" 2>/dev/null || true)
case $state in
  "")
    run "$create_cmd"
    ;;
  PREEMPTED | TERMINATED)
    echo "tpu_pod.sh: $name is $state: deleting and recreating it" >&2
    run "$delete_cmd"
    run "$create_cmd"
    ;;
  READY)
    echo "tpu_pod.sh: reusing $name (READY)" >&2
    ;;
  *)
    die "$name is $state; wait until it is READY (or --delete it) and rerun"
    ;;
esac

if ((setup)); then
  run "$pack_cmd"
  run "$copy_cmd"
  run "$install_cmd"
fi
run "$run_cmd"
