"""The images of docker/Dockerfile, run for real: training, docker stop, shared memory, JupyterLab, SSH, the
HEALTHCHECK and pytest inside containers, and no secret in any layer.

They need a Docker engine and the images vision-refs:base, :full and :dev, which .ci/build-images builds (as
root, on a Debian base, see docker/README.md, "What CI builds"); VISION_REFS_IMAGE names another repository.
Without them these tests skip, except where REQUIRE_DOCKER_IMAGES=1 (CI), where that is a failure.
Containers share the host's network (--network host, as in CI, where no other address may be used), so
every port is a free port of this machine.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One pytest-xdist worker runs them all: the module's containers start once.
pytestmark = pytest.mark.xdist_group("docker-image")
ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = os.environ.get("VISION_REFS_IMAGE", "vision-refs")
BASE, FULL, DEV = (f"{REPOSITORY}:{target}" for target in ("base", "full", "dev"))
# Debian's client where it is installed (as .ci/build-images uses it), else the one on PATH.
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
# The secrets .ci/build-images hands the build: this machine's CA bundle, and a netrc made for the purpose.
BUILD_SECRETS = [Path("/etc/ssl/certs/ca-certificates.crt"), Path("/var/tmp/vision-refs-build/netrc")]


def docker(*args, timeout=120, check=True, **kw):
    result = subprocess.run([DOCKER, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


def missing():
    if DOCKER is None:
        return "no docker client"
    try:
        if docker("info", check=False, timeout=30).returncode != 0:
            return "no Docker engine answers"
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer"
    absent = [image for image in (BASE, FULL, DEV) if docker("image", "inspect", image, check=False).returncode]
    return f"images not built: {', '.join(absent)}" if absent else None


def skip_unless_required(message):
    if os.environ.get("REQUIRE_DOCKER_IMAGES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module", autouse=True)
def images_present():
    reason = missing()
    if reason:
        skip_unless_required(f"{reason}: .ci/build-images starts Docker and builds the images (as root)")


@pytest.fixture(scope="module")
def image_user():
    """The numeric uid and gid the images were built with (USER_UID, USER_GID)."""
    uid, gid = docker("image", "inspect", "-f", "{{.Config.User}}", BASE).stdout.strip().split(":")
    return int(uid), int(gid)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout, what):
    end = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return value


class Container:
    """docker run -d, on the host's network; removed at the end whatever happened."""

    def __init__(self, image, *command, options=()):
        self.name = f"vision-refs-test-{uuid.uuid4().hex[:8]}"
        docker("run", "-d", "--name", self.name, "--network", "host", *options, image, *command)

    def logs(self):
        result = docker("logs", self.name)
        return result.stdout + result.stderr

    def wait_for_log(self, pattern, timeout=120):
        def found():
            if (match := re.search(pattern, self.logs())) is None and not self.running():
                raise AssertionError(f"the container ended ({self.state()['ExitCode']}):\n{self.logs()}")
            return match
        return wait_for(found, timeout, f"/{pattern}/ in the container's log")

    def state(self):
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)

    def running(self):
        return self.state()["Running"]

    def remove(self):
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def containers():
    started = []
    yield lambda *args, **kw: started.append(Container(*args, **kw)) or started[-1]
    for container in started:
        container.remove()


def owners(folder):
    return {(path.stat().st_uid, path.stat().st_gid) for path in [folder, *folder.rglob("*")]}


def writable_folder(tmp_path, name):
    """A host folder the image's user can write to, whatever its uid (the tests may run as root)."""
    folder = tmp_path / name
    folder.mkdir()
    folder.chmod(0o777)
    return folder


# base: training, docker stop, shared memory --------------------------------------------------------------

TRAIN = ["python", "classification/train.py", "--output-dir", "/workspace/out/run", "--synthetic-train-size", "128",
         "--synthetic-val-size", "32", "-b", "16", "--epochs", "1", "--print-freq", "2"]


def test_training_stops_with_75_on_docker_stop_and_resumes_in_a_new_container(containers, tmp_path, image_user):
    out = writable_folder(tmp_path, "out")
    mount = ["-v", f"{out}:/workspace/out"]
    box = containers(BASE, *TRAIN, options=mount)
    box.wait_for_log(r"Epoch: \[0\] \[ *2/8\]")  # training, mid-epoch
    started = time.monotonic()
    docker("stop", "-t", "60", box.name, timeout=90)
    assert time.monotonic() - started < 60, "SIGKILLed at the end of the stop timeout"
    assert box.state()["ExitCode"] == 75, box.logs()
    assert re.search(r"saved /workspace/out/run/checkpoint\.pth \(epoch 0 step \d\)", box.logs()), box.logs()
    # Everything the run wrote on the host belongs to the numeric ids the image was built with.
    assert (out / "run" / "checkpoint.pth").is_file()
    assert owners(out / "run") == {image_user}

    resumed = docker("run", "--rm", "--network", "host", *mount, BASE, *TRAIN, "--resume", "auto", timeout=600)
    assert re.search(r"resumed from /workspace/out/run/checkpoint\.pth: epoch 0 step \d", resumed.stdout), \
        resumed.stdout
    assert "done in" in resumed.stdout
    assert json.loads((out / "run" / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 0
    assert owners(out / "run") == {image_user}


def test_docker_default_shared_memory_is_warned_about_and_running_out_is_one_line(containers, tmp_path):
    # DataLoader workers, which the built-in set does not use: 128 photos of 224 x 224 make a batch of 77 MB,
    # more than Docker's default /dev/shm of 64 MB.
    rng = np.random.default_rng(0)
    for split, count in (("train", 64), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{i}.jpg", quality=50)
    result = docker("run", "--rm", "--network", "host", "-v", f"{tmp_path / 'data'}:/data:ro", BASE, "python",
                    "classification/train.py", "--data-path", "/data", "-j", "2", "-b", "128", "--epochs", "1",
                    "--model", "resnet18", "--device", "cpu", check=False, timeout=300)
    assert "warning: /dev/shm is 64 MiB" in result.stderr and "--shm-size=8g or --ipc=host" in result.stderr
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "shared memory" in line and "warning" not in line]
    assert len(errors) == 1 and re.match(r"error: DataLoader worker .*ran out of shared memory", errors[0])
    assert "--shm-size" in errors[0] and "--ipc=host" in errors[0]
    # Neither torch's traceback nor its line from each worker's SIGBUS handler.
    assert "Traceback" not in result.stderr and "bus error encountered" not in result.stderr, result.stderr


# full: JupyterLab, SSH, the HEALTHCHECK -------------------------------------------------------------------

def http(port, path, token=None, method="GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class FullBox:
    """One `full` container for the tests below: JupyterLab behind a token read from a mounted file (beside a
    mounted ~/.jupyter that tries to switch the token off), sshd for a mounted key, and a command (sleep)."""

    def __init__(self, folder):
        self.folder, self.jupyter_port, self.sshd_port = folder, free_port(), free_port()
        self.key = folder / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key], check=True)
        self.token = "chosen-by-the-user-" + uuid.uuid4().hex
        (folder / "jupyter_token").write_text(self.token + "\n")
        config = folder / "jupyter-config"
        config.mkdir()
        off = {"ServerApp": {"token": ""}, "IdentityProvider": {"token": ""}, "NotebookApp": {"token": ""}}
        for name in ("jupyter_server_config.json", "jupyter_lab_config.json", "jupyter_config.json"):
            (config / name).write_text(json.dumps(off))
        # Readable by the image's user, whatever uid these tests run as; the private key stays the tests' own.
        for path in (folder, config, *config.iterdir(), folder / "jupyter_token", Path(f"{self.key}.pub")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.container = Container(FULL, "sleep", "infinity", options=[
            "-e", "START_JUPYTER=1", "-e", f"JUPYTER_PORT={self.jupyter_port}", "-e", f"SSHD_PORT={self.sshd_port}",
            "-e", "JUPYTER_TOKEN_FILE=/run/secrets/jupyter_token", "-e", "WANDB_MODE=offline",
            "-v", f"{folder / 'jupyter_token'}:/run/secrets/jupyter_token:ro",
            "-v", f"{config}:/home/user/.jupyter:ro",
            "-v", f"{self.key}.pub:/home/user/.ssh/authorized_keys:ro",
            "--health-interval=1s", "--health-retries=1", "--health-start-period=1s"])
        self.container.wait_for_log(r"JupyterLab: http://127\.0\.0\.1:\d+/\?token=<your token>")
        self.container.wait_for_log(r"sshd on port \d+, key-only, 1 key")

    def ssh_command(self, *options, user="user", key=None):
        return ["ssh", "-i", key or self.key, "-o", "IdentitiesOnly=yes", "-p", str(self.sshd_port),
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "LogLevel=ERROR",
                "-o", f"UserKnownHostsFile={self.folder / 'known_hosts'}", *options, f"{user}@127.0.0.1"]

    def ssh(self, *options, user="user", key=None, remote=("true",), env=None):
        return subprocess.run([*self.ssh_command(*options, user=user, key=key), *remote], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)

    def health(self):
        return self.container.state()["Health"]["Status"]


@pytest.fixture(scope="module")
def full_box(images_present):
    folder = Path(tempfile.mkdtemp(prefix="full-box-"))
    box = None
    try:
        box = FullBox(folder)
        yield box
    finally:
        if box is not None:
            box.container.remove()
        shutil.rmtree(folder, ignore_errors=True)


def test_jupyter_needs_its_token_and_a_mounted_config_cannot_switch_it_off(full_box):
    port = full_box.jupyter_port
    for method, path in [("GET", "/api/kernels"), ("POST", "/api/kernels"), ("POST", "/api/terminals"),
                         ("GET", "/api/contents")]:
        assert http(port, path, method=method) in (401, 403), f"{method} {path} without the token"
    assert http(port, "/api/kernels", token="0" * 48) in (401, 403)
    assert http(port, "/api/kernels", token=full_box.token) == 200
    logs = full_box.container.logs()
    assert "All authentication is disabled" not in logs and full_box.token not in logs
    processes = docker("top", full_box.container.name).stdout
    assert "jupyter-lab" in processes and full_box.token not in processes, "the token shows in ps"


def test_ssh_takes_the_mounted_key_only_and_no_root(full_box):
    assert full_box.ssh().returncode == 0, full_box.ssh().stderr
    refused = full_box.ssh("-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=yes",
                           "-o", "KbdInteractiveAuthentication=yes")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    root = full_box.ssh(user="root")
    assert root.returncode == 255 and "Permission denied" in root.stderr
    other_key = full_box.folder / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other_key], check=True)
    wrong = full_box.ssh(key=other_key)
    assert wrong.returncode == 255 and "Permission denied" in wrong.stderr


def test_an_ssh_session_has_the_image_environment_and_starts_in_the_workspace(full_box):
    session = full_box.ssh(remote=['pwd; command -v python; python -c "import torch; print(torch.__version__)"; '
                                   'echo "mode=$WANDB_MODE token=${JUPYTER_TOKEN-unset}"'])
    assert session.returncode == 0, session.stderr
    cwd, python, torch_version, variables = session.stdout.splitlines()
    assert cwd == "/workspace" and python == "/opt/venv/bin/python"
    pinned = re.search(r"^torch==([\d.]+)", (ROOT / "docker" / "constraints.txt").read_text(), re.M).group(1)
    assert torch_version.split("+")[0] == pinned
    assert variables == "mode=offline token=unset"  # docker run's -e settings, less the Jupyter token


def test_ssh_forwards_only_to_the_container_loopback(full_box):
    # -L to the container's loopback: Jupyter, through the tunnel as from a laptop.
    local_port = free_port()
    tunnel = subprocess.Popen(full_box.ssh_command("-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                                   f"{local_port}:127.0.0.1:{full_box.jupyter_port}"),
                              stdin=subprocess.DEVNULL)
    try:
        def through_tunnel():
            try:
                return http(local_port, "/api/status", token=full_box.token)
            except OSError:
                return None
        assert wait_for(through_tunnel, 60, "Jupyter through the SSH tunnel") == 200
    finally:
        tunnel.terminate()
        tunnel.wait()
    assert "stdio forwarding failed" in full_box.ssh("-W", f"127.0.0.2:{full_box.sshd_port}", remote=()).stderr
    remote = full_box.ssh("-o", "ExitOnForwardFailure=yes", "-R", f"{free_port()}:127.0.0.1:22")
    assert remote.returncode == 255 and "remote port forwarding failed" in remote.stderr
    with tempfile.TemporaryDirectory() as folder:
        agent_socket = Path(folder) / "agent"
        agent = subprocess.Popen(["ssh-agent", "-D", "-a", agent_socket], stdout=subprocess.DEVNULL)
        try:
            wait_for(agent_socket.exists, 30, "ssh-agent's socket")
            offered = full_box.ssh("-A", remote=['echo "agent=${SSH_AUTH_SOCK:-none}"'],
                                   env={**os.environ, "SSH_AUTH_SOCK": str(agent_socket)})
        finally:
            agent.terminate()
            agent.wait()
    assert offered.stdout.strip() == "agent=none", offered.stdout + offered.stderr


def test_healthcheck_is_healthy_and_turns_unhealthy_when_jupyter_is_killed(full_box):
    wait_for(lambda: full_box.health() == "healthy", 60, "the HEALTHCHECK to report healthy")
    # The pattern's brackets keep the shell that runs it from matching itself.
    docker("exec", full_box.container.name, "sh", "-c",
           "for p in /proc/[0-9]*; do grep -q 'jupyter-la[b]' $p/cmdline 2>/dev/null && kill ${p#/proc/}; done; true")
    wait_for(lambda: full_box.health() == "unhealthy", 60, "the HEALTHCHECK to report unhealthy")
    full_box.container.wait_for_log(r"entrypoint: jupyter exited \(\d+\); the HEALTHCHECK reports it")  # reaped
    assert full_box.container.running()  # the command goes on; the HEALTHCHECK tells


def test_full_without_a_command_serves_jupyter_with_a_generated_token_until_docker_stop(containers):
    port = free_port()
    box = containers(FULL, options=["-e", f"JUPYTER_PORT={port}"])
    token = box.wait_for_log(r"JupyterLab: http://127\.0\.0\.1:\d+/\?token=([0-9a-f]{48})").group(1)
    assert box.logs().count(token) == 1
    assert http(port, "/api/status", token=token) == 200 and http(port, "/api/status") in (401, 403)
    docker("stop", box.name)
    assert box.state()["ExitCode"] == 0, box.logs()


@pytest.mark.parametrize("image, options, message", [
    (FULL, ["-e", "JUPYTER_TOKEN=short"], "error: JUPYTER_TOKEN has 5 characters; a chosen token needs at least 32"),
    (FULL, ["-e", "JUPYTER_PORT={busy}"], "error: JupyterLab exited before it answered on port {busy}"),
    (BASE, ["-e", "START_JUPYTER=1"], "error: JupyterLab was asked for, but only the full and dev images have it"),
])
def test_what_would_not_work_stops_the_container_with_one_error_line(image, options, message):
    # A port in use (bound, not listening, so that nothing answers in Jupyter's place): Jupyter must not move
    # to another one, which -p did not publish.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        options = [option.format(busy=port) for option in options]
        result = docker("run", "--rm", "--network", "host", *options, image, check=False, timeout=180)
    assert result.returncode == 2, result.stderr
    assert message.format(busy=port) in result.stderr


# dev ----------------------------------------------------------------------------------------------------

def test_pytest_runs_inside_dev():
    result = docker("run", "--rm", "--network", "host", "-e", "OMP_NUM_THREADS=1", DEV, "pytest", "-q",
                    "-p", "no:cacheprovider", "tests/test_metrics.py", timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\d+ passed", result.stdout.splitlines()[-1]), result.stdout


# secrets ------------------------------------------------------------------------------------------------

def layer_folders(image):
    """The folders of the image's layers on this machine (overlay2), lowest first."""
    driver = json.loads(docker("image", "inspect", "-f", "{{json .GraphDriver}}", image).stdout)
    if driver["Name"] != "overlay2":
        skip_unless_required(f"the layers are read from overlay2's folders; this engine uses {driver['Name']}")
    folders = [*reversed(driver["Data"].get("LowerDir", "").split(":")), driver["Data"]["UpperDir"]]
    folders = [Path(folder) for folder in folders if folder]
    if not all(os.access(folder, os.R_OK | os.X_OK) for folder in folders):
        skip_unless_required("the layers' folders are readable by root only")
    return folders


def test_no_build_secret_in_any_layer_or_in_the_history():
    if not all(path.is_file() for path in BUILD_SECRETS):
        skip_unless_required(f"not on this machine, so not what the images were built with: {BUILD_SECRETS}")
    secrets_given = [path.read_bytes() for path in BUILD_SECRETS]
    # The netrc's password, and every certificate of the CA bundle that Debian's own bundle lacks (the
    # proxy's), would show who built the image where.
    markers = [re.search(rb"password (\S+)", secrets_given[1]).group(1)]
    image_bundle = docker("run", "--rm", "--network", "host", "--entrypoint", "cat", DEV,
                          "/etc/ssl/certs/ca-certificates.crt").stdout.encode()
    markers += [certificate for certificate in re.findall(rb"-----BEGIN CERTIFICATE-----\n(.{64})", secrets_given[0])
                if certificate not in image_bundle]
    for image in (BASE, FULL, DEV):
        history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout.encode()
        assert [m for m in markers if m in history] == [] and b"BEGIN CERTIFICATE" not in history
    found = []
    for folder in {folder for image in (BASE, FULL, DEV) for folder in layer_folders(image)}:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 2**20:
                content = path.read_bytes()
                if content in secrets_given or any(marker in content for marker in markers):
                    found.append(str(path))
    assert found == []


SECRETS_AND_OUTPUTS = [
    "jupyter_token", ".env", "docker/.env.local", ".ssh/id_ed25519", ".ssh/authorized_keys", "certs/server.pem",
    "tls/server.key", ".aws/credentials", ".pypirc", ".netrc", ".git-credentials", ".docker/config.json",
    ".kube/config", "secrets/wandb_token", "runs/r50/checkpoint.pth", "runs/r50/tb/events.out.tfevents.1.host",
    "segmentation/runs/voc/log.jsonl", "data/imagenet/train/n01440764/a.JPEG", "output/best.pth",
    "weights/model.safetensors", ".git/config",
]


def test_the_build_context_docker_sends_holds_every_tracked_file_and_no_secret(tmp_path):
    # The repository's tracked files with secrets and run outputs planted among them, built as the Dockerfile
    # copies the repository (COPY . /workspace), so that Docker itself applies .dockerignore.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = [path for path in tracked.stdout.splitlines() if (ROOT / path).is_file()]
    for path in [*tracked, *SECRETS_AND_OUTPUTS]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes((ROOT / path).read_bytes() if path in tracked else b"secret")
    (tmp_path / "context.Dockerfile").write_text(
        f"FROM {BASE}\nCOPY . /context\nRUN find /context -type f > /tmp/files\n")
    image = f"vision-refs-context-test:{uuid.uuid4().hex[:8]}"
    docker("build", "--network", "host", "-q", "-f", tmp_path / "context.Dockerfile", "-t", image, tmp_path,
           env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=300)
    try:
        listed = docker("run", "--rm", "--network", "host", "--entrypoint", "cat", image, "/tmp/files").stdout
    finally:
        docker("rmi", "-f", image, check=False)
    context = {line.removeprefix("/context/") for line in listed.splitlines()}
    assert [path for path in SECRETS_AND_OUTPUTS if path in context] == []
    assert [path for path in tracked if path not in context] == []
