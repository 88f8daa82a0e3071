"""docker/ checked without a Docker engine: the linters, the parsed Dockerfile, the requirement files it
installs, the build context, the HEALTHCHECK script, and the entrypoint run by bash.

The entrypoint runs with stand-ins on PATH that record how they were called: `jupyter` (a small HTTP server
that answers the entrypoint's authentication check as Jupyter does, or as a Jupyter without authentication
would), `sshd` (which hands `sshd -t` to the real one where the machine has it) and, for the shared-memory
warning, `df`. The real sshd, where there is one, also checks the configuration the entrypoint writes (`sshd
-t`, `sshd -T`). tests/test_docker_real_services.py runs the entrypoint against the real JupyterLab, sshd and
tini instead.
"""
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
LOCKED = ROOT / "docker" / "locked.py"

SSH_KEYGEN = shutil.which("ssh-keygen")
REAL_SSHD = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
needs_ssh_keygen = pytest.mark.skipif(
    SSH_KEYGEN is None, reason="ssh-keygen not found (openssh-client): the entrypoint checks keys with it")
needs_real_sshd = pytest.mark.skipif(
    REAL_SSHD is None, reason="no sshd on this machine (openssh-server is not installed), so the generated "
                              "configuration cannot be checked with the real sshd -t / -T")


# ---------------------------------------------------------------------------------------------------------
# The Dockerfile, parsed

def parse_dockerfile(text):
    """[(INSTRUCTION, arguments)] with continuation lines joined and comment lines dropped, as Docker does."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions):
    """(global instructions before the first FROM, [{"name", "from", "instructions"}])."""
    preamble, result = [], []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append({"name": name, "from": words[0], "instructions": []})
        elif result:
            result[-1]["instructions"].append((keyword, arguments))
        else:
            preamble.append((keyword, arguments))
    return preamble, result


def arg_defaults(instructions):
    return dict(arguments.split("=", 1) for keyword, arguments in instructions
                if keyword == "ARG" and "=" in arguments)


def env_names(arguments):
    if "=" not in arguments.split()[0]:
        return [arguments.split()[0]]  # the old "ENV NAME value" form
    return re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", arguments)


def expand(text, variables):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


@pytest.fixture(scope="module")
def dockerfile():
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    preamble, stage_list = stages(instructions)
    return {"instructions": instructions, "preamble": preamble, "stages": {s["name"]: s for s in stage_list},
            "order": [s["name"] for s in stage_list], "stage_list": stage_list}


def runs(stage):
    return [arguments for keyword, arguments in stage["instructions"] if keyword == "RUN"]


def test_three_targets_each_built_on_the_one_before(dockerfile):
    assert dockerfile["order"] == ["base", "full", "dev"]
    assert dockerfile["stages"]["full"]["from"] == "base"
    assert dockerfile["stages"]["dev"]["from"] == "full"


def test_from_is_a_cuda_base_image_pinned_by_digest_never_latest(dockerfile):
    earlier_stages = set()
    digest_args = arg_defaults(dockerfile["preamble"])
    declared = [arguments for keyword, arguments in dockerfile["preamble"] if keyword == "ARG"]
    for stage in dockerfile["stage_list"]:
        image = stage["from"]
        earlier_stages.add(stage["name"])
        if image in earlier_stages:
            continue
        assert "latest" not in image, image
        # A full x.y.z CUDA version, the smallest variant (torch's wheels bring CUDA, cuDNN and NCCL), and
        # the digest, which is what Docker pulls: either written out, or a build argument without a
        # default that the build refuses to go without (${NAME:?}).
        match = re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-base-ubuntu22\.04@(sha256:[0-9a-f]{64}|\$\{(\w+):\?\})", image)
        assert match, image
        if match.group(2):
            assert match.group(2) in declared and match.group(2) not in digest_args, \
                f"{match.group(2)} must be a global ARG without a default"


def test_every_target_runs_as_a_numeric_non_root_user(dockerfile):
    variables = arg_defaults(dockerfile["preamble"])
    for stage in dockerfile["stage_list"]:
        users = [arguments for keyword, arguments in stage["instructions"] if keyword == "USER"]
        assert users, f"stage {stage['name']} sets no USER"
        uid, _, gid = expand(users[-1], variables).partition(":")
        assert uid.isdigit() and int(uid) != 0, f"stage {stage['name']} ends as USER {users[-1]}"
        assert gid.isdigit(), f"stage {stage['name']} ends as USER {users[-1]}"


def test_tini_is_pid_1(dockerfile):
    entrypoints = [arguments for keyword, arguments in dockerfile["instructions"] if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "one ENTRYPOINT, in base, inherited by full and dev"
    command = json.loads(entrypoints[0])  # exec form: no shell in between to swallow signals
    assert Path(command[0]).name == "tini" and command[1] == "--"
    assert command[2] == "/usr/local/bin/entrypoint.sh"
    copies = [arguments for keyword, arguments in dockerfile["stages"]["base"]["instructions"] if keyword == "COPY"]
    assert any("docker/entrypoint.sh /usr/local/bin/entrypoint.sh" in copy for copy in copies)
    assert any(re.search(r"apt-get install .*\btini\b", run) for run in runs(dockerfile["stages"]["base"]))


SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE|CREDENTIAL|ACCESS_KEY", re.IGNORECASE)


def test_no_secret_looking_env_or_arg(dockerfile):
    names = []
    for keyword, arguments in dockerfile["instructions"]:
        if keyword == "ENV":
            names += env_names(arguments)
        elif keyword == "ARG":
            names.append(arguments.split("=", 1)[0])
    assert "PATH" in names and "USER_UID" in names  # the parsing found them
    assert [name for name in names if SECRET_WORDS.search(name)] == []


def test_apt_and_pip_leave_no_caches(dockerfile):
    apt_runs = pip_commands = 0
    for stage in dockerfile["stage_list"]:
        for run in runs(stage):
            if "apt-get install" in run:
                apt_runs += 1
                assert "--no-install-recommends" in run, run
                assert "apt-get update" in run and "rm -rf /var/lib/apt/lists/*" in run, run
            for command in run.split("&&"):
                if "pip install" in command:
                    pip_commands += 1
                    assert "--no-cache-dir" in command, command
    assert apt_runs >= 2 and pip_commands >= 4  # the parsing found them


def test_full_has_the_ports_a_healthcheck_and_no_baked_host_keys(dockerfile):
    full = dockerfile["stages"]["full"]["instructions"]
    exposed = [arguments.split() for keyword, arguments in full if keyword == "EXPOSE"]
    assert exposed == [["8888", "2222"]]
    healthchecks = [arguments for keyword, arguments in full if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    command = healthchecks[0].split(" CMD ", 1)[1]
    assert json.loads(command)[-1] == "/usr/local/bin/healthcheck.py"  # exec form, no shell
    ssh_install = [run for run in runs(dockerfile["stages"]["full"]) if "openssh-server" in run]
    assert len(ssh_install) == 1 and "rm -f /etc/ssh/ssh_host_*" in ssh_install[0]
    assert not any("ssh-keygen" in run for stage in dockerfile["stage_list"] for run in runs(stage))
    compilers = ssh_install[0].split()
    assert {"gcc", "g++", "python3-dev"} <= set(compilers)


def test_user_ids_are_build_args_and_the_workspace_is_theirs(dockerfile):
    base = dockerfile["stages"]["base"]
    defaults = arg_defaults(dockerfile["preamble"])
    assert defaults["USER_UID"].isdigit() and defaults["USER_GID"].isdigit()
    user_setup = next(run for run in runs(base) if "useradd" in run)
    assert '--uid "$USER_UID"' in user_setup and '--gid "$USER_GID"' in user_setup
    assert '-o "$USER_UID" -g "$USER_GID" /workspace' in user_setup
    assert ("COPY", "--chown=${USER_UID}:${USER_GID} . /workspace") in base["instructions"]


# ---------------------------------------------------------------------------------------------------------
# The requirement files the image installs are the repository's own

def requirement_lines(path):
    for raw in path.read_text().splitlines():
        text = raw.split("#", 1)[0].strip()
        if text and not text.startswith("-"):
            yield Requirement(text)


def test_the_image_installs_the_repository_requirement_files(dockerfile):
    base, dev = dockerfile["stages"]["base"], dockerfile["stages"]["dev"]
    assert ("COPY", "docker/constraints.txt docker/locked.py /opt/requirements/") in base["instructions"]
    assert ("COPY", "requirements.txt /opt/requirements/") in base["instructions"]
    assert ("COPY", "requirements-dev.txt requirements-export.txt /opt/requirements/") in dev["instructions"]
    install = next(run for run in runs(base) if "-r /opt/requirements/requirements.txt" in run)
    assert "-c /opt/requirements/constraints.txt" in install
    assert '--extra-index-url "$TORCH_INDEX_URL"' in install
    dev_install = next(run for run in runs(dev) if "pip install" in run)
    assert "-r /opt/requirements/requirements-dev.txt -c /opt/requirements/constraints.txt" in dev_install
    # requirements-dev.txt names the other two relatively, so all three must sit side by side in the image.
    dev_lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev_lines and "-r requirements-export.txt" in dev_lines


def test_every_pip_install_is_constrained_locked_and_takes_the_index_argument(dockerfile):
    assert arg_defaults(dockerfile["preamble"])["PIP_INDEX_URL"] == "https://pypi.org/simple"
    installs = 0
    for stage in dockerfile["stage_list"]:
        if any("pip install" in run for run in runs(stage)):
            assert ("ARG", "PIP_INDEX_URL") in stage["instructions"], f"stage {stage['name']} does not see it"
        for run in runs(stage):
            commands = [command.strip() for command in run.split("&&")]
            for n, command in enumerate(commands):
                if "pip install" in command:
                    installs += 1
                    assert "-c /opt/requirements/constraints.txt" in command, command
                    assert '--index-url "$PIP_INDEX_URL"' in command, command
                    # What pip pulled in beyond the constraints stops the build right there.
                    assert commands[n + 1] == "python /opt/requirements/locked.py /opt/requirements/constraints.txt"
            if "pip install" in run:
                assert run.startswith("--mount=type=secret,id=netrc,target=/root/.netrc "), run
    assert installs == 4


def test_the_constraints_pin_jupyterlab_and_what_checks_its_token():
    pins = {canonicalize_name(r.name): str(next(iter(r.specifier)).version) for r in requirement_lines(CONSTRAINTS)}
    assert {"jupyterlab", "jupyter-server", "tornado", "traitlets", "pip", "setuptools", "triton",
            "nvidia-cudnn-cu12"} <= set(pins)
    assert len(pins) > 130  # the whole closure, not only the direct requirements


def test_locked_fails_on_a_distribution_the_constraints_do_not_pin(tmp_path):
    installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    complete = tmp_path / "complete.txt"
    complete.write_text("# pins\n" + "\n".join(installed) + "\n")
    result = subprocess.run([sys.executable, LOCKED, complete], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    name, version = installed[0].split("==")
    missing = tmp_path / "missing.txt"
    missing.write_text("\n".join(installed[1:]) + "\n")
    result = subprocess.run([sys.executable, LOCKED, missing], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"is installed but {missing} does not pin it" in result.stderr
    other = tmp_path / "other.txt"
    other.write_text("\n".join([f"{name}==0.0.0.dev0", *installed[1:]]) + "\n")
    result = subprocess.run([sys.executable, LOCKED, other], capture_output=True, text=True)
    assert result.returncode == 1 and f"{version} is installed but {other} pins 0.0.0.dev0" in result.stderr


def test_every_requirement_is_pinned_to_a_version_that_satisfies_it():
    pins = {}
    for requirement in requirement_lines(CONSTRAINTS):
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{requirement} is not an exact pin"
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    for path in (ROOT / "requirements.txt", ROOT / "requirements-dev.txt", ROOT / "requirements-export.txt"):
        for requirement in requirement_lines(path):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{path.name}: {requirement} has no pin in docker/constraints.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                f"{path.name} asks for {requirement}, docker/constraints.txt pins {pins[name]}"


def test_cuda_version_of_base_image_wheel_index_and_torch_pins_agree(dockerfile):
    image = dockerfile["stages"]["base"]["from"]
    major, minor = re.search(r":(\d+)\.(\d+)\.", image).groups()
    cuda_tag = f"cu{major}{minor}"
    index = arg_defaults(dockerfile["stages"]["base"]["instructions"])["TORCH_INDEX_URL"]
    assert index == f"https://download.pytorch.org/whl/{cuda_tag}"
    local_tags = {canonicalize_name(r.name): Version(next(iter(r.specifier)).version).local
                  for r in requirement_lines(CONSTRAINTS)}
    assert local_tags["torch"] == local_tags["torchvision"] == cuda_tag


# ---------------------------------------------------------------------------------------------------------
# The build context

def dockerignore_patterns():
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pattern_regex(pattern):
    """Docker's .dockerignore syntax (Go's filepath.Match plus **) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def excluded_from_context(path, patterns):
    """Whether Docker leaves the path out: the last matching pattern decides, a match on a parent folder
    counts, and a leading ! re-includes."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("path", [
    ".git/HEAD", "data/imagenet/train/n01440764/a.JPEG", "runs/r50/checkpoint.pth",
    "segmentation/runs/voc/log.jsonl", "output/best.pth", "best.pth", "weights/model.safetensors",
    "runs/r50/tb/events.out.tfevents.1732540000.host", ".env", "docker/.env.local", "id_ed25519",
    "keys/id_rsa.pub", "home/.ssh/authorized_keys", "authorized_keys", "tls/server.key", "certs/ca.pem",
    "classification/__pycache__/train.cpython-311.pyc", ".pytest_cache/v/cache/nodeids",
    "jupyter_token", "secrets/jupyter_token", ".aws/credentials", ".pypirc", ".ssh/id_ed25519", ".docker/config.json",
    ".kube/config", ".config/gcloud/credentials.db", "certs/client.pfx", ".ci/venv/bin/jupyter", "wandb/run-1/files",
])
def test_dockerignore_keeps_out(path):
    assert excluded_from_context(path, dockerignore_patterns())


@pytest.mark.parametrize("path", [
    "classification/train.py", "classification/data.py", "segmentation/data.py", "common/engine.py",
    "requirements.txt", "requirements-dev.txt", "docker/entrypoint.sh", "docker/constraints.txt",
    "docker/healthcheck.py", "tools/check_env.py", "tests/conftest.py", "README.md",
])
def test_dockerignore_keeps_the_code(path):
    assert not excluded_from_context(path, dockerignore_patterns())


def test_everything_the_dockerfile_copies_is_in_the_context(dockerfile):
    patterns = dockerignore_patterns()
    for keyword, arguments in dockerfile["instructions"]:
        if keyword == "COPY":
            sources = [word for word in arguments.split() if not word.startswith("--")][:-1]
            for source in sources:
                if source != ".":
                    assert (ROOT / source).is_file(), source
                    assert not excluded_from_context(source, patterns), source


def test_no_tracked_file_is_left_out_of_the_image():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout, so there is no list of tracked files")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    patterns = dockerignore_patterns()
    assert [path for path in tracked.stdout.splitlines() if excluded_from_context(path, patterns)] == []


# ---------------------------------------------------------------------------------------------------------
# Linters and documentation

@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed: pip install -r requirements-dev.txt")
def test_hadolint_finds_nothing():
    result = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed: pip install -r requirements-dev.txt")
def test_shellcheck_finds_nothing():
    result = subprocess.run(["shellcheck", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_strict_bash_and_ends_in_exec():
    lines = ENTRYPOINT.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    main_body = ENTRYPOINT.read_text().split("\nmain() {\n", 1)[1].split("\n}\n", 1)[0]
    # Nothing to supervise: the command replaces the entrypoint; otherwise the entrypoint waits for it.
    assert '        exec "$@"' in main_body.splitlines()
    assert main_body.strip().splitlines()[-1].strip() == "supervise"
    assert lines[-1] == 'main "$@"'


def test_readme_documents_every_target_and_setting():
    readme = (ROOT / "docker" / "README.md").read_text()
    for target in ("base", "full", "dev"):
        assert f"--target {target}" in readme
    for flag in ("--gpus all", "--shm-size=8g", "--ipc=host", "-p 127.0.0.1:8888:8888", "-p 2222:2222",
                 "--build-arg USER_UID=$(id -u)", "torchrun", "570.124.06"):
        assert flag in readme, flag
    # Not what the SSH session script that the entrypoint writes reads: that is the session's.
    text = re.sub(r"<<SESSION\n.*?\nSESSION\n", "", ENTRYPOINT.read_text(), flags=re.S)
    settings = set(re.findall(r"\$\{(\w+):-", text))
    settings |= set(re.findall(r"\[\[ -v (\w+)", text))
    assert {"SHM_DIR", "START_JUPYTER", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE", "SSH_PUBLIC_KEY",
            "SSH_AUTHORIZED_KEYS_FILE"} <= settings  # the patterns found them
    assert [name for name in sorted(settings) if f"`{name}`" not in readme] == []


# ---------------------------------------------------------------------------------------------------------
# docker/healthcheck.py

def healthcheck(services_file):
    env = {**os.environ, "SERVICES_FILE": str(services_file)}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, env=env, timeout=30)


@contextlib.contextmanager
def fake_jupyter_api(token, open_to_all=False):
    """An HTTP server on a free port that answers /api/status as Jupyter does (or as one without
    authentication would); yields the port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            allowed = open_to_all or self.headers.get("Authorization") == f"token {token}"
            self.send_response(200 if allowed else 403)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_asks_jupyter_with_and_without_its_token(tmp_path):
    services = tmp_path / "services"
    assert healthcheck(services).returncode == 0  # nothing started (yet)
    with fake_jupyter_api("the-token") as port:
        services.write_text(f"jupyter {port} the-token\n")
        assert healthcheck(services).returncode == 0
        services.write_text(f"jupyter {port} another-token\n")
        result = healthcheck(services)
        assert result.returncode == 1 and f"jupyter answers HTTP 403 on port {port} with its token" in result.stdout
    with fake_jupyter_api("the-token", open_to_all=True) as port:
        services.write_text(f"jupyter {port} the-token\n")
        result = healthcheck(services)
        assert result.returncode == 1 and "without the token: authentication is off" in result.stdout
    result = healthcheck(services)  # the same port, closed now
    assert result.returncode == 1 and f"jupyter does not answer HTTP on port {port}" in result.stdout


def test_healthcheck_finds_sshd_among_listening_sockets_without_connecting(tmp_path):
    services = tmp_path / "services"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        services.write_text(f"sshd {port}\n")
        assert healthcheck(services).returncode == 0
        listening.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listening.accept()  # no connection was made, so sshd logs nothing
    result = healthcheck(services)
    assert result.returncode == 1 and f"sshd does not listen on port {port}" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# The entrypoint, run by bash

STAND_INS = {
    # Records its environment's token settings and its arguments, one per line, then answers HTTP on its
    # --ServerApp.port as Jupyter does: 403 without the token, 200 with it (200 to everyone with
    # FAKE_JUPYTER_OPEN=1, as a Jupyter whose authentication a configuration file switched off). It ends once
    # it has served a request with the token, the entrypoint's check, unless FAKE_JUPYTER_STAY=1.
    "jupyter": f"""#!{sys.executable}
import http.server, os, sys
with open(os.path.join(os.environ["RECORD_DIR"], "jupyter"), "w") as record:
    print("token=" + os.environ.get("JUPYTER_TOKEN", "<unset>"), file=record)
    print("token_file=" + os.environ.get("JUPYTER_TOKEN_FILE", "<unset>"), file=record)
    for arg in sys.argv[1:]:
        print("arg=" + arg, file=record)
port = int(next(a for a in sys.argv if a.startswith("--ServerApp.port=")).split("=")[1])
done = False

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global done
        authenticated = self.headers.get("Authorization") == "token " + os.environ["JUPYTER_TOKEN"]
        self.send_response(200 if authenticated or os.environ.get("FAKE_JUPYTER_OPEN") == "1" else 403)
        self.end_headers()
        done = authenticated and os.environ.get("FAKE_JUPYTER_STAY") != "1"

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", port), Handler)
while not done:
    server.handle_request()
""",
    # Appends one line per call; `sshd -t` and `-T` go to the real sshd when REAL_SSHD names one.
    "sshd": """#!/bin/sh
echo "$*" >> "$RECORD_DIR/sshd"
case "$1" in -t|-T) if [ -n "$REAL_SSHD" ]; then exec "$REAL_SSHD" "$@"; fi ;; esac
exit 0
""",
    # POSIX df output for a /dev/shm of FAKE_SHM_KIB kibibytes.
    "df": """#!/bin/sh
echo "Filesystem 1024-blocks Used Available Capacity Mounted on"
echo "shm $FAKE_SHM_KIB 0 $FAKE_SHM_KIB 0% /dev/shm"
""",
    "python3": "#!/bin/sh\nexit 1\n",  # a python3 without torch, or broken
}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Sandbox:
    """A home, a record folder and a bin folder of stand-ins for one entrypoint run."""

    def __init__(self, root, stand_ins=("jupyter", "sshd")):
        self.root = root
        self.home, self.bin, self.records = root / "home", root / "bin", root / "records"
        for folder in (self.home, self.bin, self.records):
            folder.mkdir(parents=True, exist_ok=True)
        for name in stand_ins:
            self.add(name)
        self.services = root / "services"
        self.jupyter_port = free_port()

    def add(self, name):
        path = self.bin / name
        path.write_text(STAND_INS[name])
        path.chmod(0o755)

    def env(self, **settings):
        # Only /usr/bin and /bin besides the stand-ins: no sbin folder with a real sshd, no jupyter or
        # python of the outer environment unless a test adds one.
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
                "RECORD_DIR": str(self.records), "SERVICES_FILE": str(self.services), "STARTUP_REPORT": "0",
                "JUPYTER_PORT": str(self.jupyter_port), "TMPDIR": str(self.root), **settings}

    def run(self, *command, user=None, **settings):
        return subprocess.run([str(ENTRYPOINT), *command], capture_output=True, text=True, timeout=60,
                              env=self.env(**settings), cwd=self.root, stdin=subprocess.DEVNULL, user=user,
                              group=user, extra_groups=[] if user is not None else None)

    def record(self, name):
        path = self.records / name
        return path.read_text().splitlines() if path.exists() else None


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


def test_a_plain_command_is_execd_with_its_arguments(sandbox):
    script = 'echo "$$"; printf "<%s>" "$@"; exit 7'
    process = subprocess.Popen([str(ENTRYPOINT), "bash", "-c", script, "bash", "two words", "*", ""],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sandbox.env(),
                               cwd=sandbox.root)
    stdout, stderr = process.communicate(timeout=60)
    pid, arguments = stdout.splitlines()
    assert int(pid) == process.pid, "the command did not replace the entrypoint's process"
    assert arguments == "<two words><*><>"
    assert process.returncode == 7, stderr
    assert sandbox.record("jupyter") is None and sandbox.record("sshd") is None
    assert sandbox.services.read_text() == ""


def test_without_a_command_or_service_it_gives_a_shell(sandbox):
    result = subprocess.run([str(ENTRYPOINT)], input="echo shell:$0\n", capture_output=True, text=True,
                            env=sandbox.env(START_JUPYTER="0"), cwd=sandbox.root, timeout=60)
    assert result.returncode == 0 and result.stdout == "shell:bash\n", result.stderr


@pytest.mark.parametrize("shm_kib, warned", [(64 * 1024, True), (1024 * 1024 - 1, True), (8 * 1024 * 1024, False)])
def test_small_shared_memory_is_warned_about(sandbox, shm_kib, warned):
    sandbox.add("df")
    result = sandbox.run("true", FAKE_SHM_KIB=str(shm_kib))
    assert result.returncode == 0
    warning = f"warning: /dev/shm is {shm_kib // 1024} MiB"
    assert (warning in result.stderr) == warned, result.stderr
    if warned:
        assert "bus error" in result.stderr and "--shm-size=8g or --ipc=host" in result.stderr


def test_unreadable_shared_memory_is_warned_about(sandbox):
    result = sandbox.run("true", SHM_DIR=str(sandbox.root / "no-such-folder"))
    assert result.returncode == 0
    assert "cannot read the size of" in result.stderr and "--shm-size=8g" in result.stderr


def test_startup_report_names_torch_and_the_missing_driver(sandbox):
    python_folder = Path(sys.executable).parent
    env = sandbox.env(STARTUP_REPORT="1")
    env["PATH"] = f"{sandbox.bin}:{python_folder}:/usr/bin:/bin"
    result = subprocess.run([str(ENTRYPOINT), "true"], capture_output=True, text=True, env=env,
                            cwd=sandbox.root, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"entrypoint: torch {metadata.version('torch')}" in result.stderr
    assert ("nvidia-smi (index, name, memory, driver)" in result.stderr
            or "no NVIDIA driver in the container: start it with --gpus all" in result.stderr)


def test_startup_report_survives_a_python_without_torch(sandbox):
    sandbox.add("python3")
    result = sandbox.run("echo", "trained", STARTUP_REPORT="1")
    assert result.returncode == 0 and result.stdout == "trained\n"
    assert "torch: python3 cannot import it" in result.stderr


# Jupyter ------------------------------------------------------------------------------------------------

def jupyter_call(sandbox):
    lines = sandbox.record("jupyter")
    assert lines is not None, "jupyter was not started"
    values = dict(line.split("=", 1) for line in lines if not line.startswith("arg="))
    return values, [line[4:] for line in lines if line.startswith("arg=")]


def test_jupyter_gets_a_generated_token_printed_once(sandbox):
    result = sandbox.run()  # no command: JupyterLab takes the foreground
    assert result.returncode == 0, result.stderr
    values, arguments = jupyter_call(sandbox)
    token, port = values["token"], sandbox.jupyter_port
    assert re.fullmatch(r"[0-9a-f]{32,}", token), token
    assert result.stderr.count(token) == 1
    assert f"http://127.0.0.1:{port}/?token={token}" in result.stderr
    assert arguments[0] == "lab" and "--ServerApp.ip=0.0.0.0" in arguments
    assert f"--ServerApp.port={port}" in arguments and "--ServerApp.port_retries=0" in arguments
    assert not any(token in argument for argument in arguments), "the token must not show in ps"
    # The token is set by the configuration file Jupyter reads last, from the environment.
    (config,) = [argument.split("=", 1)[1] for argument in arguments if argument.startswith("--config=")]
    assert 'c.IdentityProvider.token = os.environ["JUPYTER_TOKEN"]' in Path(config).read_text().splitlines()
    assert sandbox.services.read_text() == f"jupyter {port} {token}\n"
    assert stat.S_IMODE(sandbox.services.stat().st_mode) == 0o600
    sandbox.run()
    assert jupyter_call(sandbox)[0]["token"] != token, "two containers got the same token"


def test_empty_jupyter_token_is_refused(sandbox):
    for command in ((), ("true",)):  # refused also when the command, not the entrypoint, would start Jupyter
        result = sandbox.run(*command, JUPYTER_TOKEN="")
        assert result.returncode == 2
        assert "error: JUPYTER_TOKEN is empty, which would run Jupyter without authentication" in result.stderr
    assert sandbox.record("jupyter") is None


def test_jupyter_token_is_passed_through_and_not_printed(sandbox):
    result = sandbox.run(JUPYTER_TOKEN="chosen-by-the-user-0123456789abcdef")
    assert result.returncode == 0, result.stderr
    assert jupyter_call(sandbox)[0]["token"] == "chosen-by-the-user-0123456789abcdef"
    assert "chosen-by-the-user" not in result.stderr and "?token=<your token>" in result.stderr


def test_jupyter_token_file_is_read(sandbox):
    token_file = sandbox.root / "jupyter_token"
    token_file.write_text("from-a-mounted-secret-file-0123456789\r\n")
    result = sandbox.run(JUPYTER_TOKEN_FILE=str(token_file))
    assert result.returncode == 0, result.stderr
    values, _ = jupyter_call(sandbox)
    assert values == {"token": "from-a-mounted-secret-file-0123456789", "token_file": "<unset>"}
    assert "from-a-mounted-secret-file" not in result.stderr


@pytest.mark.parametrize("token", ["a", "x" * 31])
def test_a_short_chosen_token_is_refused(sandbox, token):
    result = sandbox.run(JUPYTER_TOKEN=token)
    assert result.returncode == 2
    assert f"error: JUPYTER_TOKEN has {len(token)} characters; a chosen token needs at least 32" in result.stderr
    token_file = sandbox.root / "jupyter_token"
    token_file.write_text(token + "\n")
    result = sandbox.run(JUPYTER_TOKEN_FILE=str(token_file))
    assert result.returncode == 2 and "the token in JUPYTER_TOKEN_FILE has" in result.stderr
    assert sandbox.record("jupyter") is None


def test_a_jupyter_that_answers_without_the_token_stops_the_container(sandbox):
    result = sandbox.run("echo", "trained", START_JUPYTER="1", FAKE_JUPYTER_OPEN="1", FAKE_JUPYTER_STAY="1")
    assert result.returncode == 2 and result.stdout == "", "the command must not run"
    assert "error: JupyterLab answered a request without the token with HTTP 200" in result.stderr
    assert "token=" not in result.stderr.replace("?token=<", "")  # no URL printed for a server open to all


def test_a_jupyter_that_exits_at_start_stops_the_container(sandbox):
    (sandbox.bin / "jupyter").write_text("#!/bin/sh\necho 'port is in use' >&2\nexit 1\n")
    result = sandbox.run("echo", "trained", START_JUPYTER="1")
    assert result.returncode == 2 and result.stdout == ""
    assert "port is in use" in result.stderr and "JupyterLab exited before it answered" in result.stderr


@pytest.mark.parametrize("content, settings, message", [
    ("\n", {}, "is empty, which would run Jupyter without authentication"),
    (None, {}, "is not a readable file"),
    ("a-token", {"JUPYTER_TOKEN": "another"}, "JUPYTER_TOKEN and JUPYTER_TOKEN_FILE are both set"),
])
def test_bad_jupyter_token_file_is_refused(sandbox, content, settings, message):
    token_file = sandbox.root / "jupyter_token"
    if content is not None:
        token_file.write_text(content)
    result = sandbox.run(JUPYTER_TOKEN_FILE=str(token_file), **settings)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sandbox.record("jupyter") is None


def test_jupyter_only_on_request_when_a_command_is_given(sandbox):
    result = sandbox.run("echo", "trained")
    assert result.stdout == "trained\n" and sandbox.record("jupyter") is None
    # START_JUPYTER=1: Jupyter in the background, the command in the foreground (which waits for it here).
    wait_for_jupyter = 'for _ in $(seq 200); do [ -s "$RECORD_DIR/jupyter" ] && exit 0; sleep 0.05; done; exit 1'
    result = sandbox.run("bash", "-c", wait_for_jupyter, START_JUPYTER="1")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[0-9a-f]{32,}", jupyter_call(sandbox)[0]["token"])


@pytest.mark.skipif(shutil.which("jupyter", path="/usr/bin:/bin") is not None,
                    reason="a jupyter in /usr/bin, which the entrypoint's PATH in these tests includes")
def test_start_jupyter_without_jupyter_is_an_error(sandbox):
    (sandbox.bin / "jupyter").unlink()
    result = sandbox.run("true", START_JUPYTER="1")
    assert result.returncode == 2 and "this image has no JupyterLab" in result.stderr
    result = sandbox.run("true", START_JUPYTER="maybe")
    assert result.returncode == 2 and "START_JUPYTER must be 1, 0 or auto" in result.stderr


# SSH ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def key_pair(tmp_path_factory):
    if SSH_KEYGEN is None:
        pytest.skip("ssh-keygen not found (openssh-client): the entrypoint checks keys with it")
    folder = tmp_path_factory.mktemp("client")
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "tester@laptop", "-f", folder / "id_ed25519"],
                   check=True)
    return (folder / "id_ed25519.pub").read_text().strip(), (folder / "id_ed25519").read_text()


def test_no_key_no_sshd(sandbox):
    result = sandbox.run("echo", "trained")
    assert result.returncode == 0 and result.stdout == "trained\n"
    assert sandbox.record("sshd") is None
    assert "sshd not started: no public key" in result.stderr
    assert not (sandbox.home / ".sshd").exists()


def sshd_files(sandbox):
    folder = sandbox.home / ".sshd"
    return folder, folder / "sshd_config", folder / "authorized_keys", folder / "ssh_host_ed25519_key"


def fingerprint(path):
    return subprocess.run([SSH_KEYGEN, "-l", "-f", path], capture_output=True, text=True, check=True).stdout


@needs_ssh_keygen
def test_key_from_the_environment_starts_key_only_sshd(sandbox, key_pair):
    public_key, _ = key_pair
    result = sandbox.run(SSH_PUBLIC_KEY=public_key, START_JUPYTER="0")  # no command: sshd in the foreground
    assert result.returncode == 0, result.stderr
    folder, config, authorized_keys, host_key = sshd_files(sandbox)
    assert sandbox.record("sshd") == [f"-t -f {config}", f"-D -e -f {config}"]
    settings = set(config.read_text().splitlines())
    assert {"Port 2222", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no",
            "PermitEmptyPasswords no", "AuthenticationMethods publickey", "UsePAM no",
            f"AuthorizedKeysFile {authorized_keys}", f"HostKey {host_key}", "AllowAgentForwarding no",
            "AllowTcpForwarding local", "PermitOpen localhost:* 127.0.0.1:* [::1]:*", "X11Forwarding no",
            "PermitTunnel no", "AllowStreamLocalForwarding no", "PermitUserEnvironment no"} <= settings
    (force,) = [line.split(" ", 1)[1] for line in settings if line.startswith("ForceCommand ")]
    session = Path(force)
    assert session.parent != folder, "the session's environment must not land in a volume"
    assert stat.S_IMODE(session.stat().st_mode) == 0o700
    assert authorized_keys.read_text() == public_key + "\n"
    assert stat.S_IMODE(authorized_keys.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert "(ED25519)" in fingerprint(host_key)
    assert sandbox.services.read_text() == "sshd 2222\n"
    first = fingerprint(host_key)
    assert first.split()[1] in result.stderr  # the host key's fingerprint, to compare on first connection
    assert sandbox.run(SSH_PUBLIC_KEY=public_key, START_JUPYTER="0").returncode == 0
    assert fingerprint(host_key) == first, "a restart must keep the container's host key"


@needs_ssh_keygen
def test_key_from_the_mounted_authorized_keys_file(sandbox, key_pair):
    public_key, _ = key_pair
    mounted = sandbox.home / ".ssh" / "authorized_keys"
    mounted.parent.mkdir()
    mounted.write_text(f"# my laptop\n\n{public_key}\r\n")
    result = sandbox.run(SSHD_PORT="2022", START_JUPYTER="0")
    assert result.returncode == 0, result.stderr
    _, config, authorized_keys, _ = sshd_files(sandbox)
    assert authorized_keys.read_text() == public_key + "\n"
    assert "Port 2022" in config.read_text().splitlines()


@needs_ssh_keygen
@pytest.mark.parametrize("bad_key, message", [
    ("private", "holds a private key: give the public one"),
    ("ssh-ed25519 not-base64-at-all tester", "has a line that is not an SSH public key"),
])
def test_a_key_that_is_not_a_public_key_stops_the_container(sandbox, key_pair, bad_key, message):
    key = key_pair[1] if bad_key == "private" else bad_key
    result = sandbox.run("true", SSH_PUBLIC_KEY=key)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sandbox.record("sshd") is None


def test_a_named_key_file_that_is_missing_stops_the_container(sandbox):
    result = sandbox.run("true", SSH_AUTHORIZED_KEYS_FILE=str(sandbox.root / "missing"))
    assert result.returncode == 2 and "does not exist: mount your public key there" in result.stderr


@needs_ssh_keygen
def test_a_key_for_an_image_without_sshd_is_an_error(sandbox, key_pair):
    (sandbox.bin / "sshd").unlink()
    result = sandbox.run("true", SSH_PUBLIC_KEY=key_pair[0])
    assert result.returncode == 2 and "this image has no SSH server" in result.stderr


@needs_ssh_keygen
@needs_real_sshd
def test_real_sshd_accepts_the_configuration_and_allows_keys_only(key_pair):
    # The image runs sshd as its non-root user. As root, sshd would also want its privilege-separation
    # user and /run/sshd, which only an installed and started openssh-server has; so a root test runs the
    # entrypoint as nobody, in a folder nobody can use.
    user = 65534 if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="entrypoint-sshd-"))
    try:
        sandbox = Sandbox(root)
        if user is not None:
            for path in [root, *root.rglob("*")]:
                os.chown(path, user, user)
        result = sandbox.run("true", user=user, SSH_PUBLIC_KEY=key_pair[0], REAL_SSHD=REAL_SSHD)
        assert result.returncode == 0, result.stderr
        _, config, _, _ = sshd_files(sandbox)
        assert sandbox.record("sshd")[0] == f"-t -f {config}"  # the entrypoint's own check, by the real sshd
        effective = subprocess.run([REAL_SSHD, "-T", "-f", str(config)], capture_output=True, text=True,
                                   user=user, group=user, extra_groups=[] if user is not None else None)
        assert effective.returncode == 0, effective.stderr
        settings = set(effective.stdout.splitlines())
        assert {"passwordauthentication no", "permitrootlogin no", "kbdinteractiveauthentication no",
                "pubkeyauthentication yes", "authenticationmethods publickey", "permitemptypasswords no",
                "usepam no", "port 2222", "allowagentforwarding no", "allowtcpforwarding local",
                "x11forwarding no", "permittunnel no", "allowstreamlocalforwarding no"} <= settings
        assert "permitopen localhost:* 127.0.0.1:* [::1]:*" in settings
    finally:
        shutil.rmtree(root)
