"""The output folder of a training run, set up only with --output-dir: its lock, args.json with the provenance of
the results, TensorBoard, and the one line for a write to it that failed; check_destination for any script's."""
import errno
import fcntl
import json
import os
import platform
import re
import subprocess
import threading

import torch

from common.log import UserError, held_output_locks, is_main_process

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder above common/


def read_provenance(device, repository=REPOSITORY):
    """What produced a run's results, kept beside them (args.json, checkpoints): the commit of the code and whether
    the working tree differed from it (None outside a git checkout), the versions and the device."""
    import torchvision  # here: the tools that only read runs import this module without needing it
    commit = git(repository, "rev-parse", "HEAD")
    changes = git(repository, "status", "--porcelain", "--untracked-files=no") if commit else None
    device = torch.device(device)
    # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses to unpickle.
    return {"git_commit": commit, "git_dirty": None if changes is None else changes != "",
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()}


def git(repository, *command):
    """git's output in `repository`, stripped; None where git is missing, the folder is no checkout (a copy of the
    scripts), or git fails or hangs (a stalled network file system)."""
    try:
        # Without optional locks, status does not rewrite the index, which would fail a git command run meanwhile.
        done = subprocess.run(["git", "-C", repository, *command], capture_output=True, text=True, timeout=5,
                              stdin=subprocess.DEVNULL, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_name():
    """The CPU's model name: Linux gives it in /proc/cpuinfo only (its platform.processor() is empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def start_output_dir(output_dir, flags, provenance=None):
    """Create the output folder, lock it for this run and write args.json (rank 0 only): the flags, and under the
    key "provenance", which no flag has, read_provenance's dict. A second live run on the same folder would
    interleave checkpoints and log lines. The lock is a POSIX one, which the OS drops when the process ends;
    unlike an flock, forked DataLoader workers do not hold it too."""
    if not output_dir or not is_main_process():
        return
    try:
        check_destination("--output-dir", output_dir, folder=True)
        key = os.path.realpath(output_dir)
        if key not in held_output_locks:
            lock = open(os.path.join(output_dir, ".lock"), "a+")
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                raise UserError(f"another run (pid {lock.read().strip() or '?'}) is writing to --output-dir "
                                f"{output_dir}: wait for it to end, or give this run another --output-dir") from None
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            held_output_locks[key] = lock
            remove_stale_temporary_files(output_dir)
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump({**flags, "provenance": provenance}, f, indent=1)
    except OSError as e:  # a full disk, a quota
        raise UserError(f"cannot write to --output-dir {output_dir} ({e.strerror}): free space there or give "
                        "another folder") from None


def check_destination(flag, path, folder=False):
    """Refuse, before any work, a destination that cannot be written. A folder destination is created."""
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{flag} {path} is a file, not a folder: give a folder (it is created if missing)")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {flag} {path} ({e.strerror}): give a folder where this user can write") \
                from None
        parent = path
    else:
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder: give a file name, e.g. {os.path.join(path, 'out')}")
        if not os.path.isdir(parent):
            raise UserError(f"{flag} {path}: folder {parent} does not exist: create it, or give a path in an existing "
                            "folder")
    if not os.access(parent, os.W_OK):  # a read-only file system says so to root too
        raise UserError(f"{flag} {path}: cannot write in {parent} (a read-only file system, or no permission): give a "
                        "path where this user can write")


def remove_stale_temporary_files(output_dir):
    """The <file>.tmp.<pid> that a save cut short leaves (the stall watchdog ends its rank at once, a SIGKILL does
    too) are removed when a run locks the folder: with no live process of that pid, nothing will finish them."""
    stale = []
    for name in sorted(os.listdir(output_dir)):
        match = re.fullmatch(r"(?:checkpoint.*\.pth|best\.pth|bad_samples\.txt|file_list_.+\.npz|class_pixels_.+\.json)"
                             r"\.tmp\.(\d+)", name)  # only the files a run writes so: a user's own are left alone
        if match and not process_alive(int(match[1])):
            os.remove(os.path.join(output_dir, name))
            stale.append(name)
    if stale:
        print(f"note: removed {', '.join(stale)} from {output_dir}: left by a save that was cut short", flush=True)


def process_alive(pid):
    """Whether a process `pid` other than this one lives (this one has not begun writing yet: in a container the
    same pid comes back at every start)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return pid != os.getpid()


def write_failure(error):
    """(what went wrong, what to do); torch.save's RuntimeError for a failed write has the OSError as context."""
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        lines = str(error).strip().splitlines() or ["no message"]
        return f"{type(error).__name__}: {lines[0]}", "fix that"
    if cause.errno == errno.ENOSPC:
        return f"{cause.strerror}: the disk is full", "free space there"
    if cause.errno == errno.EDQUOT:
        return cause.strerror, "free space there or raise the quota"
    if cause.errno == errno.EFBIG:
        return "File too large: a file-size limit (ulimit -f) is below the checkpoint's size", "raise the limit"
    return f"{type(cause).__name__}: {cause.strerror or cause}", "fix that"


def unwritable_output(path, error, output_dir):
    """The one line for a file of the run that could not be written, and what is left to resume from."""
    if not os.path.isdir(output_dir):
        return (f"cannot save {path}: --output-dir {output_dir} is gone (deleted, moved or unmounted while the run "
                "wrote to it), and no checkpoint of the run with it: start the run again, on a folder that stays")
    problem, fix = write_failure(error)
    last = os.path.join(output_dir, "checkpoint.pth")
    if os.path.isfile(last):
        kept = f"the last good checkpoint, {last}, is intact; {fix}, then resume from it with --resume auto"
    else:
        kept = f"no checkpoint was saved yet; {fix}, then run the same command again"
    return f"cannot save {path} ({problem}): {kept}"


def _quiet_tensorboard_threads(args):
    """threading.excepthook: a failed write of TensorBoard's writing thread is not printed with its traceback; the
    training thread meets the error again at its next call, and reports it in one line."""
    if not (type(args.thread).__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError)):
        _quiet_tensorboard_threads.previous(args)


class TensorBoard:
    """torch's SummaryWriter in <output_dir>/tb, whose failed writes (a full disk, the folder deleted under the run)
    end the run in one line. It writes in a thread of its own, and a later call raises what that thread met."""

    def __init__(self, output_dir):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard

        self.output_dir, self.writer = output_dir, SummaryWriter(os.path.join(output_dir, "tb"))
        if threading.excepthook is not _quiet_tensorboard_threads:
            _quiet_tensorboard_threads.previous, threading.excepthook = threading.excepthook, _quiet_tensorboard_threads

    def add_scalar(self, *args):
        self.written(self.writer.add_scalar, *args)

    def add_image(self, *args):
        self.written(self.writer.add_image, *args)

    def close(self):
        self.written(self.writer.close)

    def written(self, write, *args):
        try:
            write(*args)
        except OSError as e:
            raise UserError(unwritable_output(f"the TensorBoard events in {self.writer.log_dir}", e,
                                              self.output_dir)) from None
