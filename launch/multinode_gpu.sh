#!/usr/bin/env bash
# Multi-node GPU training without SLURM: run this once on every node.
#
#   node 0:  launch/multinode_gpu.sh --coordinator=node0:12355 --num_nodes=4 --node_rank=0 \
#                --workdir=/shared/bt_r50 --data_dir=/shared/tensorflow_datasets
#   node 1:  ... --node_rank=1 ...        (same command, its own rank; likewise nodes 2, 3)
#
# One process per node, seeing all of the node's GPUs:
#   process_id = node rank, num_processes = number of nodes.
# Why not one process per GPU (process_id = R*G + g, CUDA_VISIBLE_DEVICES=g)? JAX drives all
# local GPUs from one process through the same jit/mesh code, and one process per node means
# one tf.data input pipeline per node using every CPU core (instead of G pipelines competing
# for them, each with its own TensorFlow runtime and memory), one process to signal, and the
# process count equal to the node count. Collectives are identical (NCCL inside the node).
# SLURM (launch/slurm_gpu.sbatch) uses one process per GPU because that is what JAX's SLURM
# auto-detection expects.
#
# SIGTERM/SIGINT/SIGHUP to this script are forwarded to the training process as SIGTERM: it
# writes a checkpoint at a step all processes agree on and exits 0. Rerunning the same command
# on every node resumes from the workdir, which must be shared by all nodes (NFS, Lustre, GCS).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"

usage() {
  cat <<'EOF'
Usage: launch/multinode_gpu.sh --coordinator=HOST:PORT --num_nodes=N --node_rank=R
           [--gpus_per_node=G] [--config=FILE] [--workdir=DIR] [--data_dir=DIR]
           [--python=PYTHON] [--dry-run] [-- MORE bt_jax.main ARGS]

Run on every node of a GPU cluster without SLURM; starts one bt_jax process per node that
uses all the node's GPUs (process_id = node rank, num_processes = N).

  --coordinator HOST:PORT  address of node 0, reachable from every node (required)
  --num_nodes N            number of nodes (required)
  --node_rank R            this node's rank, 0 .. N-1 (required)
  --gpus_per_node G        sets CUDA_VISIBLE_DEVICES=0,..,G-1 (default: leave it alone and
                           use every GPU the process sees)
  --config FILE            bt_jax config (default configs/imagenet.py)
  --workdir DIR            checkpoints and metrics; shared by all nodes (required)
  --data_dir DIR           TFDS data folder, passed as --config.data.data_dir
  --python PYTHON          interpreter (default $PYTHON or python3)
  --dry-run                print the commands and exit without running anything
  -h, --help               this help

Relative paths are relative to the repository root (the script runs from there). Options
take "--opt value" or "--opt=value"; "-" and "_" are interchangeable in their names.
Everything after "--" is passed to python -m bt_jax.main, e.g. -- --config.train.epochs=800
SIGTERM/SIGINT/SIGHUP are forwarded as SIGTERM: checkpoint, exit 0; rerun to resume.
EOF
}

die() {
  echo "multinode_gpu.sh: error: $*" >&2
  echo "Run launch/multinode_gpu.sh --help for usage." >&2
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

wait_for() {  # exit status of PID, waiting again when a trapped signal interrupts `wait`
  local pid=$1 rc again
  while :; do
    if wait "$pid"; then
      return 0
    else
      rc=$?
    fi
    if ((rc > 128)); then
      kill -0 "$pid" 2>/dev/null && continue
      again=0
      wait "$pid" 2>/dev/null || again=$?
      ((again != 127)) && rc=$again
    fi
    return "$rc"
  done
}

coordinator="" num_nodes="" node_rank="" gpus_per_node=""
config="configs/imagenet.py" workdir="" data_dir="" python="${PYTHON:-python3}"
dry_run=0
extra=()
while (($#)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    extra=("$@")
    break
  fi
  name=${arg%%=*}
  name=${name//_/-}
  if [[ $arg == *=* ]]; then
    value=${arg#*=}
    has_value=1
  else
    value=${1-}
    has_value=0
  fi
  case $name in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run)
      dry_run=1
      continue
      ;;
    --coordinator | --num-nodes | --node-rank | --gpus-per-node | --config | --workdir | \
      --data-dir | --python)
      if ((!has_value)); then
        (($#)) || die "$arg needs a value"
        shift
      fi
      ;;
    *) die "unknown option $arg (bt_jax.main arguments go after --)" ;;
  esac
  case $name in
    --coordinator) coordinator=$value ;;
    --num-nodes) num_nodes=$value ;;
    --node-rank) node_rank=$value ;;
    --gpus-per-node) gpus_per_node=$value ;;
    --config) config=$value ;;
    --workdir) workdir=$value ;;
    --data-dir) data_dir=$value ;;
    --python) python=$value ;;
  esac
done

[[ -n $coordinator ]] || die "--coordinator HOST:PORT is required (node 0's address)"
if ! [[ $coordinator =~ ^[^:]+:[0-9]+$ || $coordinator =~ ^\[.+\]:[0-9]+$ ]]; then
  die "--coordinator must be HOST:PORT, got '$coordinator'"
fi
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
if ! is_int "$num_nodes" || ((num_nodes < 1)); then
  die "--num_nodes must be a positive integer, got '$num_nodes'"
fi
if ! is_int "$node_rank" || ((node_rank >= num_nodes)); then
  die "--node_rank must be an integer in 0..$((num_nodes - 1)), got '$node_rank'"
fi
if [[ -n $gpus_per_node ]] && { ! is_int "$gpus_per_node" || ((gpus_per_node < 1)); }; then
  die "--gpus_per_node must be a positive integer, got '$gpus_per_node'"
fi
[[ -n $workdir ]] || die "--workdir is required (a folder every node can read and write)"

cmd=("$python" -m bt_jax.main "--config=$config" "--workdir=$workdir")
[[ -n $data_dir ]] && cmd+=("--config.data.data_dir=$data_dir")
cmd+=(${extra[@]+"${extra[@]}"})
cmd+=("--coordinator_address=$coordinator" "--num_processes=$num_nodes"
  "--process_id=$node_rank")

env_words=()
if [[ -n $gpus_per_node ]]; then
  visible=0
  for ((g = 1; g < gpus_per_node; g++)); do
    visible+=",$g"
  done
  env_words=("CUDA_VISIBLE_DEVICES=$visible")
  devices="$((num_nodes * gpus_per_node)) GPUs ($num_nodes x $gpus_per_node)"
else
  devices="all GPUs visible on each node"
fi

if ((dry_run)); then
  echo "# node $node_rank of $num_nodes: one process per node (process_id = node rank), $devices"
  echo "# coordinator $coordinator (served by process 0, on node 0); SIGTERM -> checkpoint, exit 0"
  qjoin cd "$REPO_DIR"
  qjoin ${env_words[@]+"${env_words[@]}"} "${cmd[@]}"
  exit 0
fi

cd "$REPO_DIR"
if ((${#env_words[@]})); then
  export "${env_words[@]}"
fi
echo "[multinode_gpu] node $node_rank/$num_nodes: $(qjoin "${cmd[@]}")" >&2

# The traps are set before bt_jax starts, so a signal that comes while it starts is
# forwarded as soon as its PID is known, never lost. bt_jax ignores SIGHUP and SIGINT (set
# in its subshell; an ignored signal survives exec): a hang-up or Ctrl-C reaches the whole
# process group, and only this script should act on it (by asking for a checkpoint).
child=""
pending=""
# Invoked by the traps below (SC2329 in shellcheck >= 0.10, SC2317 before).
# shellcheck disable=SC2317,SC2329
forward() {
  if [[ -z $child ]]; then
    pending=$1
    return
  fi
  echo "[multinode_gpu] $1 received: SIGTERM to bt_jax (pid $child), which checkpoints and exits" >&2
  kill -TERM "$child" 2>/dev/null || true
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
trap 'forward SIGHUP' HUP
(
  trap '' HUP INT
  exec "${cmd[@]}"
) &
child=$!
if [[ -n $pending ]]; then
  forward "$pending"
fi

rc=0
wait_for "$child" || rc=$?
echo "[multinode_gpu] node $node_rank: bt_jax exited with $rc" >&2
exit "$rc"
