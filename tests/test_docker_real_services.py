"""The entrypoint against the real services, as a container runs them: tini (subreaper here, PID 1 in the
image) over docker/entrypoint.sh, JupyterLab at the version docker/constraints.txt pins, Debian's OpenSSH
server, and a non-root user. Every attack of issue 12 must be refused and every legitimate use must work:
token login, key login with the image's environment, the TensorBoard tunnel, a training command, and
docker stop's SIGTERM reaching all of them.

.ci/run installs what these tests need (openssh-server and tini with apt, JupyterLab in .ci/venv, a user
made as the Dockerfile makes it when CI runs as root) and sets REQUIRE_REAL_SERVICES=1, under which a
missing piece fails instead of skipping. Without root, run `pytest -m "not real_services"` to leave them out
knowingly, or install the same pieces and point JUPYTER_VENV at the venv.
"""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
SBIN = "/usr/sbin:/usr/local/sbin:/sbin"
JUPYTER_VENV = Path(os.environ.get("JUPYTER_VENV", ROOT / ".ci" / "venv"))
SERVICE_USER = os.environ.get("REAL_SERVICES_USER", "refs-ci")

pytestmark = pytest.mark.real_services


def missing_pieces():
    missing = [name for name in ("tini", "ssh", "ssh-keygen") if shutil.which(name) is None]
    if shutil.which("sshd", path=f"{os.environ.get('PATH', '')}:{SBIN}") is None:
        missing.append("sshd (openssh-server)")
    if not (JUPYTER_VENV / "bin" / "jupyter").exists():
        missing.append(f"JupyterLab in {JUPYTER_VENV} (JUPYTER_VENV)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            missing.append(f"the non-root user {SERVICE_USER} (REAL_SERVICES_USER)")
    return missing


@pytest.fixture(scope="module", autouse=True)
def real_services_present():
    missing = missing_pieces()
    if missing:
        message = f"real services missing: {', '.join(missing)}; .ci/run installs them (as root)"
        if os.environ.get("REQUIRE_REAL_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message + '; deselect with -m "not real_services"')


def deadline_poll(condition, timeout, what):
    """condition() until it returns something true, at most timeout seconds; 50 ms between tries."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid):
    """Running, and not a zombie that nobody reaps."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return re.search(r"^State:\s+Z", status, re.M) is None


class Container:
    """docker/entrypoint.sh under tini, as the image's user, in a fresh home, with the image's layout
    imitated: the repository is the working directory (/workspace), the test's Python and JupyterLab's venv
    are on PATH (/opt/venv/bin)."""

    def __init__(self):
        self.user = pwd.getpwnam(SERVICE_USER) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        # Under the user's own home: sshd refuses keys below a world-writable folder such as /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="entrypoint-", dir=self.user.pw_dir))
        self.home, self.output = self.root / "home", self.root / "runs"
        for folder in (self.home, self.output, self.root / "tmp"):
            folder.mkdir()
        self.log = self.root / "container.log"
        self.sshd_port, self.jupyter_port = free_port(), free_port()
        self.key = self.root / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key], check=True)
        self.process = None

    def chown(self):
        if os.geteuid() == 0:
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, self.user.pw_uid, self.user.pw_gid, follow_symlinks=False)

    def start(self, *command, **settings):
        self.chown()
        env = {"PATH": f"{Path(sys.executable).parent}:{JUPYTER_VENV / 'bin'}:/usr/bin:/bin:{SBIN}",
               "HOME": str(self.home), "LANG": "C.UTF-8", "TMPDIR": str(self.root / "tmp"),
               "SERVICES_FILE": str(self.root / "services"), "STARTUP_REPORT": "0", "OMP_NUM_THREADS": "1",
               "SSHD_PORT": str(self.sshd_port), "JUPYTER_PORT": str(self.jupyter_port),
               "SSHD_DIR": str(self.root / "sshd"), **settings}
        user = {} if os.geteuid() != 0 else {"user": self.user.pw_uid, "group": self.user.pw_gid,
                                               "extra_groups": []}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(["tini", "-s", "--", str(ENTRYPOINT), *command], cwd=ROOT, env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            **user)
        return self

    def text(self):
        return self.log.read_text()

    def wait_for_line(self, pattern, timeout=120):
        def found():
            match = re.search(pattern, self.text())
            if match is None and self.process.poll() is not None:
                raise AssertionError(f"the container ended ({self.process.returncode}):\n{self.text()}")
            return match
        return deadline_poll(found, timeout, f"/{pattern}/ in the container's log")

    def wait_for_sshd(self):
        self.wait_for_line(r"sshd on port \d+, key-only")
        deadline_poll(lambda: self.healthy(), 30, "sshd to listen")

    def healthy(self):
        result = subprocess.run([sys.executable, HEALTHCHECK], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "SERVICES_FILE": str(self.root / "services")})
        return result.returncode == 0

    def ssh_command(self, *options):
        return ["ssh", "-i", str(self.key), "-p", str(self.sshd_port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.root / 'known_hosts'}",
                "-o", "LogLevel=ERROR", *options, f"{self.user.pw_name}@127.0.0.1"]

    def ssh(self, *options, remote=(), timeout=60, **kw):
        return subprocess.run([*self.ssh_command(*options), *remote], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **kw)

    def stop(self, timeout=120):
        """docker stop: SIGTERM to PID 1, then its status (SIGKILL after the grace period, as Docker)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the container did not stop within {timeout} s:\n{self.text()}")

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def container():
    box = Container()
    yield box
    box.close()


def service_pids(box):
    """sshd's and Jupyter's process ids, from the files they write at start."""
    pids = {}
    pid_file = box.root / "sshd" / "sshd.pid"
    if pid_file.exists():
        pids["sshd"] = int(pid_file.read_text())
    for info in (box.home / ".local" / "share" / "jupyter" / "runtime").glob("jpserver-*.json"):
        pids["jupyter"] = json.loads(info.read_text())["pid"]
    return pids


def http(port, path, token=None, method="GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_jupyter_config_cannot_switch_the_token_off(container):
    # What a mounted home or an old config may hold: every spelling of "no token" that Jupyter reads.
    config = container.home / ".jupyter"
    config.mkdir()
    off = {"ServerApp": {"token": ""}, "IdentityProvider": {"token": ""}, "NotebookApp": {"token": ""}}
    for name in ("jupyter_server_config.json", "jupyter_lab_config.json", "jupyter_config.json"):
        (config / name).write_text(json.dumps(off))
    container.start()  # no command: JupyterLab in the foreground
    token = container.wait_for_line(r"JupyterLab: http://127\.0\.0\.1:\d+/\?token=([0-9a-f]{48})").group(1)
    port = container.jupyter_port
    for method, path in [("GET", "/api/kernels"), ("POST", "/api/kernels"), ("POST", "/api/terminals"),
                         ("GET", "/api/contents")]:
        assert http(port, path, method=method)[0] == 403, f"{method} {path} without the token"
    assert http(port, "/api/kernels", token="0" * 48)[0] == 403
    assert http(port, "/api/kernels", token=token)[0] == 200
    assert "All authentication is disabled" not in container.text()
    assert container.healthy()
    jupyter = service_pids(container)["jupyter"]
    assert token not in Path(f"/proc/{jupyter}/cmdline").read_text(), "the token shows in ps"
    assert container.stop() == 0 and not alive(jupyter)


def test_a_chosen_token_logs_in_and_a_short_one_is_refused(container):
    chosen = "chosen-by-the-user-0123456789abcdef"
    container.start("true", START_JUPYTER="1", JUPYTER_TOKEN="a")
    assert container.process.wait(timeout=60) == 2
    assert "a chosen token needs at least 32" in container.text()
    container.start(START_JUPYTER="1", JUPYTER_TOKEN=chosen)
    container.wait_for_line(r"\?token=<your token>")
    assert http(container.jupyter_port, "/api/status", token=chosen)[0] == 200
    assert http(container.jupyter_port, "/api/status")[0] == 403
    assert chosen not in container.text()
    assert container.stop() == 0


def test_ssh_session_has_the_image_environment_and_forwards_only_to_loopback(container):
    tensorboard_port = free_port()
    (container.output / "tb").mkdir()
    # TensorBoard as the docs start it: on the container's loopback, reached through the SSH tunnel.
    container.start(sys.executable, "-m", "tensorboard.main", "--logdir", str(container.output / "tb"),
                    "--host", "127.0.0.1", "--port", str(tensorboard_port),
                    SSH_PUBLIC_KEY=(container.root / "id_ed25519.pub").read_text(), WANDB_MODE="offline")
    container.wait_for_sshd()

    session = container.ssh(remote=['pwd; command -v python; python -c "import torch; print(torch.__version__)"; '
                                    'echo "mode=$WANDB_MODE token=${JUPYTER_TOKEN-unset}"'])
    assert session.returncode == 0, session.stderr
    cwd, python, torch_version, variables = session.stdout.splitlines()
    assert cwd == str(ROOT)  # the container's working directory, /workspace in the image
    assert python == str(Path(sys.executable).parent / "python")
    assert torch_version == subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                           capture_output=True, text=True).stdout.strip()
    assert variables == "mode=offline token=unset"

    # No agent forwarding, even when the client offers one.
    with tempfile.TemporaryDirectory() as folder:
        agent_socket = Path(folder) / "agent"
        agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL)
        try:
            deadline_poll(agent_socket.exists, 30, "ssh-agent's socket")
            offered = container.ssh("-A", remote=['echo "agent=${SSH_AUTH_SOCK:-none}"'],
                                    env={**os.environ, "SSH_AUTH_SOCK": str(agent_socket)})
        finally:
            agent.terminate()
            agent.wait()
    assert offered.stdout.strip() == "agent=none", offered.stdout + offered.stderr

    # Password-only and wrong-key clients are turned away.
    refused = container.ssh("-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=yes", remote=["true"])
    assert refused.returncode == 255 and "Permission denied" in refused.stderr

    # -W (and -L) only to the container's loopback; no -R into the container.
    other_host = container.ssh("-W", f"127.0.0.2:{container.sshd_port}")
    assert other_host.returncode != 0 and "stdio forwarding failed" in other_host.stderr
    remote = container.ssh("-o", "ExitOnForwardFailure=yes", "-R", f"{free_port()}:127.0.0.1:22", remote=["true"])
    assert remote.returncode == 255 and "remote port forwarding failed" in remote.stderr

    local_port = free_port()
    # The command of docker/README.md: ssh -N -L 6006:127.0.0.1:6006 -p 2222 user@gpu-server
    tunnel = subprocess.Popen(container.ssh_command("-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                                    f"{local_port}:127.0.0.1:{tensorboard_port}"),
                              stdin=subprocess.DEVNULL)
    try:
        def tensorboard_page():
            try:
                return http(local_port, "/")
            except OSError:  # tunnel or TensorBoard not up yet
                return None
        status, page = deadline_poll(tensorboard_page, 120, "TensorBoard through the tunnel")
        assert status == 200 and "TensorBoard" in page
    finally:
        tunnel.terminate()
        tunnel.wait()

    # A dead sshd is reaped (no zombie), and the healthcheck notices it.
    sshd = service_pids(container)["sshd"]
    os.kill(sshd, signal.SIGKILL)
    deadline_poll(lambda: not Path(f"/proc/{sshd}").exists(), 30, "the killed sshd to be reaped, not left a zombie")
    assert not container.healthy()
    # docker stop reaches the command: TensorBoard handles SIGTERM and exits 0.
    assert container.stop() == 0


def test_docker_stop_checkpoints_the_training_and_stops_every_service(container):
    container.start(sys.executable, "classification/train.py", "--device", "cpu", "--model", "resnet18",
                    "--synthetic-train-size", "512", "--synthetic-val-size", "64", "-b", "32", "--epochs", "3",
                    "--print-freq", "4", "--output-dir", str(container.output / "r18"),
                    START_JUPYTER="1", SSH_PUBLIC_KEY=(container.root / "id_ed25519.pub").read_text())
    container.wait_for_line(r"JupyterLab: http://")
    container.wait_for_line(r"Epoch: \[0\] \[ *4/16\]")  # training, mid-epoch
    container.wait_for_sshd()
    pids = service_pids(container)
    assert set(pids) == {"sshd", "jupyter"} and all(alive(pid) for pid in pids.values())
    assert container.healthy()
    assert container.stop() == 75, container.text()
    assert re.search(r"saved .*checkpoint\.pth \(epoch 0 step \d+\)", container.text()), container.text()
    assert (container.output / "r18" / "checkpoint.pth").is_file()
    assert [name for name, pid in pids.items() if alive(pid)] == []
    for port in (container.sshd_port, container.jupyter_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


SECRETS_AND_OUTPUTS = [
    "jupyter_token", ".env", "docker/.env.local", ".ssh/id_ed25519", ".ssh/authorized_keys", "certs/server.pem",
    "tls/server.key", ".aws/credentials", ".pypirc", ".netrc", ".git-credentials", ".docker/config.json",
    ".kube/config", "secrets/wandb_token", "runs/r50/checkpoint.pth", "runs/r50/tb/events.out.tfevents.1.host",
    "segmentation/runs/voc/log.jsonl", "data/imagenet/train/n01440764/a.JPEG", "output/best.pth",
    "weights/model.safetensors", ".git/config", ".ci/venv/bin/python",
]


def test_the_build_context_docker_computes_holds_no_secret_and_every_tracked_file(tmp_path):
    # The docker SDK's own .dockerignore matcher (docker.utils.build.exclude_paths, the patterns of
    # Docker's) over a copy of the tracked files with secrets and run outputs planted among them.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = [path for path in tracked.stdout.splitlines() if (ROOT / path).is_file()]
    for path in [*tracked, *SECRETS_AND_OUTPUTS]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes((ROOT / path).read_bytes() if path in tracked else b"secret")
    script = ("import json, sys\nfrom docker.utils.build import exclude_paths\n"
              "patterns = [l.strip() for l in open(sys.argv[1] + '/.dockerignore') if l.strip() and not l.startswith('#')]\n"
              "print(json.dumps(sorted(exclude_paths(sys.argv[1], patterns, 'docker/Dockerfile'))))\n")
    result = subprocess.run([JUPYTER_VENV / "bin" / "python", "-c", script, tmp_path], capture_output=True,
                            text=True, check=True)
    context = set(json.loads(result.stdout))
    assert [path for path in SECRETS_AND_OUTPUTS if path in context] == []
    assert [path for path in tracked if path not in context] == []
