#!/usr/bin/env bash
# The image's entrypoint (docker/README.md says how to use it): warns about a small /dev/shm, reports the
# PyTorch and GPU stack, starts JupyterLab only behind a token (and checks that Jupyter refuses requests
# without it) and sshd only for a public key, then runs the given command. With no service it becomes the
# command (exec); with services it stays their parent: it passes docker stop's SIGTERM on to every one of
# them, reaps them, and ends with the command's status once it has stopped them.
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
JUPYTER_START_TIMEOUT=${JUPYTER_START_TIMEOUT:-120}
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
# 24 random bytes, written as 48 hex characters: beyond guessing over the network. A chosen token must be
# as long as 16 such bytes (32 hex characters), so that `JUPYTER_TOKEN=a` cannot be the only lock on a
# server that runs any code it is sent.
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
# Jupyter run without any authentication, a short one would be guessed.
resolve_jupyter_token() {
    local source
    jupyter_token_generated=0
    if [[ -v JUPYTER_TOKEN && -v JUPYTER_TOKEN_FILE ]]; then
        die "JUPYTER_TOKEN and JUPYTER_TOKEN_FILE are both set: keep one"
    elif [[ -v JUPYTER_TOKEN ]]; then
        [[ -n $JUPYTER_TOKEN ]] ||
            die "JUPYTER_TOKEN is empty, which would run Jupyter without authentication: set a token, or unset it to have one generated"
        jupyter_token=$JUPYTER_TOKEN
        source=JUPYTER_TOKEN
    elif [[ -v JUPYTER_TOKEN_FILE ]]; then
        [[ -f $JUPYTER_TOKEN_FILE && -r $JUPYTER_TOKEN_FILE ]] ||
            die "JUPYTER_TOKEN_FILE=$JUPYTER_TOKEN_FILE is not a readable file: mount it into the container"
        jupyter_token=$(head -n 1 "$JUPYTER_TOKEN_FILE" | tr -d '[:space:]')
        [[ -n $jupyter_token ]] ||
            die "JUPYTER_TOKEN_FILE=$JUPYTER_TOKEN_FILE is empty, which would run Jupyter without authentication: write a token into it"
        source="the token in JUPYTER_TOKEN_FILE"
    else
        jupyter_token=$(od -An -N"$GENERATED_TOKEN_BYTES" -tx1 /dev/urandom | tr -d ' \n')
        ((${#jupyter_token} >= MIN_TOKEN_CHARS)) || die "could not generate a Jupyter token from /dev/urandom"
        jupyter_token_generated=1
        return 0
    fi
    ((${#jupyter_token} >= MIN_TOKEN_CHARS)) ||
        die "$source has ${#jupyter_token} characters; a chosen token needs at least $MIN_TOKEN_CHARS" \
            "(python3 -c 'import secrets; print(secrets.token_hex(24))' makes one), or unset it to have one generated"
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

# Writes what an SSH session starts with into $runtime_dir: the entrypoint's environment (the image's PATH
# with its virtual environment, the -e settings of docker run) and a wrapper that sshd runs for every
# session (ForceCommand), which loads it and starts in the entrypoint's working directory (/workspace), as
# `docker exec` would. Without it a session gets sshd's default PATH, the system python3 without torch and
# the home folder. The file is not in $SSHD_DIR, which may be a volume that outlives the container.
prepare_ssh_session() {
    local environment="$runtime_dir/ssh-environment" name
    ssh_session="$runtime_dir/ssh-session"
    # Per-session variables stay sshd's; the Jupyter token is not for every shell.
    {
        while IFS= read -r name; do
            case $name in
                HOME | USER | LOGNAME | SHELL | MAIL | TERM | PWD | OLDPWD | SHLVL | _ | SSH_* | JUPYTER_TOKEN) ;;
                BASHOPTS | SHELLOPTS) ;; # read-only in the session's bash
                *) declare -p "$name" ;;
            esac
        done < <(compgen -e)
    } >"$environment"
    # `declare -p` at the top of a sourced file, not in a function, makes global variables; -x keeps them
    # exported.
    cat >"$ssh_session" <<SESSION
#!/usr/bin/env bash
# Written by docker/entrypoint.sh at every start; sshd runs it for every session (ForceCommand).
. $(printf '%q' "$environment")
cd $(printf '%q' "$PWD") 2>/dev/null || cd
if [[ -v SSH_ORIGINAL_COMMAND ]]; then
    exec "\${SHELL:-/bin/bash}" -c "\$SSH_ORIGINAL_COMMAND"
fi
# Interactive: ~/.bashrc as in \`docker exec -it ... bash\`; a login shell would read /etc/profile, which on
# some distributions resets PATH.
exec "\${SHELL:-/bin/bash}" -i
SESSION
    chmod 700 "$ssh_session"
}

# Writes the sshd configuration and the host key into $SSHD_DIR and sets sshd_command (empty: no sshd).
# Key-only: no passwords, no keyboard-interactive, no root. PAM is off because sshd runs as the image's
# non-root user, which is also the only user such an sshd can let in.
prepare_sshd() {
    local sshd_binary key_count host_key="$SSHD_DIR/ssh_host_ed25519_key" config="$SSHD_DIR/sshd_config"
    local sftp_server
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
    prepare_ssh_session
    # The session wrapper runs sftp-server itself; internal-sftp, sshd's built-in one, is no command it
    # could run.
    sftp_server=
    for candidate in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server; do
        if [[ -x $candidate ]]; then
            sftp_server=$candidate
            break
        fi
    done
    # Forwarding: -L to the container's own loopback only, which is how TensorBoard (no authentication of
    # its own, so it listens on 127.0.0.1) and Jupyter are reached through the tunnel; no -R, which would open
    # listening ports in the container, no jump to other hosts of the container's network, and no agent:
    # a forwarded agent lets every process of this user (notebook code, a Jupyter terminal, a dependency)
    # sign in with the laptop's keys wherever they are accepted for as long as the session lasts.
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
PermitUserEnvironment no
AllowAgentForwarding no
AllowTcpForwarding local
PermitOpen localhost:* 127.0.0.1:* [::1]:*
AllowStreamLocalForwarding no
GatewayPorts no
PermitTunnel no
X11Forwarding no
PrintMotd no
ForceCommand $(printf '%q' "$ssh_session")
${sftp_server:+Subsystem sftp $sftp_server}
CONFIG
    "$sshd_binary" -t -f "$config" || die "sshd rejected the configuration in $config (its message is above)"
    say "sshd on port $SSHD_PORT, key-only, $key_count key(s); host key $(ssh-keygen -l -f "$host_key.pub" | awk '{ print $2 }')"
    # -D keeps sshd a child of this process (which reaps it and stops it) and -e sends its log to the
    # container's log.
    sshd_command=("$sshd_binary" -D -e -f "$config")
}

# Writes the Jupyter configuration file that the entrypoint gives with --config and sets jupyter_command.
# Jupyter reads that file after every other configuration file (~/.jupyter, a mounted home, /etc/jupyter,
# the environment's), so no other file can set the token; the token itself stays in the environment, not
# in an argument, where every user of the machine would see it in ps. IdentityProvider.token, not the
# deprecated ServerApp.token: Jupyter ignores ServerApp.token once IdentityProvider.token is set.
prepare_jupyter() {
    local config="$runtime_dir/jupyter_token_config.py"
    cat >"$config" <<'CONFIG'
# Written by docker/entrypoint.sh at every start; change that script, not this file.
import os

c.IdentityProvider.token = os.environ["JUPYTER_TOKEN"]
CONFIG
    # port_retries=0: on a busy port Jupyter would move to another one, which -p did not publish.
    jupyter_command=(env -u JUPYTER_TOKEN_FILE "JUPYTER_TOKEN=$jupyter_token" jupyter lab --no-browser
        "--config=$config" --ServerApp.ip=0.0.0.0 "--ServerApp.port=$JUPYTER_PORT" --ServerApp.port_retries=0)
}

# Prints the HTTP status of a GET of $1 from Jupyter, with the token when $2 is 1; fails when nothing answers
# on the port. Bash's /dev/tcp, so that the check needs no curl and no Python in the image, and the token
# goes into the request, not into a process's arguments.
jupyter_http_status() {
    local path=$1 with_token=$2
    (
        exec 3<>"/dev/tcp/127.0.0.1/$JUPYTER_PORT" || exit 1
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n' "$path" "$JUPYTER_PORT" >&3
        if ((with_token)); then printf 'Authorization: token %s\r\n' "$jupyter_token" >&3; fi
        printf '\r\n' >&3
        IFS=' ' read -r -t 10 _ status _ <&3 || exit 1
        echo "$status"
    ) 2>/dev/null
}

# Waits until Jupyter answers, then checks that it refuses the API without the token and serves it with the
# token. A Jupyter configuration the entrypoint does not control (a custom identity provider or authorizer,
# say) could still switch authentication off; then the container stops instead of serving every visitor a
# shell. Returns 1 when Jupyter exited before it answered (its own error is above).
check_jupyter_authentication() {
    local pid=$1 deadline=$((SECONDS + JUPYTER_START_TIMEOUT)) without with
    until without=$(jupyter_http_status /api/kernels 0); do
        kill -0 "$pid" 2>/dev/null || return 1
        ((SECONDS < deadline)) || stop_and_die "JupyterLab did not answer on port $JUPYTER_PORT within $JUPYTER_START_TIMEOUT s"
        sleep 0.2
    done
    if [[ $without != 401 && $without != 403 ]]; then
        stop_and_die "JupyterLab answered a request without the token with HTTP $without: a Jupyter configuration" \
            "file (~/.jupyter, /etc/jupyter or the environment's etc/jupyter) switches authentication off; remove that setting"
    fi
    with=$(jupyter_http_status /api/kernels 1) || with="no answer"
    [[ $with == 200 ]] ||
        stop_and_die "JupyterLab refused its own token (HTTP $with): a Jupyter configuration file replaces how it authenticates"
}

# Signals that stop the container reach every child; the others (Ctrl-C, SLURM's and schedulers' USR1, ...)
# are meant for the command alone: sshd and Jupyter would die of USR1, and sshd re-reads its configuration
# on HUP.
# shellcheck disable=SC2329  # called by the traps that main sets
on_signal() {
    local signal=$1 pid
    got_signal=1
    if [[ $signal == TERM ]]; then
        for pid in "${!children[@]}"; do kill -s TERM "$pid" 2>/dev/null || true; done
    else
        kill -s "$signal" "$foreground" 2>/dev/null || true
    fi
}

# Starts $@ in the background as a child named $name, sets last_child. Services get a session of their own
# (setsid), so that the terminal's Ctrl-C and hangup of `docker run -it` reach only the command. A
# background command would start with SIGINT and SIGQUIT ignored and stdin on /dev/null, as bash does
# without job control; env --default-signal and <&0 undo both, so Ctrl-C still stops python and an
# interactive command still reads the terminal.
start_child() {
    local name=$1 kind=$2
    shift 2
    if [[ $kind == service ]]; then
        setsid "$@" &
    else
        env --default-signal=INT,QUIT "$@" <&0 &
    fi
    last_child=$!
    children[$last_child]=$name
}

stop_children() {
    local pid
    for pid in "${!children[@]}"; do kill -s TERM "$pid" 2>/dev/null || true; done
    for pid in "${!children[@]}"; do
        wait "$pid" 2>/dev/null || true
        unset "children[$pid]"
    done
}

stop_and_die() {
    stop_children
    die "$@"
}

# Waits for the foreground child (the command, or the service that stands in for it), then stops the
# others and ends with its status. A service that dies meanwhile is reaped by bash at once (no zombie); the
# HEALTHCHECK reports it. docker stop's SIGTERM reaches every child through on_signal, and the command's
# own way of stopping decides how long that takes: train.py saves a checkpoint and exits 75.
supervise() {
    local status
    while true; do
        got_signal=0
        if wait "$foreground"; then status=0; else status=$?; fi
        ((got_signal)) || break
        # wait was cut short by a signal: the foreground may still run, or have ended meanwhile, in which
        # case bash kept its status for the next wait.
        if ! kill -0 "$foreground" 2>/dev/null; then
            if wait "$foreground" 2>/dev/null; then status=0; else
                local again=$?
                ((again == 127)) || status=$again
            fi
            break
        fi
    done
    unset "children[$foreground]"
    stop_children
    exit "$status"
}

main() {
    local command_given=0
    (($# > 0)) && command_given=1
    check_shared_memory
    report_environment
    # Refused even when Jupyter is not started here: a `jupyter lab` typed as the command would inherit it.
    if [[ -v JUPYTER_TOKEN && -z $JUPYTER_TOKEN ]]; then resolve_jupyter_token; fi
    decide_jupyter "$command_given"
    # Private: what the services are started with (the Jupyter configuration, the SSH sessions' environment).
    runtime_dir=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/entrypoint.XXXXXX")
    jupyter_command=()
    if ((start_jupyter)); then
        resolve_jupyter_token
        prepare_jupyter
    fi
    prepare_sshd

    # What runs, for the HEALTHCHECK (docker/healthcheck.py): one "name port" line per service, and the
    # token for Jupyter's, which the healthcheck sends; hence readable by this user only.
    (umask 077 && : >"$SERVICES_FILE")
    if ((start_jupyter)); then echo "jupyter $JUPYTER_PORT $jupyter_token" >>"$SERVICES_FILE"; fi
    if ((${#sshd_command[@]})); then echo "sshd $SSHD_PORT" >>"$SERVICES_FILE"; fi

    if ((!start_jupyter && ${#sshd_command[@]} == 0)); then
        rm -rf "$runtime_dir"
        # Nothing to look after: the command (or a shell) becomes the process tini watches and signals.
        (($#)) || set -- bash
        exec "$@"
    fi

    declare -gA children=()
    got_signal=0
    local signal
    for signal in TERM INT HUP QUIT USR1 USR2; do
        # shellcheck disable=SC2064  # the signal's name is fixed now, on purpose
        trap "on_signal $signal" "$signal"
    done
    foreground=
    if ((${#sshd_command[@]})); then
        start_child sshd service "${sshd_command[@]}"
        foreground=$last_child
    fi
    if ((start_jupyter)); then
        start_child jupyter service "${jupyter_command[@]}"
        foreground=$last_child
        if ! check_jupyter_authentication "$last_child"; then
            # Stopped by docker stop while starting: end as Jupyter ended.
            ((got_signal)) || stop_and_die "JupyterLab exited before it answered on port $JUPYTER_PORT (its messages are above)"
            supervise
        fi
        if ((jupyter_token_generated)); then
            say "JupyterLab: http://127.0.0.1:$JUPYTER_PORT/?token=$jupyter_token"
        else
            say "JupyterLab: http://127.0.0.1:$JUPYTER_PORT/?token=<your token>"
        fi
    fi
    # Without a command, a service stands in for it (Jupyter when there is one), so that the container
    # lives as long as that service does.
    if ((command_given)); then
        start_child command command "$@"
        foreground=$last_child
    fi
    supervise
}

main "$@"
