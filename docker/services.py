"""JupyterLab and sshd for the full and dev images, started by docker/entrypoint.sh (docker/README.md, "JupyterLab
and SSH", says how to use them; the settings are the environment variables read in main()).

JupyterLab starts only behind a token, and only once it has refused a request without the token; sshd starts
only for a public key, key-only. Then the command runs. This process stays the parent of all of them: it
passes docker stop's SIGTERM on to each (other signals to the command alone), reaps a service that dies (the
HEALTHCHECK reports it), and ends with the command's status once it has stopped the services. With no
service to run it becomes the command.

Standard library only, run by the system Python. tests/test_docker.py calls its functions; the container
tests of tests/test_docker_image.py run it in the image.
"""
import http.client
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

GENERATED_TOKEN_BYTES = 24  # 48 hex characters: beyond guessing over the network
# A chosen token must be as long as 16 such bytes, so that JUPYTER_TOKEN=a cannot be the only lock on a server
# that runs any code it is sent.
MIN_TOKEN_CHARS = 32
# What sshd sets for each session itself, and the Jupyter token, which is not for every shell.
NOT_FOR_SSH_SESSIONS = {"HOME", "USER", "LOGNAME", "SHELL", "MAIL", "TERM", "PWD", "OLDPWD", "SHLVL", "_",
                        "JUPYTER_TOKEN"}


class Refused(Exception):
    """A setting under which a service would be unsafe or cannot work: one `error:` line, exit status 2."""


def say(message):
    print(f"entrypoint: {message}", file=sys.stderr, flush=True)


def jupyter_token(environ):
    """(token, generated): JUPYTER_TOKEN, the first line of JUPYTER_TOKEN_FILE, or a new random one. An empty
    token would run Jupyter without authentication, a short one could be guessed."""
    if "JUPYTER_TOKEN" in environ and "JUPYTER_TOKEN_FILE" in environ:
        raise Refused("JUPYTER_TOKEN and JUPYTER_TOKEN_FILE are both set: keep one")
    if "JUPYTER_TOKEN" in environ:
        token, source = environ["JUPYTER_TOKEN"], "JUPYTER_TOKEN"
    elif "JUPYTER_TOKEN_FILE" in environ:
        path, source = environ["JUPYTER_TOKEN_FILE"], "the token in JUPYTER_TOKEN_FILE"
        try:
            with open(path) as file:
                token = file.readline().strip()
        except OSError:
            raise Refused(f"JUPYTER_TOKEN_FILE={path} is not a readable file: mount it into the container") from None
    else:
        return secrets.token_hex(GENERATED_TOKEN_BYTES), True
    if not token:
        raise Refused(f"{source} is empty, which would run Jupyter without authentication: set a token, or unset "
                      "it to have one generated")
    if len(token) < MIN_TOKEN_CHARS:
        raise Refused(f"{source} has {len(token)} characters; a chosen token needs at least {MIN_TOKEN_CHARS} "
                      "(python3 -c 'import secrets; print(secrets.token_hex(24))' makes one), or unset it to have "
                      "one generated")
    return token, False


def wants_jupyter(start_jupyter, command_given, has_jupyter):
    """START_JUPYTER: 1 starts JupyterLab (in the background when there is a command), 0 never; auto (unset)
    only without a command, so that `docker run ... full` opens a notebook and `... full python ...` trains."""
    choices = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False,
               "auto": has_jupyter and not command_given}
    if start_jupyter not in choices:
        raise Refused(f"START_JUPYTER must be 1, 0 or auto, not '{start_jupyter}'")
    if choices[start_jupyter] and not has_jupyter:
        raise Refused(f"START_JUPYTER={start_jupyter} but this image has no JupyterLab: use the full or dev image")
    return choices[start_jupyter]


def public_keys(ssh_public_key, keys_file, keys_file_named):
    """The public keys of SSH_PUBLIC_KEY and of the mounted keys file, each checked by ssh-keygen. A line that
    is not a public key stops the container: a private key pasted by mistake must not land in a file sshd reads."""
    sources = [("SSH_PUBLIC_KEY", ssh_public_key)] if ssh_public_key else []
    if os.path.exists(keys_file):
        try:
            with open(keys_file) as file:
                sources.append((keys_file, file.read()))
        except OSError:
            raise Refused(f"{keys_file} is not readable by user {os.getuid()}: mount it readable (mode 644)") from None
    elif keys_file_named:
        raise Refused(f"SSH_AUTHORIZED_KEYS_FILE={keys_file} does not exist: mount your public key there")
    keys = []
    for source, text in sources:
        if "PRIVATE KEY" in text:
            raise Refused(f"{source} holds a private key: give the public one (the .pub file)")
        for line in (line.strip() for line in text.splitlines()):
            if line and not line.startswith("#"):
                checked = subprocess.run(["ssh-keygen", "-l", "-f", "/dev/stdin"], input=line, text=True,
                                         capture_output=True)
                if checked.returncode != 0:
                    raise Refused(f"{source} has a line that is not an SSH public key: '{line[:40]}...'")
                keys.append(line)
    return keys


def write_ssh_session(runtime_dir, environ, workdir):
    """The script sshd runs for every session (ForceCommand): the container's environment (the image's PATH
    with torch's Python, the -e settings of docker run) and its working directory, as `docker exec` has them;
    sshd alone would give its default PATH, the system Python without torch, and the home folder."""
    environment = os.path.join(runtime_dir, "ssh-environment")
    with open(environment, "w") as file:
        for name, value in sorted(environ.items()):
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in NOT_FOR_SSH_SESSIONS \
                    and not name.startswith("SSH_"):
                file.write(f"export {name}={shlex.quote(value)}\n")
    session = os.path.join(runtime_dir, "ssh-session")
    with open(session, "w") as file:
        file.write(f"""#!/bin/sh
# Written by docker/services.py at every start; sshd runs it for every session.
. {shlex.quote(environment)}
cd {shlex.quote(workdir)} 2>/dev/null || cd
if [ -n "${{SSH_ORIGINAL_COMMAND+set}}" ]; then exec "${{SHELL:-/bin/bash}}" -c "$SSH_ORIGINAL_COMMAND"; fi
exec "${{SHELL:-/bin/bash}}" -i
""")
    os.chmod(session, 0o700)
    return session


def write_sshd_config(sshd_dir, port, session, keys):
    """The keys, the host key (made at the container's first start, or kept in a volume on sshd_dir; never in
    the image, where every container would share it) and the configuration; returns the configuration's path.
    Key-only: no passwords, no root. PAM is off because sshd runs as the image's user, the only one it can let
    in. Forwarding: -L to the container's loopback only (the TensorBoard and Jupyter tunnels); no -R, which
    would open ports in the container, no jumps to other hosts, and no agent, which would let every process of
    this user sign in with the laptop's keys wherever they are accepted."""
    os.makedirs(sshd_dir, mode=0o700, exist_ok=True)
    os.chmod(sshd_dir, 0o700)
    authorized_keys = os.path.join(sshd_dir, "authorized_keys")
    host_key = os.path.join(sshd_dir, "ssh_host_ed25519_key")
    with open(os.open(authorized_keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write("".join(f"{key}\n" for key in keys))
    if not os.path.exists(host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "container host key", "-f", host_key],
                       check=True)
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server") if os.path.exists(p)),
                None)
    config = os.path.join(sshd_dir, "sshd_config")
    with open(config, "w") as file:
        file.write(f"""# Written by docker/services.py at every start; change that script, not this file.
Port {port}
HostKey {host_key}
PidFile {sshd_dir}/sshd.pid
AuthorizedKeysFile {authorized_keys}
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
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
ForceCommand {session}
{f"Subsystem sftp {sftp}" if sftp else ""}
""")
    return config


def http_status(port, path, token=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"token {token}"} if token else {})
        return connection.getresponse().status
    finally:
        connection.close()


def check_jupyter_authentication(port, token, jupyter_exited, timeout_s):
    """Waits for Jupyter to answer, then requires a refusal without the token and an answer with it. A
    configuration this file does not control (a mounted ~/.jupyter with its own identity provider, say) could
    still switch authentication off; then the container stops instead of serving every visitor a shell.
    Returns False when Jupyter exited before it answered."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            without = http_status(port, "/api/kernels")
            break
        except OSError:
            if jupyter_exited():
                return False
            if time.monotonic() > deadline:
                raise Refused(f"JupyterLab did not answer on port {port} within {timeout_s} s")
            time.sleep(0.2)
    if without not in (401, 403):
        raise Refused(f"JupyterLab answered a request without the token with HTTP {without}: a Jupyter "
                      "configuration file (~/.jupyter, /etc/jupyter or the environment's etc/jupyter) switches "
                      "authentication off; remove that setting")
    with_token = http_status(port, "/api/kernels", token)
    if with_token != 200:
        raise Refused(f"JupyterLab refused its own token (HTTP {with_token}): a Jupyter configuration file "
                      "replaces how it authenticates")
    return True


class Children:
    """The services and the command, as started. The foreground is the one whose end ends the container: the
    command, or without one the service that stands in for it. Reaped with os.waitpid only, never through
    Popen, so that a service that dies while the foreground runs is reaped at once (no zombie)."""

    def __init__(self):
        self.running, self.foreground, self.stopping = {}, None, False

    def start(self, name, argv, service, env=None):
        # A service gets a session of its own, so that the Ctrl-C and hangup of `docker run -it` reach only
        # the command; the command keeps stdin, for an interactive shell.
        pid = subprocess.Popen(argv, env=env, start_new_session=service,
                               stdin=subprocess.DEVNULL if service else None).pid
        self.running[pid] = name
        self.foreground = pid
        return pid

    def forward(self, signum, frame=None):
        """docker stop's SIGTERM goes to everyone; Ctrl-C, USR1 (SLURM's warning), HUP and the others to the
        foreground alone: sshd and Jupyter would die of USR1, and sshd re-reads its configuration on HUP."""
        self.stopping = self.stopping or signum == signal.SIGTERM
        for pid in list(self.running) if signum == signal.SIGTERM else [self.foreground]:
            if pid in self.running:
                os.kill(pid, signum)

    def reap(self, pid=-1, flags=0):
        """(pid, exit status as a shell reports it: 128 + N for signal N) of a child that ended, or None."""
        pid, status = os.waitpid(pid, flags)
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        name = self.running.pop(pid, None)
        if name and pid != self.foreground:
            say(f"{name} exited ({code}); the HEALTHCHECK reports it")
        return pid, 128 - code if code < 0 else code

    def wait_for_foreground(self):
        while True:
            pid, status = self.reap()
            if pid == self.foreground:
                return status

    def stop_all(self):
        for pid in self.running:
            os.kill(pid, signal.SIGTERM)
        while self.running:
            self.reap(next(iter(self.running)))


def main(command, environ):
    home = environ.get("HOME", "/home/user")
    jupyter_port = int(environ.get("JUPYTER_PORT", "8888"))
    sshd_port = int(environ.get("SSHD_PORT", "2222"))
    sshd_dir = environ.get("SSHD_DIR", os.path.join(home, ".sshd"))
    services_file = environ.get("SERVICES_FILE", "/tmp/container-services")
    keys_file = environ.get("SSH_AUTHORIZED_KEYS_FILE", os.path.join(home, ".ssh", "authorized_keys"))

    # Refused even when Jupyter is not started here: a `jupyter lab` typed as the command would inherit it.
    if environ.get("JUPYTER_TOKEN") == "":
        jupyter_token(environ)
    has_jupyter = shutil.which("jupyter") is not None
    start_jupyter = wants_jupyter(environ.get("START_JUPYTER", "auto"), bool(command), has_jupyter)
    token, generated = jupyter_token(environ) if start_jupyter else (None, False)
    keys = public_keys(environ.get("SSH_PUBLIC_KEY", ""), keys_file, "SSH_AUTHORIZED_KEYS_FILE" in environ)
    sshd = shutil.which("sshd", path=f"{environ.get('PATH', '')}:/usr/sbin:/sbin")
    if keys and sshd is None:
        raise Refused("a public key was given but this image has no SSH server: use the full or dev image")
    if not keys and sshd is not None:
        say(f"sshd not started: no public key (mount one at {keys_file} or set SSH_PUBLIC_KEY)")
    command = command or ([] if start_jupyter or keys else ["bash"])
    if command and shutil.which(command[0]) is None:
        raise Refused(f"{command[0]}: no such command in this image")
    if not start_jupyter and not keys:
        os.execvp(command[0], command)  # nothing to look after: become the command

    # What runs, for the HEALTHCHECK (docker/healthcheck.py), written before the services start so that the
    # container is healthy only once they answer; Jupyter's line holds its token, hence this user's alone.
    with open(os.open(services_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(f"jupyter {jupyter_port} {token}\n" if start_jupyter else "")
        file.write(f"sshd {sshd_port}\n" if keys else "")
    runtime_dir = tempfile.mkdtemp(prefix="services.")  # private: the Jupyter configuration, the SSH environment
    children = Children()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, children.forward)
    try:
        if keys:
            session = write_ssh_session(runtime_dir, environ, os.getcwd())
            config = write_sshd_config(sshd_dir, sshd_port, session, keys)
            if subprocess.run([sshd, "-t", "-f", config]).returncode != 0:
                raise Refused(f"sshd rejected the configuration in {config} (its message is above)")
            fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", f"{sshd_dir}/ssh_host_ed25519_key.pub"],
                                         capture_output=True, text=True, check=True).stdout.split()[1]
            # -D keeps sshd a child of this process, -e sends its log to the container's.
            children.start("sshd", [sshd, "-D", "-e", "-f", config], service=True)
            say(f"sshd on port {sshd_port}, key-only, {len(keys)} key(s); host key {fingerprint}")
        if start_jupyter:
            config = os.path.join(runtime_dir, "jupyter_token_config.py")
            with open(config, "w") as file:
                # Read after every other configuration file (~/.jupyter, /etc/jupyter), so that none can set the
                # token. IdentityProvider.token: Jupyter ignores the older ServerApp.token once it is set.
                file.write('import os\n\nc.IdentityProvider.token = os.environ["JUPYTER_TOKEN"]\n')
            # The token in the environment, not in the arguments, where ps would show it; port_retries=0: on a
            # busy port Jupyter would move to another one, which -p did not publish.
            env = {**{k: v for k, v in environ.items() if k != "JUPYTER_TOKEN_FILE"}, "JUPYTER_TOKEN": token}
            jupyter = children.start("jupyter", ["jupyter", "lab", "--no-browser", f"--config={config}",
                                                 "--ServerApp.ip=0.0.0.0", f"--ServerApp.port={jupyter_port}",
                                                 "--ServerApp.port_retries=0"], service=True, env=env)
            timeout_s = float(environ.get("JUPYTER_START_TIMEOUT", "120"))
            ended = None

            def jupyter_exited():
                nonlocal ended
                ended = children.reap(jupyter, os.WNOHANG)
                return ended is not None

            if not check_jupyter_authentication(jupyter_port, token, jupyter_exited, timeout_s):
                if children.stopping:  # docker stop while it started: end as Jupyter ended
                    children.stop_all()
                    return ended[1]
                raise Refused(f"JupyterLab exited before it answered on port {jupyter_port} (its messages are above)")
            say(f"JupyterLab: http://127.0.0.1:{jupyter_port}/?token={token if generated else '<your token>'}")
        if command and not children.stopping:  # not once docker stop has come
            children.start("command", command, service=False)
        status = children.wait_for_foreground()
    except BaseException:
        children.stop_all()
        raise
    children.stop_all()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:], dict(os.environ)))
    except Refused as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
