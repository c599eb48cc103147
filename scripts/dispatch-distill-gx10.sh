#!/usr/bin/env bash
# Dispatch an `apr distill` run to a remote GPU box over ssh and bring its evidence back.
# See docs/dispatch.md for the full guide.

usage() {
    cat <<'EOF'
Usage:
  scripts/dispatch-distill-gx10.sh              dispatch a run (configured by environment)
  scripts/dispatch-distill-gx10.sh fetch NAME   copy run NAME's evidence into EVIDENCE_DIR/NAME/
  scripts/dispatch-distill-gx10.sh --help       this text

A dispatch checks the remote box (reachable, python, GPU, disk, dataset), sends the project at
the local commit (git archive HEAD; uncommitted changes are not sent), installs it into a venv
there, starts `apr distill` under nohup/setsid so it survives a dropped connection, checks that
it is alive, then follows its log until it ends and fetches dispatch.json and launch-victory.txt.

Remote box:
  GX10_HOST        ssh host (default gx10)
  GX10_USER        ssh user (default: ssh's own choice)
  GX10_REPO_PATH   remote project dir; code goes to commits/SHA/ in it (default ~/apr-dispatch)
  GX10_RUN_PREFIX  remote dir holding runs (default GX10_REPO_PATH/runs)
  GX10_PYTHON      remote python whose packages (CUDA torch) the run uses: a system, venv or conda
                   env python; the run's venv is built from it and sees them (default python3)
  GX10_PIP_ARGS    extra words for the remote `pip install` (e.g. --no-deps --no-index)
  GX10_REMOTE_ENV  KEY=VALUE words exported for the run (default HF_HUB_OFFLINE=1)
  GX10_SSH_OPTS    extra words for ssh (e.g. "-p 2222 -i ~/.ssh/gx10")
  GX10_ALIVE_WAIT  seconds the run must stay alive after launch (default 10)
  GX10_MIN_FREE_GB free disk the remote needs under GX10_REPO_PATH (default 10)
  GX10_NPROC       processes (GPUs) for the run; above 1 it runs under torchrun (default 1)

The run (each maps to an `apr distill` option; unset or empty means apr's default):
  TEACHER --teacher   STUDENT --student   DATASET_DIR --dataset (remote path; unset: synthetic)
  STEPS --steps   SEQ_LEN --seq-len   BATCH_SIZE --batch-size   LR --lr
  TEMPERATURE --temperature   ALPHA --alpha
  EXTRA_ARGS       more apr distill options, split on whitespace (e.g. "--device cuda --seed 1")
  RUN_NAME         run dir name (default distill-smoke-YYYYMMDD-HHMMSS, UTC)

This script:
  EVIDENCE_DIR     local dir for fetched evidence (default evidence/ in this repository)
  DETACH=1         return once the run is alive instead of following it (0 or empty: off)
  DRY_RUN=1        print every remote command and run none of them (0 or empty: off)
EOF
}

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAGING_DIRS=()
trap 'rm -rf "${STAGING_DIRS[@]}"' EXIT

die() {
    echo "error: $*" >&2
    exit 1
}

warn() {
    echo "warning: $*" >&2
}

# A value as one word of remote shell syntax. Every value that reaches the remote side goes
# through here (or qpath), so no value can close a quote or start a command there.
q() {
    printf '%q' "$1"
}

# Like q, but a leading ~/ becomes "$HOME"/ on the remote: printf %q would make ~ literal.
qpath() {
    # shellcheck disable=SC2016  # $HOME must reach the remote unexpanded
    local home='"$HOME"' tilde="~"
    case $1 in
        "$tilde") printf '%s' "$home" ;;
        "$tilde"/*) printf '%s/%s' "$home" "$(q "${1#"$tilde"/}")" ;;
        *) q "$1" ;;
    esac
}

is_set() {
    [[ -n ${!1:-} ]]
}

# A switch such as DRY_RUN: on unless unset, empty or 0.
is_on() {
    [[ ${!1:-0} != 0 ]]
}

# Read the environment once; nothing below reads a configuration variable directly.
load_config() {
    HOST=${GX10_HOST:-gx10}
    # Both end up in ssh's destination word: a leading '-' would be read as an option
    # (-oProxyCommand=... runs a command locally), '@' or a space would change the target.
    # Shown %q-quoted, so that the message stays one line whatever the value holds.
    [[ $HOST =~ ^[A-Za-z0-9_][A-Za-z0-9_.:%-]*$ ]] ||
        die "GX10_HOST $(q "$HOST") is not a host name (letters, digits, '.', '-', '_', ':', '%'; the user goes in GX10_USER)"
    [[ -z ${GX10_USER:-} || $GX10_USER =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] ||
        die "GX10_USER $(q "$GX10_USER") is not a user name (letters, digits, '.', '-', '_', not starting with '-' or '.')"
    TARGET=${GX10_USER:+$GX10_USER@}$HOST
    REMOTE_REPO=${GX10_REPO_PATH:-"~/apr-dispatch"}
    RUN_PREFIX=${GX10_RUN_PREFIX:-$REMOTE_REPO/runs}
    REMOTE_PYTHON=${GX10_PYTHON:-python3}
    ALIVE_WAIT=${GX10_ALIVE_WAIT:-10}
    MIN_FREE_GB=${GX10_MIN_FREE_GB:-10}
    NPROC=${GX10_NPROC:-1}
    EVIDENCE=${EVIDENCE_DIR:-$REPO_ROOT/evidence}
    [[ $ALIVE_WAIT =~ ^[0-9]+$ ]] || die "GX10_ALIVE_WAIT must be whole seconds, got '$ALIVE_WAIT'"
    [[ $MIN_FREE_GB =~ ^[0-9]+$ ]] || die "GX10_MIN_FREE_GB must be whole GiB, got '$MIN_FREE_GB'"
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "GX10_NPROC must be a positive whole number, got '$NPROC'"
    # Word lists by design (documented): split on whitespace, no quote processing, no globbing.
    read -ra SSH_OPTS <<<"${GX10_SSH_OPTS:-}"
    read -ra PIP_ARGS <<<"${GX10_PIP_ARGS:-}"
    read -ra EXTRA <<<"${EXTRA_ARGS:-}"
    read -ra REMOTE_ENV <<<"${GX10_REMOTE_ENV-HF_HUB_OFFLINE=1}"
    local pair
    for pair in "${REMOTE_ENV[@]}"; do
        [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "GX10_REMOTE_ENV: '$pair' is not KEY=VALUE"
    done
    # BatchMode: fail instead of waiting for a password; keepalives notice a dead link.
    SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout=15 -o ServerAliveInterval=30 "${SSH_OPTS[@]}")
}

check_run_name() {
    # The name is also a local directory under EVIDENCE_DIR: no slashes, no dot-dot.
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
        die "RUN_NAME '$1' must be letters, digits, '.', '_' or '-' (starting with a letter or digit)"
}

# A remote bash script: strict mode, then the arguments as lines (NAME=QUOTED_VALUE
# assignments), then the body from stdin (a quoted heredoc, so nothing in it expands here).
remote_script() {
    printf '%s\n' "set -euo pipefail" "$@"
    cat
}

# Remote lines that write FILE (a remote shell word) through a quoted heredoc, so the lines
# arrive verbatim. None can end it early: they are built from %q-quoted words.
remote_file() {
    local file=$1
    shift
    printf "cat >%s <<'END_OF_FILE'\n" "$file"
    printf '%s\n' "$@" END_OF_FILE
}

# Run a script on the remote (DRY_RUN: print it). Wrapping it in `bash -c` means the remote
# login shell parses one quoted word only, whatever that shell is. With more arguments, that
# local command's output becomes the script's stdin.
remote() {
    local script=$1
    shift
    if is_on DRY_RUN; then
        printf '[dry-run] %sssh %s bash -c:\n    %s\n' "${*:+$* | }" "$TARGET" \
            "${script//$'\n'/$'\n    '}"
        return 0
    fi
    local command
    command="bash -c $(q "$script")"
    if (($#)); then
        # shellcheck disable=SC2029  # expanding here is the point: the script is quoted
        "$@" | ssh "${SSH_OPTS[@]}" -- "$TARGET" "$command"
    else
        # shellcheck disable=SC2029
        ssh "${SSH_OPTS[@]}" -- "$TARGET" "$command"
    fi
}

# ssh exits 255 for its own failures; anything else came from the remote script.
explain_ssh_failure() {
    local rc=$1 what=$2
    if ((rc == 255)); then
        die "$what: cannot reach $TARGET over ssh (exit 255); check GX10_HOST, GX10_USER, ssh keys"
    fi
    die "$what failed on $TARGET (exit $rc); nothing further was started"
}

# The `apr distill` command as remote shell words: only the variables that are set.
build_apr_command() {
    local venv=$1 out=$2 pair var flag word
    if ((NPROC > 1)); then
        # One process per GPU; --batch-size stays the global batch (docs/distributed.md).
        APR_WORDS=("$venv/bin/python" -m torch.distributed.run --standalone
            "--nproc-per-node=$NPROC" -m apr_cli distill)
    else
        APR_WORDS=("$venv/bin/apr" distill)
    fi
    for pair in TEACHER:--teacher STUDENT:--student STEPS:--steps SEQ_LEN:--seq-len \
        BATCH_SIZE:--batch-size LR:--lr TEMPERATURE:--temperature ALPHA:--alpha; do
        var=${pair%%:*} flag=${pair#*:}
        if is_set "$var"; then
            APR_WORDS+=("$flag" "$(q "${!var}")")
        fi
    done
    if is_set DATASET_DIR; then
        APR_WORDS+=(--dataset "$(qpath "$DATASET_DIR")")
    fi
    for word in "${EXTRA[@]}"; do
        APR_WORDS+=("$(q "$word")")
    done
    APR_WORDS+=(--out "$out")
}

show() {
    if is_set "$1"; then printf '%s' "${!1}"; else printf '(apr default)'; fi
}

preamble() {
    echo "target: $TARGET:$REMOTE_REPO (python: $REMOTE_PYTHON)"
    echo "commit: $COMMIT"
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
        warn "the working tree has uncommitted changes; they are NOT sent (HEAD $COMMIT is)"
    fi
    echo "teacher: $(show TEACHER)"
    echo "student: $(show STUDENT)"
    echo "steps: $(show STEPS)"
    echo "hyperparameters: seq_len=$(show SEQ_LEN) batch_size=$(show BATCH_SIZE) lr=$(show LR)" \
        "temperature=$(show TEMPERATURE) alpha=$(show ALPHA)"
    echo "extra args: ${EXTRA[*]:-(none)}"
    echo "run name: $RUN_NAME -> $RUN_PREFIX/$RUN_NAME"
    if is_set DATASET_DIR; then
        echo "dataset: $DATASET_DIR (real corpus via --dataset)"
    else
        echo "dataset: (synthetic)"
    fi
}

# Everything that can be checked before anything is copied or started.
preflight() {
    echo "== preflight"
    local script dataset=""
    if is_set DATASET_DIR; then
        dataset=$(qpath "$DATASET_DIR")
    fi
    script=$(remote_script "py=$(qpath "$REMOTE_PYTHON")" "repo=$(qpath "$REMOTE_REPO")" \
        "runs=$(qpath "$RUN_PREFIX")" "run=$(qpath "$RUN_PREFIX/$RUN_NAME")" \
        "min_gb=$MIN_FREE_GB" "dataset=${dataset:-''}" <<'REMOTE'
fail() { echo "error: $*" >&2; exit 3; }
command -v "$py" >/dev/null || fail "python $py not found on $(hostname)"
"$py" -c "import sys; sys.exit(sys.version_info < (3, 10))" || fail "$py is older than Python 3.10"
"$py" -m pip --version >/dev/null 2>&1 || fail "$py has no pip (python -m pip); install it for $py"
echo "python: $("$py" -c "import platform, sys; print(platform.python_version(), sys.executable)")"
if gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null) &&
    [ -n "$gpu" ]; then
    echo "gpu: $gpu"
else
    echo "warning: no GPU visible on $(hostname) (nvidia-smi missing or failing);" \
        "apr's --device auto will train on the CPU" >&2
fi
mkdir -p "$repo" "$runs"
free_kb=$(df -Pk "$repo" | awk 'NR == 2 { print $4 }')
echo "disk: $((free_kb / 1048576)) GiB free under $repo"
((free_kb >= min_gb * 1048576)) || fail "less than $min_gb GiB free under $repo (GX10_MIN_FREE_GB)"
[ ! -e "$run" ] || fail "$run already exists; choose another RUN_NAME"
if [ -n "$dataset" ]; then
    [ -d "$dataset" ] ||
        fail "DATASET_DIR $dataset is not a directory on $(hostname); nothing was launched"
    shopt -s nullglob
    shards=("$dataset"/*.bin)
    ((${#shards[@]})) || fail "DATASET_DIR $dataset holds no *.bin shards; nothing was launched"
    echo "dataset: ${#shards[@]} shards, $(du -cshL "${shards[@]}" | tail -n 1 | cut -f 1) in $dataset"
fi
REMOTE
    )
    # The first contact: a wrong host, port, user or key shows here. ssh's stderr is held back so
    # that such a failure is one line carrying ssh's own reason.
    local err rc=0
    err=$(mktemp)
    STAGING_DIRS+=("$err")
    remote "$script" 2>"$err" || rc=$?
    if ((rc == 255)); then
        die "preflight: cannot reach $TARGET over ssh ($(grep -v '^[[:space:]]*$' "$err" |
            tail -n 1 | tr -d '\r')); check GX10_HOST, GX10_USER and GX10_SSH_OPTS (port, key)"
    fi
    cat "$err" >&2
    ((rc == 0)) || explain_ssh_failure "$rc" "preflight"
}

# Unpack `git archive` into commits/SHA. It is renamed into place only once tar has succeeded
# and never changes afterwards, so a run in progress keeps the code it started with.
sync_project() {
    echo "== sync $COMMIT"
    local script
    script=$(remote_script "dest=$(qpath "$REMOTE_REPO/commits/$COMMIT")" <<'REMOTE'
if [ -d "$dest" ]; then
    cat >/dev/null
    echo "already there: $dest"
    exit 0
fi
partial="$dest.partial-$$"
mkdir -p "$partial"
tar -x -C "$partial"
mv -T "$partial" "$dest" 2>/dev/null || rm -rf "$partial"
echo "unpacked: $dest"
REMOTE
    )
    remote "$script" git -C "$REPO_ROOT" archive --format=tar "$COMMIT" ||
        explain_ssh_failure $? "sync"
}

# A venv per commit that sees every package of GX10_PYTHON (system, venv or conda env), so the
# box's own CUDA torch is used instead of whatever pip would fetch. A marker file records a
# finished install.
install_project() {
    echo "== install"
    local script word pip_words=()
    for word in "${PIP_ARGS[@]}"; do
        pip_words+=("$(q "$word")")
    done
    script=$(remote_script "py=$(qpath "$REMOTE_PYTHON")" \
        "dest=$(qpath "$REMOTE_REPO/commits/$COMMIT")" "pip_args=(${pip_words[*]})" <<'REMOTE'
if [ -f "$dest/.venv/.apr-installed" ]; then
    echo "already installed: $dest/.venv"
    exit 0
fi
"$py" -m venv --clear --without-pip --system-site-packages "$dest/.venv"
# --system-site-packages reaches only the base interpreter's packages. When $py is a venv's or a
# conda env's python, that environment (its CUDA torch) is what the run should use: list its
# site-packages in a .pth file. They come after the venv's own, so the synced apr wins. The venv
# gets no pip of its own: $py's pip and setuptools (newer than a venv's bundled ones) do the
# install, into this venv.
site_dir=$("$dest/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$py" -c "import site; print(*site.getsitepackages(), sep='\n')" >"$site_dir/_apr_base_env.pth"
"$dest/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    ${pip_args[@]+"${pip_args[@]}"} "$dest"
"$dest/.venv/bin/python" - <<'PY'
import apr_cli, torch

cuda = "CUDA available" if torch.cuda.is_available() else "no CUDA"
print(f"installed: apr {apr_cli.__version__} with torch {torch.__version__} ({cuda})")
PY
touch "$dest/.venv/.apr-installed"
REMOTE
    )
    remote "$script" || explain_ssh_failure $? "install"
}

# Start the run in its own session (it survives the ssh connection), then watch it for up to
# ALIVE_WAIT seconds: a run that dies that early is a setup error worth showing right away.
launch_run() {
    echo "== launch"
    local run venv script word lines=()
    run=$(qpath "$RUN_PREFIX/$RUN_NAME")
    venv=$(qpath "$REMOTE_REPO/commits/$COMMIT/.venv")
    build_apr_command "$venv" "$run"
    # launch.sh, kept in the run dir, is the exact command; it records its own exit code.
    # The trap keeps this shell alive through a SIGINT to the process group, so that it still
    # records apr's exit code after apr has marked its manifest interrupted.
    lines+=("#!/usr/bin/env bash" "# Written by dispatch-distill-gx10.sh: $RUN_NAME at $COMMIT"
        "trap : INT")
    for word in "${REMOTE_ENV[@]}"; do
        lines+=("export ${word%%=*}=$(q "${word#*=}")")
    done
    lines+=("${APR_WORDS[*]}" "echo \$? >$run/launch.exit")
    local origin="{\"dispatched_at\": \"$DISPATCHED_AT\", \"dispatched_commit\": \"$COMMIT\"}"
    script=$(remote_script "run=$run" "alive_wait=$ALIVE_WAIT" "mkdir -p \"\$run\"" \
        "$(remote_file "\"\$run/launch.sh\"" "${lines[@]}")" \
        "$(remote_file "\"\$run/launch.json\"" "$origin")" <<'REMOTE'
# A background job of a non-interactive shell starts with SIGINT ignored, and so would apr:
# restore it so that `kill -INT` stops the run cleanly.
nohup setsid env --default-signal=INT bash "$run/launch.sh" >"$run/launch.log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$run/launch.pid"
for ((i = 0; i < alive_wait; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
done
if kill -0 "$pid" 2>/dev/null && [ ! -e "$run/launch.exit" ]; then
    echo "alive after ${alive_wait}s: pid $pid (stop it with: kill -INT -- -$pid)"
    exit 0
fi
wait "$pid" 2>/dev/null || true
code=$(cat "$run/launch.exit" 2>/dev/null || echo unknown)
if [ "$code" = 0 ]; then
    echo "finished already (exit 0)"
    exit 0
fi
echo "error: the run exited early (exit $code); last lines of $run/launch.log:" >&2
tail -n 40 "$run/launch.log" >&2
exit 4
REMOTE
    )
    remote "$script" || explain_ssh_failure $? "launch"
}

# Print the log from its start until the run's process ends; exit with the run's exit code.
follow_run() {
    echo "== follow (Ctrl-C stops following; the run goes on)"
    local script rc=0
    script=$(remote_script "run=$(qpath "$RUN_PREFIX/$RUN_NAME")" <<'REMOTE'
tail -n +1 -F --pid="$(cat "$run/launch.pid")" "$run/launch.log" 2>/dev/null || true
code=$(cat "$run/launch.exit" 2>/dev/null || echo none)
if [[ ! $code =~ ^[0-9]+$ ]]; then
    echo "error: the run left no exit code in $run/launch.exit" >&2
    exit 1
fi
exit "$code"
REMOTE
    )
    trap 'echo; echo "stopped following; fetch later with: $0 fetch $RUN_NAME"; exit 130' INT
    remote "$script" || rc=$?
    trap - INT
    ((rc != 0)) || return 0
    # A non-zero exit is the run's exit code, or the follow connection failing (a dropped link,
    # a killed ssh: exit 255 or a signal's 128+N, which a run can also exit with). Ask the box.
    local state
    script=$(remote_script "run=$(qpath "$RUN_PREFIX/$RUN_NAME")" <<'REMOTE'
if [ -f "$run/launch.exit" ]; then
    cat "$run/launch.exit"
elif kill -0 "$(cat "$run/launch.pid")" 2>/dev/null; then
    echo running
else
    echo gone
fi
REMOTE
    )
    state=$(remote "$script") || state=unreachable
    case $state in
        running | unreachable)
            warn "lost the connection to $TARGET (ssh exit $rc); the run goes on there:" \
                "$0 fetch $RUN_NAME later"
            exit 255
            ;;
        gone) return 1 ;; # killed without recording an exit code; the follow said so
        *) return "$state" ;;
    esac
}

# Copy dispatch.json and launch-victory.txt into EVIDENCE/NAME/ and record in the manifest where
# and when the run was dispatched. ssh + tar, so one quoting rule covers every remote path.
fetch_evidence() {
    local name=$1 run dest staging script abs
    check_run_name "$name"
    run=$(qpath "$RUN_PREFIX/$name")
    dest=$EVIDENCE/$name
    echo "== fetch $name -> $dest"
    script=$(remote_script "run=$run" <<'REMOTE'
if [ ! -f "$run/dispatch.json" ]; then
    echo "error: no dispatch.json in $run (did the run start?)" >&2
    if [ -f "$run/launch.log" ]; then tail -n 20 "$run/launch.log" >&2; fi
    exit 3
fi
cd "$run"
pwd -P
REMOTE
    )
    abs=$(remote "$script") || explain_ssh_failure $? "fetch"
    script=$(remote_script "run=$run" <<'REMOTE'
cd "$run"
files=(dispatch.json)
for f in launch-victory.txt launch.json; do
    if [ -f "$f" ]; then files+=("$f"); fi
done
tar -c -f - "${files[@]}"
REMOTE
    )
    if is_on DRY_RUN; then
        echo "$abs"
        remote "$script"
        echo "[dry-run] tar -x into $dest; add remote_host, remote_run_dir, dispatched_at"
        return 0
    fi
    staging=$(mktemp -d)
    STAGING_DIRS+=("$staging")
    remote "$script" | tar -x -C "$staging" || explain_ssh_failure $? "fetch"
    mkdir -p "$dest"
    python3 - "$staging" "$dest" "$HOST" "$abs" <<'PY'
import json
import os
import sys

staging, dest, host, run_dir = sys.argv[1:]
with open(os.path.join(staging, "dispatch.json")) as f:
    manifest = json.load(f)
launch = {}
if os.path.exists(os.path.join(staging, "launch.json")):
    with open(os.path.join(staging, "launch.json")) as f:
        launch = json.load(f)
manifest.update(
    remote_host=host,
    remote_run_dir=run_dir,
    dispatched_at=launch.get("dispatched_at"),
    dispatched_commit=launch.get("dispatched_commit"),
)
tmp = os.path.join(dest, "dispatch.json.tmp")
with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
os.replace(tmp, os.path.join(dest, "dispatch.json"))
print(f"manifest: status {manifest.get('status')}")
PY
    if [[ -f $staging/launch-victory.txt ]]; then
        cp "$staging/launch-victory.txt" "$dest/launch-victory.txt"
    fi
    echo "evidence: $dest"
}

dispatch() {
    RUN_NAME=${RUN_NAME:-distill-smoke-$(date -u +%Y%m%d-%H%M%S)}
    check_run_name "$RUN_NAME"
    COMMIT=$(git -C "$REPO_ROOT" rev-parse HEAD) || die "not a git checkout: $REPO_ROOT"
    DISPATCHED_AT=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
    preamble
    preflight
    sync_project
    install_project
    launch_run
    if is_on DETACH; then
        echo "detached: $RUN_PREFIX/$RUN_NAME on $TARGET"
        echo "follow: ssh $TARGET tail -f $RUN_PREFIX/$RUN_NAME/launch.log"
        echo "fetch:  $0 fetch $RUN_NAME"
        return 0
    fi
    local rc=0
    follow_run || rc=$?
    fetch_evidence "$RUN_NAME"
    return "$rc"
}

main() {
    case ${1:-} in
        -h | --help | help)
            usage
            ;;
        fetch)
            [[ $# -eq 2 ]] || die "usage: $0 fetch RUN_NAME"
            load_config
            fetch_evidence "$2"
            ;;
        "")
            load_config
            dispatch
            ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
