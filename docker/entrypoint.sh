#!/usr/bin/env bash
# The image's entrypoint (docker/README.md says how to use it): warns about a small /dev/shm, reports the
# PyTorch and GPU stack, starts JupyterLab only behind a token and sshd only for a public key, then becomes
# the given command.
#
# Every path it touches can be moved by an environment variable, so that tests/test_docker.py can run it
# without root and without a container; the defaults are the container's.
set -euo pipefail
# Without this, a failure inside $(...) would not stop the script.
shopt -s inherit_errexit

SHM_DIR=${SHM_DIR:-/dev/shm}
JUPYTER_PORT=${JUPYTER_PORT:-8888}
SSHD_PORT=${SSHD_PORT:-2222}
SSHD_DIR=${SSHD_DIR:-$HOME/.sshd}
SERVICES_FILE=${SERVICES_FILE:-/tmp/container-services}
STARTUP_REPORT=${STARTUP_REPORT:-1}
# A key file that is missing is an error only when the user named it; the default place is optional.
if [[ -v SSH_AUTHORIZED_KEYS_FILE ]]; then
    authorized_keys_named=1
else
    authorized_keys_named=0
    SSH_AUTHORIZED_KEYS_FILE=$HOME/.ssh/authorized_keys
fi

# DataLoader workers hand batches over through /dev/shm; Docker's default of 64 MB fills after a few
# batches and the workers die with "bus error". 1 GiB leaves room for a few workers' prefetched batches.
SHM_MIN_KIB=$((1024 * 1024))
# 24 random bytes, written as 48 hex characters: beyond guessing over the network.
GENERATED_TOKEN_BYTES=24
MIN_TOKEN_CHARS=32

# Everything the entrypoint says goes to stderr, so that the command's stdout stays the command's.
say() { echo "entrypoint: $*" >&2; }
warn() { echo "warning: $*" >&2; }
die() {
    echo "error: $*" >&2
    exit 2
}

check_shared_memory() {
    local shm_kib
    shm_kib=$(df -Pk "$SHM_DIR" 2>/dev/null | awk 'NR == 2 { print $2 }') || true
    if [[ ! $shm_kib =~ ^[0-9]+$ ]]; then
        warn "cannot read the size of $SHM_DIR; PyTorch DataLoader workers need it: run with --shm-size=8g or --ipc=host"
    elif ((shm_kib < SHM_MIN_KIB)); then
        warn "$SHM_DIR is $((shm_kib / 1024)) MiB; PyTorch DataLoader workers pass batches through it and die" \
            "with 'bus error' when it is full: run with --shm-size=8g or --ipc=host"
    fi
}

report_environment() {
    [[ $STARTUP_REPORT == 0 ]] && return 0
    # A missing or broken torch must not stop the container: the user may be about to fix it.
    python3 - >&2 2>/dev/null <<'PY' || say "torch: python3 cannot import it"
import torch

cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
print(f"entrypoint: torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none (CPU-only build)'}, "
      f"cuDNN {cudnn}")
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        print(f"entrypoint: GPU {index}: {properties.name}, {properties.total_memory / 2**30:.1f} GiB")
else:
    print("entrypoint: torch.cuda.is_available() is False")
PY
    if command -v nvidia-smi >/dev/null 2>&1; then
        local gpus
        gpus=$(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1) ||
            warn "nvidia-smi failed"
        say "nvidia-smi (index, name, memory, driver):"
        echo "$gpus" >&2
    else
        say "no NVIDIA driver in the container: start it with --gpus all (needs the NVIDIA Container Toolkit)"
    fi
}

# Sets jupyter_token and jupyter_token_generated, or stops the container. An empty token would make
# Jupyter run without any authentication.
resolve_jupyter_token() {
    jupyter_token_generated=0
    if [[ -v JUPYTER_TOKEN && -v JUPYTER_TOKEN_FILE ]]; then
        die "JUPYTER_TOKEN and JUPYTER_TOKEN_FILE are both set: keep one"
    elif [[ -v JUPYTER_TOKEN ]]; then
        [[ -n $JUPYTER_TOKEN ]] ||
            die "JUPYTER_TOKEN is empty, which would run Jupyter without authentication: set a token, or unset it to have one generated"
        jupyter_token=$JUPYTER_TOKEN
    elif [[ -v JUPYTER_TOKEN_FILE ]]; then
        [[ -f $JUPYTER_TOKEN_FILE && -r $JUPYTER_TOKEN_FILE ]] ||
            die "JUPYTER_TOKEN_FILE=$JUPYTER_TOKEN_FILE is not a readable file: mount it into the container"
        jupyter_token=$(head -n 1 "$JUPYTER_TOKEN_FILE" | tr -d '[:space:]')
        [[ -n $jupyter_token ]] ||
            die "JUPYTER_TOKEN_FILE=$JUPYTER_TOKEN_FILE is empty, which would run Jupyter without authentication: write a token into it"
    else
        jupyter_token=$(od -An -N"$GENERATED_TOKEN_BYTES" -tx1 /dev/urandom | tr -d ' \n')
        ((${#jupyter_token} >= MIN_TOKEN_CHARS)) || die "could not generate a Jupyter token from /dev/urandom"
        jupyter_token_generated=1
    fi
}

# Sets start_jupyter to 1 or 0. START_JUPYTER unset (auto) means: JupyterLab when the image has it and no
# command was given, so that `docker run ... full` opens a notebook and `docker run ... full python ...`
# only trains.
decide_jupyter() {
    local command_given=$1 has_jupyter=0
    command -v jupyter >/dev/null 2>&1 && has_jupyter=1
    case ${START_JUPYTER:-auto} in
        1 | true | yes) start_jupyter=1 ;;
        0 | false | no) start_jupyter=0 ;;
        auto) start_jupyter=$((has_jupyter && !command_given)) ;;
        *) die "START_JUPYTER must be 1, 0 or auto, not '$START_JUPYTER'" ;;
    esac
    if ((start_jupyter && !has_jupyter)); then
        die "START_JUPYTER=$START_JUPYTER but this image has no JupyterLab: use the full or dev image"
    fi
}

# Sets key_sources: "SSH_PUBLIC_KEY" when that variable is set, and the authorized_keys file when it exists.
find_key_sources() {
    key_sources=()
    if [[ -n ${SSH_PUBLIC_KEY:-} ]]; then key_sources+=("SSH_PUBLIC_KEY"); fi
    if [[ -e $SSH_AUTHORIZED_KEYS_FILE ]]; then
        [[ -r $SSH_AUTHORIZED_KEYS_FILE ]] ||
            die "$SSH_AUTHORIZED_KEYS_FILE is not readable by user $(id -u): mount it readable (mode 644)"
        key_sources+=("$SSH_AUTHORIZED_KEYS_FILE")
    elif ((authorized_keys_named)); then
        die "SSH_AUTHORIZED_KEYS_FILE=$SSH_AUTHORIZED_KEYS_FILE does not exist: mount your public key there"
    fi
}

# Copies the keys of every key source into $1, one checked key a line, and prints how many there are. A
# line that is not a public key stops the container: a private key pasted by mistake must not end up in a
# file that sshd reads.
collect_public_keys() {
    local destination=$1 source line probe="$SSHD_DIR/.key-check" count=0
    : >"$destination"
    for source in "${key_sources[@]}"; do
        while IFS= read -r line || [[ -n $line ]]; do
            line=${line%$'\r'}
            [[ -z ${line//[[:space:]]/} || $line == \#* ]] && continue
            [[ $line == *"PRIVATE KEY"* ]] && die "$source holds a private key: give the public one (the .pub file)"
            printf '%s\n' "$line" >"$probe"
            ssh-keygen -l -f "$probe" >/dev/null 2>&1 ||
                die "$source has a line that is not an SSH public key: '${line:0:40}...'"
            printf '%s\n' "$line" >>"$destination"
            count=$((count + 1))
        done < <(if [[ $source == SSH_PUBLIC_KEY ]]; then printf '%s\n' "$SSH_PUBLIC_KEY"; else cat "$source"; fi)
    done
    rm -f "$probe"
    echo "$count"
}

# Writes the sshd configuration and the host key into $SSHD_DIR and sets sshd_command (empty: no sshd).
# Key-only: no passwords, no keyboard-interactive, no root. PAM is off because sshd runs as the image's
# non-root user, which is also the only user such an sshd can let in.
prepare_sshd() {
    local sshd_binary key_count host_key="$SSHD_DIR/ssh_host_ed25519_key" config="$SSHD_DIR/sshd_config"
    sshd_command=()
    find_key_sources
    if ((${#key_sources[@]} == 0)); then
        if command -v sshd >/dev/null 2>&1; then
            say "sshd not started: no public key (mount one at $SSH_AUTHORIZED_KEYS_FILE or set SSH_PUBLIC_KEY)"
        fi
        return 0
    fi
    # sshd re-executes itself for every connection and insists on an absolute path for that.
    sshd_binary=$(command -v sshd) ||
        die "a public key was given but this image has no SSH server: use the full or dev image"
    mkdir -p "$SSHD_DIR"
    chmod 700 "$SSHD_DIR"
    key_count=$(collect_public_keys "$SSHD_DIR/authorized_keys")
    if ((key_count == 0)); then
        say "sshd not started: ${key_sources[*]} holds no key, only blank or comment lines"
        return 0
    fi
    chmod 600 "$SSHD_DIR/authorized_keys"
    # Generated at the first start of each container (or kept in a volume mounted on $SSHD_DIR), never
    # built into the image, where every container made from it would share one.
    if [[ ! -f $host_key ]]; then
        ssh-keygen -q -t ed25519 -N '' -C "container host key" -f "$host_key"
    fi
    cat >"$config" <<CONFIG
# Written by docker/entrypoint.sh at every start; change that script, not this file.
Port $SSHD_PORT
HostKey $host_key
PidFile $SSHD_DIR/sshd.pid
AuthorizedKeysFile $SSHD_DIR/authorized_keys
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
PermitRootLogin no
UsePAM no
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
CONFIG
    "$sshd_binary" -t -f "$config" || die "sshd rejected the configuration in $config (its message is above)"
    say "sshd on port $SSHD_PORT, key-only, $key_count key(s); host key $(ssh-keygen -l -f "$host_key.pub" | awk '{ print $2 }')"
    # -D keeps sshd a child of this process (tini reaps it) and -e sends its log to the container's log.
    sshd_command=("$sshd_binary" -D -e -f "$config")
}

main() {
    local command_given=0
    (($# > 0)) && command_given=1
    check_shared_memory
    report_environment
    # Refused even when Jupyter is not started here: a `jupyter lab` typed as the command would inherit it.
    if [[ -v JUPYTER_TOKEN && -z $JUPYTER_TOKEN ]]; then resolve_jupyter_token; fi
    decide_jupyter "$command_given"
    local -a jupyter_command=()
    if ((start_jupyter)); then
        resolve_jupyter_token
        # port_retries=0: on a busy port Jupyter would move to another one, which -p did not publish.
        jupyter_command=(env -u JUPYTER_TOKEN_FILE "JUPYTER_TOKEN=$jupyter_token" jupyter lab --no-browser
            --ServerApp.ip=0.0.0.0 "--ServerApp.port=$JUPYTER_PORT" --ServerApp.port_retries=0)
        if ((jupyter_token_generated)); then
            say "JupyterLab: http://127.0.0.1:$JUPYTER_PORT/?token=$jupyter_token"
        else
            say "JupyterLab: http://127.0.0.1:$JUPYTER_PORT/?token=<your token>"
        fi
    fi
    prepare_sshd

    # What runs, for the HEALTHCHECK (docker/healthcheck.py): one "name port" line per service.
    : >"$SERVICES_FILE"
    if ((start_jupyter)); then echo "jupyter $JUPYTER_PORT" >>"$SERVICES_FILE"; fi
    if ((${#sshd_command[@]})); then echo "sshd $SSHD_PORT" >>"$SERVICES_FILE"; fi

    # Without a command, a service takes the foreground, so that the container lives as long as it does.
    if ((!command_given)); then
        if ((start_jupyter)); then
            set -- "${jupyter_command[@]}"
            jupyter_command=()
        elif ((${#sshd_command[@]})); then
            set -- "${sshd_command[@]}"
            sshd_command=()
        else
            set -- bash
        fi
    fi
    if ((${#sshd_command[@]})); then "${sshd_command[@]}" & fi
    if ((${#jupyter_command[@]})); then "${jupyter_command[@]}" & fi
    exec "$@"
}

main "$@"
