"""docker/ checked without a Docker engine: the linters, the parsed Dockerfile, the requirement files it
installs, the build context, the HEALTHCHECK script, and docker/services.py's pieces called directly (the token
rules, the keys, the SSH session's environment, signal forwarding and reaping).

tests/test_docker_image.py runs the built images instead: what these tests cannot show (that the image builds,
that Jupyter, sshd and tini behave so inside a container) is proved there.
"""
import contextlib
import http.server
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
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
SERVICES = ROOT / "docker" / "services.py"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
LOCKED = ROOT / "docker" / "locked.py"
TARGETS = ("base", "full", "dev")

sys.path.insert(0, str(ROOT / "docker"))
import services  # noqa: E402  (docker/ is no package: the image runs it as a script)

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(
    SSH_KEYGEN is None, reason="ssh-keygen not found (openssh-client): services.py checks keys with it")


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


def chain(dockerfile, name):
    """The stages a target is built from, the target last."""
    stage = dockerfile["stages"][name]
    return (chain(dockerfile, stage["from"]) if stage["from"] in dockerfile["stages"] else []) + [stage]


def test_each_target_ends_with_the_code_on_a_stage_without_it(dockerfile):
    assert dockerfile["order"] == ["torch", "base", "services", "full", "dev"]
    assert [s["name"] for s in chain(dockerfile, "dev")] == ["torch", "services", "dev"]
    assert [s["name"] for s in chain(dockerfile, "full")] == ["torch", "services", "full"]
    assert [s["name"] for s in chain(dockerfile, "base")] == ["torch", "base"]
    code = ("COPY", "--chown=${USER_UID}:${USER_GID} . /workspace")
    for name in dockerfile["order"]:
        copies = dockerfile["stages"][name]["instructions"].count(code)
        # A change to the code rebuilds that one layer, never torch or JupyterLab.
        assert copies == (1 if name in TARGETS else 0), name
        if name in TARGETS:
            assert dockerfile["stages"][name]["instructions"][-1] == code, name


def test_from_is_the_cuda_base_image_pinned_by_digest_unless_another_base_is_given(dockerfile):
    defaults = arg_defaults(dockerfile["preamble"])
    declared = [arguments for keyword, arguments in dockerfile["preamble"] if keyword == "ARG"]
    assert dockerfile["stages"]["torch"]["from"] == "${BASE_IMAGE}"
    # A full x.y.z CUDA version, the smallest variant (torch's wheels bring CUDA, cuDNN and NCCL), and the
    # digest, which is what Docker pulls: a build argument without a default, whose absence the build names.
    cuda = r"nvidia/cuda:\d+\.\d+\.\d+-base-ubuntu22\.04"
    assert re.fullmatch(cuda + r"@\$\{CUDA_BASE_DIGEST:-no-CUDA_BASE_DIGEST-given\}", defaults["BASE_IMAGE"])
    assert "CUDA_BASE_DIGEST" in declared and "CUDA_BASE_DIGEST" not in defaults
    assert "latest" not in defaults["BASE_IMAGE"]


def test_every_target_runs_as_a_numeric_non_root_user(dockerfile):
    variables = arg_defaults(dockerfile["preamble"])
    for target in TARGETS:
        users = [arguments for stage in chain(dockerfile, target) for keyword, arguments in stage["instructions"]
                 if keyword == "USER"]
        uid, _, gid = expand(users[-1], variables).partition(":")
        assert uid.isdigit() and int(uid) != 0, f"{target} ends as USER {users[-1]}"
        assert gid.isdigit(), f"{target} ends as USER {users[-1]}"


def test_tini_is_pid_1_and_every_target_has_the_entrypoint(dockerfile):
    entrypoints = [arguments for keyword, arguments in dockerfile["instructions"] if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "one ENTRYPOINT, in the first stage, inherited by every target"
    command = json.loads(entrypoints[0])  # exec form: no shell in between to swallow signals
    assert Path(command[0]).name == "tini" and command[1] == "--"
    assert command[2] == "/usr/local/bin/entrypoint.sh"
    assert any(re.search(r"apt-get install .*\btini\b", run) for run in runs(dockerfile["stages"]["torch"]))
    for target, scripts in (("base", "docker/entrypoint.sh"),
                            ("full", "docker/entrypoint.sh docker/services.py docker/healthcheck.py"),
                            ("dev", "docker/entrypoint.sh docker/services.py docker/healthcheck.py")):
        assert ("COPY", f"--chmod=755 {scripts} /usr/local/bin/") in dockerfile["stages"][target]["instructions"]


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


def test_full_and_dev_have_the_ports_a_healthcheck_and_no_baked_host_keys(dockerfile):
    services_stage = dockerfile["stages"]["services"]["instructions"]
    exposed = [arguments.split() for keyword, arguments in services_stage if keyword == "EXPOSE"]
    assert exposed == [["8888", "2222"]]
    healthchecks = [arguments for keyword, arguments in services_stage if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    command = healthchecks[0].split(" CMD ", 1)[1]
    assert json.loads(command)[-1] == "/usr/local/bin/healthcheck.py"  # exec form, no shell
    ssh_install = [run for run in runs(dockerfile["stages"]["services"]) if "openssh-server" in run]
    assert len(ssh_install) == 1 and "rm -f /etc/ssh/ssh_host_*" in ssh_install[0]
    assert not any("ssh-keygen" in run for stage in dockerfile["stage_list"] for run in runs(stage))
    assert {"gcc", "g++", "python3-dev"} <= set(ssh_install[0].split())


def test_user_ids_are_build_args_and_the_workspace_is_theirs(dockerfile):
    torch_stage = dockerfile["stages"]["torch"]
    defaults = arg_defaults(dockerfile["preamble"])
    assert defaults["USER_UID"].isdigit() and defaults["USER_GID"].isdigit()
    user_setup = next(run for run in runs(torch_stage) if "useradd" in run)
    assert '--uid "$USER_UID"' in user_setup and '--gid "$USER_GID"' in user_setup
    assert '-o "$USER_UID" -g "$USER_GID" /workspace' in user_setup
    assert 'if [ "$USER_UID" -eq 0 ]; then' in user_setup  # refused: the image runs as a non-root user


# ---------------------------------------------------------------------------------------------------------
# The requirement files the image installs are the repository's own

def requirement_lines(path):
    for raw in path.read_text().splitlines():
        text = raw.split("#", 1)[0].strip()
        if text and not text.startswith("-"):
            yield Requirement(text)


def test_the_image_installs_the_repository_requirement_files(dockerfile):
    base, dev = dockerfile["stages"]["torch"], dockerfile["stages"]["dev"]
    assert ("COPY", "docker/constraints.txt docker/locked.py /opt/requirements/") in base["instructions"]
    assert ("COPY", "requirements.txt /opt/requirements/") in base["instructions"]
    assert ("COPY", "requirements-dev.txt requirements-export.txt requirements-report.txt /opt/requirements/") in \
        dev["instructions"]
    install = next(run for run in runs(base) if "-r /opt/requirements/requirements.txt" in run)
    assert "-c /opt/requirements/constraints.txt" in install
    assert '--extra-index-url "$TORCH_INDEX_URL"' in install
    dev_install = next(run for run in runs(dev) if "pip install" in run)
    assert "-r /opt/requirements/requirements-dev.txt -c /opt/requirements/constraints.txt" in dev_install
    # requirements-dev.txt names the other three relatively, so all four must sit side by side in the image.
    dev_lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev_lines and "-r requirements-export.txt" in dev_lines
    assert "-r requirements-report.txt" in dev_lines


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
                # A mirror's credentials and a TLS proxy's CA bundle reach pip as secrets, in no layer.
                assert run.startswith("--mount=type=secret,id=netrc,target=/root/.netrc "
                                      "--mount=type=secret,id=pip-ca "), run
                assert ("ARG", "PIP_CERT") in stage["instructions"], f"stage {stage['name']} does not see it"
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
    for path in (ROOT / "requirements.txt", ROOT / "requirements-dev.txt", ROOT / "requirements-export.txt",
                 ROOT / "requirements-report.txt"):
        for requirement in requirement_lines(path):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{path.name}: {requirement} has no pin in docker/constraints.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                f"{path.name} asks for {requirement}, docker/constraints.txt pins {pins[name]}"


def test_cuda_version_of_base_image_wheel_index_and_torch_pins_agree(dockerfile):
    image = arg_defaults(dockerfile["preamble"])["BASE_IMAGE"]
    major, minor = re.search(r":(\d+)\.(\d+)\.", image).groups()
    cuda_tag = f"cu{major}{minor}"
    torch_stage = dockerfile["stages"]["torch"]
    defaults = arg_defaults(torch_stage["instructions"])
    assert defaults["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/{cuda_tag}"
    local_tags = {canonicalize_name(r.name): Version(next(iter(r.specifier)).version).local
                  for r in requirement_lines(CONSTRAINTS)}
    assert local_tags["torch"] == local_tags["torchvision"] == cuda_tag
    assert [name for name, tag in local_tags.items() if tag] == ["torch", "torchvision"]
    # TORCH_LOCAL_VERSION replaces the label (CI's PyPI wheels have none), and only that label.
    assert defaults["TORCH_LOCAL_VERSION"] == f"+{cuda_tag}"
    assert any(f'sed -i "s/+{cuda_tag}\\$/${{TORCH_LOCAL_VERSION}}/" /opt/requirements/constraints.txt' in run
               for run in runs(torch_stage))


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
    ".kube/config", ".config/gcloud/credentials.db", "certs/client.pfx", "wandb/run-1/files",
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


def test_entrypoint_is_strict_sh_and_becomes_the_command_or_the_supervisor():
    lines = ENTRYPOINT.read_text().splitlines()
    assert lines[0] == "#!/bin/sh" and "set -eu" in lines
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    # tini's child is the command itself (base), or services.py (full, dev), never a shell left waiting.
    assert "    exec /usr/bin/python3 /usr/local/bin/services.py \"$@\"" in lines
    assert lines[-1] == 'exec "$@"'


def test_readme_documents_every_target_and_setting():
    readme = (ROOT / "docker" / "README.md").read_text()
    for target in ("base", "full", "dev"):
        assert f"--target {target}" in readme
    for flag in ("--gpus all", "--shm-size=8g", "--ipc=host", "-p 127.0.0.1:8888:8888", "-p 2222:2222",
                 "--build-arg USER_UID=$(id -u)", "torchrun", "570.124.06"):
        assert flag in readme, flag
    # What services.py and the entrypoint read from the environment, less what every process has. Not what
    # the SSH session script that services.py writes reads: that is the session's.
    code = re.sub(r'file\.write\(f"""#!/bin/sh.*?"""\)', "", SERVICES.read_text(), flags=re.S)
    settings = set(re.findall(r'environ(?:\.get\(|\[)"(\w+)"', code)) | set(re.findall(r'"(\w+)" in environ', code))
    settings |= set(re.findall(r"\$\{([A-Z_]+):-", ENTRYPOINT.read_text()))
    settings -= {"HOME", "PATH"}
    assert {"START_JUPYTER", "JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE", "SSH_PUBLIC_KEY", "SSH_AUTHORIZED_KEYS_FILE",
            "JUPYTER_PORT", "SSHD_PORT"} <= settings  # the patterns found them
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
# docker/services.py, its pieces called directly

def test_a_generated_jupyter_token_is_long_and_new_each_time():
    (first, generated), (second, _) = services.jupyter_token({}), services.jupyter_token({})
    assert generated and re.fullmatch(r"[0-9a-f]{48}", first) and first != second


def test_a_chosen_jupyter_token_comes_from_the_environment_or_the_first_line_of_a_file(tmp_path):
    chosen = "chosen-by-the-user-0123456789abcdef"
    assert services.jupyter_token({"JUPYTER_TOKEN": chosen}) == (chosen, False)
    token_file = tmp_path / "jupyter_token"
    token_file.write_text(f"{chosen}\r\nsecond line\n")
    assert services.jupyter_token({"JUPYTER_TOKEN_FILE": str(token_file)}) == (chosen, False)


@pytest.mark.parametrize("environ, message", [
    ({"JUPYTER_TOKEN": ""}, "JUPYTER_TOKEN is empty, which would run Jupyter without authentication"),
    ({"JUPYTER_TOKEN": "a"}, "JUPYTER_TOKEN has 1 characters; a chosen token needs at least 32"),
    ({"JUPYTER_TOKEN": "x" * 31}, "JUPYTER_TOKEN has 31 characters; a chosen token needs at least 32"),
    ({"JUPYTER_TOKEN_FILE": "{folder}/empty"}, "the token in JUPYTER_TOKEN_FILE is empty"),
    ({"JUPYTER_TOKEN_FILE": "{folder}/short"}, "the token in JUPYTER_TOKEN_FILE has 5 characters"),
    ({"JUPYTER_TOKEN_FILE": "{folder}/missing"}, "/missing is not a readable file: mount it into the container"),
    ({"JUPYTER_TOKEN": "x" * 40, "JUPYTER_TOKEN_FILE": "{folder}/short"}, "both set: keep one"),
])
def test_an_empty_short_or_unreadable_jupyter_token_is_refused(tmp_path, environ, message):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "short").write_text("short\n")
    environ = {name: value.format(folder=tmp_path) for name, value in environ.items()}
    with pytest.raises(services.Refused, match=re.escape(message)):
        services.jupyter_token(environ)


@pytest.mark.parametrize("start_jupyter, command_given, has_jupyter, started", [
    ("auto", False, True, True), ("auto", True, True, False), ("auto", False, False, False),
    ("1", True, True, True), ("yes", True, True, True), ("0", False, True, False), ("false", False, True, False),
])
def test_jupyter_starts_without_a_command_or_on_request(start_jupyter, command_given, has_jupyter, started):
    assert services.wants_jupyter(start_jupyter, command_given, has_jupyter) == started


def test_start_jupyter_must_be_a_known_value_and_jupyter_must_be_there():
    with pytest.raises(services.Refused, match="START_JUPYTER must be 1, 0 or auto, not 'maybe'"):
        services.wants_jupyter("maybe", False, True)
    with pytest.raises(services.Refused, match="this image has no JupyterLab: use the full or dev image"):
        services.wants_jupyter("1", False, False)


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory):
    if SSH_KEYGEN is None:
        pytest.skip("ssh-keygen not found (openssh-client): services.py checks keys with it")
    folder = tmp_path_factory.mktemp("client")
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "tester@laptop", "-f", folder / "id_ed25519"],
                   check=True)
    return (folder / "id_ed25519.pub").read_text().strip(), (folder / "id_ed25519").read_text()


@needs_ssh_keygen
def test_public_keys_come_from_the_environment_and_the_mounted_file(tmp_path, key_pair):
    public_key, _ = key_pair
    mounted = tmp_path / "authorized_keys"
    mounted.write_text(f"# my laptop\n\n{public_key}\r\n")
    assert services.public_keys(public_key, str(mounted), False) == [public_key, public_key]
    assert services.public_keys("", str(tmp_path / "absent"), False) == []  # the default place is optional


@needs_ssh_keygen
@pytest.mark.parametrize("bad_key, message", [
    ("private", "SSH_PUBLIC_KEY holds a private key: give the public one"),
    ("ssh-ed25519 not-base64-at-all tester", "SSH_PUBLIC_KEY has a line that is not an SSH public key"),
])
def test_a_key_that_is_not_a_public_key_is_refused(tmp_path, key_pair, bad_key, message):
    with pytest.raises(services.Refused, match=message):
        services.public_keys(key_pair[1] if bad_key == "private" else bad_key, str(tmp_path / "absent"), False)


def test_a_named_key_file_that_is_missing_is_refused(tmp_path):
    with pytest.raises(services.Refused, match="does not exist: mount your public key there"):
        services.public_keys("", str(tmp_path / "missing"), True)


@needs_ssh_keygen
def test_sshd_configuration_is_key_only_and_the_host_key_is_kept(tmp_path, key_pair):
    folder = tmp_path / "sshd"
    config = Path(services.write_sshd_config(str(folder), 2022, "/tmp/session", [key_pair[0]]))
    settings = set(config.read_text().splitlines())
    assert {"Port 2022", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no",
            "AuthenticationMethods publickey", "UsePAM no", f"AuthorizedKeysFile {folder}/authorized_keys",
            "AllowAgentForwarding no", "AllowTcpForwarding local", "PermitOpen localhost:* 127.0.0.1:* [::1]:*",
            "X11Forwarding no", "PermitTunnel no", "AllowStreamLocalForwarding no", "PermitUserEnvironment no",
            "ForceCommand /tmp/session"} <= settings
    assert (folder / "authorized_keys").read_text() == key_pair[0] + "\n"
    assert stat.S_IMODE((folder / "authorized_keys").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    host_key = (folder / "ssh_host_ed25519_key.pub").read_text()
    services.write_sshd_config(str(folder), 2022, "/tmp/session", [key_pair[0]])  # a restart, a volume on ~/.sshd
    assert (folder / "ssh_host_ed25519_key.pub").read_text() == host_key


def test_an_ssh_session_gets_the_container_environment_exactly_less_the_token(tmp_path):
    awkward = "two words, 'quotes' \"and\" $dollars `ticks`\nand a second line"
    environ = {"PATH": os.environ["PATH"], "AWKWARD": awkward, "JUPYTER_TOKEN": "secret", "HOME": "/not/this",
               "SSH_AUTH_SOCK": "/not/this", "BASH_FUNC_x%%": "() { true; }"}
    session = services.write_ssh_session(str(tmp_path), environ, str(tmp_path))
    assert stat.S_IMODE(os.stat(session).st_mode) == 0o700
    remote = 'printf "%s|%s|%s|" "$AWKWARD" "${JUPYTER_TOKEN-unset}" "$HOME"; pwd'
    result = subprocess.run([session], capture_output=True, text=True, cwd="/", timeout=30,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/home/someone", "SHELL": "/bin/sh",
                                 "SSH_ORIGINAL_COMMAND": remote})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{awkward}|unset|/home/someone|{tmp_path}\n"


@contextlib.contextmanager
def status_server(status):
    """An HTTP server that answers every request with `status`; yields its port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            answer = status(self.headers.get("Authorization"))
            self.send_response(answer)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("answers, message", [
    (lambda header: 200, "answered a request without the token with HTTP 200"),
    (lambda header: 403, "refused its own token (HTTP 403)"),
    (lambda header: 200 if header == "token the-token" else 403, None),
])
def test_jupyter_must_refuse_requests_without_its_token_and_serve_it(answers, message):
    with status_server(answers) as port:
        if message is None:
            assert services.check_jupyter_authentication(port, "the-token", lambda: False, 5)
        else:
            with pytest.raises(services.Refused, match=re.escape(message)):
                services.check_jupyter_authentication(port, "the-token", lambda: False, 5)


def test_a_jupyter_that_exits_before_it_answers_is_told_apart():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    assert services.check_jupyter_authentication(port, "the-token", lambda: True, 5) is False
    with pytest.raises(services.Refused, match=f"did not answer on port {port} within 0.5 s"):
        services.check_jupyter_authentication(port, "the-token", lambda: False, 0.5)


# A child that writes the signals it gets into a file and exits with 75 on SIGTERM, as train.py does. It takes them
# one at a time with sigwaitinfo: Python runs a signal's handler inside the one of a signal that came just before,
# so a SIGTERM handler that exits could cut short the writing of a SIGUSR1 or SIGHUP (seen on a loaded machine).
# Once its mask is set it says "ready" through a FIFO the test waits on. (It signalled the test instead, until a
# thread of the test's process that did not block the signal took it, and its default action ended the worker.)
CHILD = """import signal, sys
taken = {signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP}
signal.pthread_sigmask(signal.SIG_SETMASK, taken)  # kept pending for sigwaitinfo; the rest of the test's mask undone
with open(sys.argv[1], "a") as record:
    record.write("ready\\n")
with open(sys.argv[3], "w") as ready:
    ready.write("ready")
while True:
    signum = signal.sigwaitinfo(taken).si_signo
    with open(sys.argv[1], "a") as record:
        record.write(signal.Signals(signum).name + "\\n")
    if signum == signal.SIGTERM:
        sys.exit(int(sys.argv[2]))
"""


def test_sigterm_reaches_every_child_other_signals_the_command_and_the_command_s_status_is_kept(tmp_path):
    children = services.Children()
    records = {name: tmp_path / name for name in ("service", "command")}
    ready = {}
    for name in records:  # opened before the children, whose open for writing waits for a reader
        os.mkfifo(tmp_path / f"{name}.ready")
        ready[name] = os.open(tmp_path / f"{name}.ready", os.O_RDONLY | os.O_NONBLOCK)
    children.start("service", [sys.executable, "-c", CHILD, records["service"], "0", tmp_path / "service.ready"],
                   service=True)
    command = children.start("command", [sys.executable, "-c", CHILD, records["command"], "75",
                                         tmp_path / "command.ready"], service=False)
    for fd in ready.values():  # readable once the child has written and closed its end
        assert select.select([fd], [], [], 60)[0], "the children did not start"
        os.close(fd)
    children.forward(signal.SIGUSR1)
    children.forward(signal.SIGHUP)
    children.forward(signal.SIGTERM)  # docker stop
    assert children.wait_for_foreground() == 75
    children.stop_all()
    assert children.running == {}
    # Pending signals arrive in the order of their numbers, not in the order sent.
    assert sorted(records["command"].read_text().split()) == ["SIGHUP", "SIGTERM", "SIGUSR1", "ready"]
    assert records["service"].read_text().split() == ["ready", "SIGTERM"]
    assert command not in [int(p) for p in os.listdir("/proc") if p.isdigit()]  # reaped, no zombie


def test_a_service_that_dies_is_reaped_and_the_command_goes_on(tmp_path, capsys):
    children = services.Children()
    service = children.start("sshd", [sys.executable, "-c", "import sys; sys.exit(3)"], service=True)
    # The command outlives the service: it ends once the service has exited, or has been reaped already.
    outlive = ("import os, select, sys\ntry:\n    select.select([os.pidfd_open(int(sys.argv[1]))], [], [])\n"
               "except ProcessLookupError:\n    pass")
    children.start("command", [sys.executable, "-c", outlive, str(service)], service=False)
    assert children.wait_for_foreground() == 0
    assert service not in children.running and children.running == {}
    assert "entrypoint: sshd exited (3); the HEALTHCHECK reports it" in capsys.readouterr().err


def test_without_a_service_the_command_replaces_the_supervisor(tmp_path):
    # No jupyter and no sshd on PATH, no key: nothing to look after, so services.py becomes the command.
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path), "SERVICES_FILE": str(tmp_path / "services")}
    process = subprocess.Popen([sys.executable, SERVICES, "/bin/sh", "-c", 'echo "$$"; exit 7'], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 7, stderr
    assert int(stdout) == process.pid, "the command did not replace services.py's process"
    result = subprocess.run([sys.executable, SERVICES, "true"], env={**env, "JUPYTER_TOKEN": ""},
                            capture_output=True, text=True, timeout=60)
    # Refused even when Jupyter is not started: a `jupyter lab` typed as the command would inherit it.
    assert result.returncode == 2 and result.stderr.startswith("error: JUPYTER_TOKEN is empty")


# ---------------------------------------------------------------------------------------------------------
# Docker's default /dev/shm of 64 MB, as the training scripts report it (common/log.py)

def test_a_dataloader_out_of_shared_memory_is_told_apart_from_other_errors():
    from common.log import dataloader_worker_failure

    # What torch raises when a worker dies of SIGBUS: the main process's error, caused by the SIGCHLD handler's.
    try:
        try:
            raise RuntimeError("DataLoader worker (pid 17) is killed by signal: Bus error. It is possible that "
                               "dataloader's workers are out of shared memory.")
        except RuntimeError as cause:
            raise RuntimeError("DataLoader worker (pid(s) 17) exited unexpectedly") from cause
    except RuntimeError as error:
        sigbus = error
    enospc = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\nRuntimeError: unable to write to file </torch_18693_3050002876_0>: No space left on "
                          "device (28)")
    for error in (sigbus, enospc):
        message = dataloader_worker_failure(error)
        assert "ran out of shared memory" in message and "--shm-size=8g" in message and "--ipc=host" in message
        assert "\n" not in message
    killed = dataloader_worker_failure(RuntimeError("DataLoader worker (pid 17) is killed by signal: Killed."))
    assert "shared memory" not in killed and "out-of-memory killer" in killed
    assert dataloader_worker_failure(RuntimeError("CUDA out of memory")) is None
