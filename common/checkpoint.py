"""Checkpoints as plain dicts of tensors: written atomically, read with weights_only=True, checked key by key;
the Checkpointer that saves a run (checkpoint.pth, best.pth) and resumes it, refusing what would not continue it."""
import os
import pickle
import re

import torch

from common.log import UserError, print0


class CheckpointError(UserError):
    """A checkpoint that cannot be used; like every UserError, the scripts report it in one line."""


def unwrap(model):
    """The plain module under DistributedDataParallel / AveragedModel, so state-dict keys carry no prefix."""
    return model.module if hasattr(model, "module") else model


def save_atomic(state, path):
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file or the new one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only when saving failed
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path, or use --resume auto "
                              "to resume only when <output-dir>/checkpoint.pth exists")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # e.g. torchvision's references store an argparse.Namespace
            raise CheckpointError(
                f"checkpoint {path} holds Python objects besides tensors, which weights_only loading refuses: "
                "if you trust the file, load it once with weights_only=False and torch.save its 'model' entry "
                "to a new file, then use that file") from None
        cause = e
    except Exception as e:
        cause = e
    first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()[0]
    raise CheckpointError(f"cannot read checkpoint {path} ({type(cause).__name__}: {first_line}): the file is "
                          "truncated, corrupt or not a PyTorch checkpoint; use an earlier checkpoint")


def state_dict_from(checkpoint):
    """A training checkpoint ({'model': ...}) or a bare state dict, with DDP/compile prefixes removed."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the file holds no model state dict (expected a dict of tensors or a 'model' key)")
    stripped = True
    while stripped and state:  # in any order and nesting: module._orig_mod.x, _orig_mod.module.x
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state):
                state, stripped = {k[len(prefix):]: v for k, v in state.items()}, True
    return state


def load_model_state(model, state, path, skip_mismatched=()):
    """Load `state` strictly, except keys in `skip_mismatched` whose shapes differ (a replaced head).

    Returns the skipped keys. Any other difference stops with the keys and shapes that differ.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    skipped = [k for k in mismatched if k in skip_mismatched]
    mismatched = [k for k in mismatched if k not in skip_mismatched]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing from the file (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append("shapes differ: " + ", ".join(
                f"{k} file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in mismatched[:3]))
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}. "
                              "Use the --model (and class count) the checkpoint was trained with")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=not skipped)
    return skipped


def resume_path(resume, output_dir):
    """The checkpoint --resume names, None for a fresh start; 'auto' is <output-dir>/checkpoint.pth if it exists.
    Call it before any work, so that a wrong path is reported at once."""
    if resume is None:
        return None
    if resume == "auto":
        if not output_dir:
            raise UserError("--resume auto looks for <output-dir>/checkpoint.pth: give --output-dir too")
        path = os.path.join(output_dir, "checkpoint.pth")
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise CheckpointError(f"checkpoint {resume} does not exist: check the path, or use --resume auto "
                              "to resume only when <output-dir>/checkpoint.pth exists")
    return resume


def training_flags(path):
    """The flags a checkpoint of train.py was trained with, as a plain dict ({} for a bare state dict)."""
    checkpoint = load_checkpoint(path)
    return (checkpoint.get("args") or {}) if isinstance(checkpoint, dict) else {}


def trained_settings(path, given, names):
    """Of the flags `names`, those left unset (None) in `given` (a dict), as the checkpoint at `path` was
    trained with them: what --test-only evaluates with unless told otherwise."""
    trained = training_flags(path)
    return {name: trained[name] for name in names if given.get(name) is None and name in trained}


def read_training_checkpoint(path, model_name):
    checkpoint = load_checkpoint(path)
    trained_with = (checkpoint.get("args") or {}).get("model")
    if trained_with not in (None, model_name):
        raise CheckpointError(f"checkpoint {path} was trained with --model {trained_with}, not {model_name}: "
                              f"pass --model {trained_with} or another checkpoint")
    return checkpoint


def check_same_schedule(trained_flags, flags, names, path):
    """The LR schedule was laid out step by step, and each epoch's data order drawn, for the values of `names`:
    resuming with other values would silently follow the old curve or another order, so they must match."""
    changed = [f"{name} {trained_flags.get(name)} -> {flags[name]}" for name in names
               if trained_flags.get(name) != flags[name]]
    if changed:
        raise CheckpointError(f"cannot resume from {path}: its LR schedule and data order were laid out for other "
                              f"values ({'; '.join(changed)}). Resume with the same values, or start a new run from "
                              f"its weights with --weights {path}")


def check_same_global_batch(trained_flags, flags, path):
    """The schedule counts optimizer steps and each step takes the next global batch of the epoch's order, so any
    layout of processes x -b x --accum-steps with the checkpoint's product goes on where it stopped
    (common/data.py's BatchLayout); another product would take other samples in other steps."""
    def factors(f):
        return f.get("world_size", 1), f["batch_size"], f.get("accum_steps") or 1

    def described(n, b, a):
        return f"{n * b * a} images ({n} process{'es' if n > 1 else ''} x -b {b} x --accum-steps {a})"

    if trained_flags.get("batch_size") is None or flags.get("batch_size") is None:
        return
    (n, b, a), (m, b2, a2) = factors(trained_flags), factors(flags)
    trained = n * b * a
    if trained == m * b2 * a2:
        return
    fix = f"--accum-steps {trained // (m * b2)} here, or " if trained % (m * b2) == 0 else ""
    raise CheckpointError(f"cannot resume from {path}: it was trained with a global batch of {described(n, b, a)}, "
                          f"this run has {described(m, b2, a2)}. Keep the product: {fix}--global-batch {trained}, "
                          "which sets --accum-steps for any number of processes that, times -b, divides it; or start "
                          f"a new run from its weights with --weights {path}")


def recorded_precision(checkpoint):
    """The precision a checkpoint was trained in; one written before that was recorded says it by its flags."""
    if "precision" in checkpoint:
        return checkpoint["precision"]
    flags = checkpoint.get("args") or {}
    return (flags.get("amp_dtype") or "float16") if flags.get("amp") else "float32"


def last_good_checkpoint(output_dir):
    """What a run that stops on NaN or Inf says about where to go on from."""
    last = os.path.join(output_dir, "checkpoint.pth") if output_dir else None
    if last and os.path.isfile(last):
        return (f"the last good checkpoint is {last}, untouched: resume from it with --resume {last} (if the run "
                "diverges again, try a lower --lr, --clip-grad-norm or --amp-dtype bfloat16)")
    return ("no checkpoint was saved yet: start again (if the run diverges again, try a lower --lr, "
            "--clip-grad-norm or --amp-dtype bfloat16)")


def check_finite_weights(models, where, output_dir):
    """Refuse to save NaN or Inf weights or batch-norm statistics over a good checkpoint. Call it on every rank:
    DDP keeps the weights the same on all, so all stop together instead of some waiting for the others."""
    tensors = [t for model in models for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not torch.stack([t.isfinite().all() for t in tensors]).all():  # one sync; a norm could overflow
        raise CheckpointError(f"the model's weights or batch-norm statistics are NaN or Inf ({where}): nothing was "
                              f"saved; {last_good_checkpoint(output_dir)}")


def save_training(state, output_dir, is_best=False, keep=0):
    """checkpoint.pth; at the end of an epoch also best.pth when its score is the best so far, and
    checkpoint_epoch<N>.pth of the last `keep` epochs."""
    save_atomic(state, os.path.join(output_dir, "checkpoint.pth"))
    where = f"epoch {state['epoch']}" + (f" step {state['step']}" if state["step"] is not None else "")
    if state["step"] is None and keep > 0:
        save_atomic(state, os.path.join(output_dir, f"checkpoint_epoch{state['epoch']}.pth"))
        for old in range(state["epoch"] - keep, -1, -1):
            stale = os.path.join(output_dir, f"checkpoint_epoch{old}.pth")
            if not os.path.exists(stale):
                break
            os.remove(stale)
    if is_best:
        save_atomic(state, os.path.join(output_dir, "best.pth"))
    print0(f"saved {output_dir}/checkpoint.pth ({where}){' and best.pth' if is_best else ''}")


class Checkpointer:
    """Saves and restores everything a run needs to continue, as plain dicts and tensors (what weights_only
    loading accepts): model, optimizer, LR schedule, scaler, EMA, position, the best score so far, the run's
    flags, its precision, and `must_match` entries that a resumed run must have too (class names, palette, the
    epoch's length in steps).

    save() runs on every rank (each checks the weights are finite) and writes on the main one only; with no
    output_dir it only checks.
    """

    def __init__(self, output_dir, is_main, model, optimizer, lr_scheduler, scaler, *, precision, flags,
                 best_key, best_name, keep=0, model_ema=None, **must_match):
        self.output_dir, self.is_main, self.keep, self.best_key = output_dir, is_main, keep, best_key
        self.best_name = best_name  # how the log names the score: top-1, mIoU
        self.model, self.optimizer, self.lr_scheduler, self.scaler = model, optimizer, lr_scheduler, scaler
        self.precision, self.flags, self.model_ema, self.must_match = precision, flags, model_ema, must_match
        self.best = None  # the first evaluated epoch is the best so far, whatever its score

    def state(self, epoch, step):
        """`step` is the number of optimizer steps done in `epoch` for a checkpoint saved inside it, None at its end."""
        ema = self.model_ema
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "precision": self.precision, "epoch": epoch, "step": step, "args": dict(self.flags),
                self.best_key: self.best, "model_ema": ema.module.state_dict() if ema is not None else None,
                "model_ema_n_averaged": ema.n_averaged if ema is not None else None, **self.must_match}

    def save(self, epoch, step=None, is_best=False):
        """Without an output folder nothing is written, but a run whose weights went NaN still stops here."""
        models = [self.model] if self.model_ema is None else [self.model, self.model_ema]
        check_finite_weights(models, f"epoch {epoch}" + ("" if step is None else f" step {step}"), self.output_dir)
        if self.output_dir and self.is_main:
            save_training(self.state(epoch, step), self.output_dir, is_best, self.keep)

    def end_of_epoch(self, epoch, score):
        """Save the finished epoch, as best.pth too when `score` is the best so far; returns whether it was."""
        is_best = self.best is None or score > self.best
        self.best = score if is_best else self.best
        self.save(epoch, is_best=is_best)
        return is_best

    def resume(self, path, model_name, schedule_names):
        """Load the training checkpoint at `path` (None: a fresh start); returns where to go on:
        (epoch, optimizer steps already done in it)."""
        if path is None:
            return 0, 0
        checkpoint = read_training_checkpoint(path, model_name)
        load_model_state(self.model, state_dict_from(checkpoint), path)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {path}: {e}. Resume with the flags it was trained with "
                                  "(--opt, --norm-weight-decay, --head-lr)") from None
        # The saved groups bring back the implementation that stepped them (fused, foreach), which another device
        # or version may have chosen; the scaler steps the optimizer this run built, with its choice.
        for group in self.optimizer.param_groups:
            group.update({key: self.optimizer.defaults.get(key) for key in ("fused", "foreach")})
        check_same_schedule(checkpoint.get("args") or {}, self.flags, schedule_names, path)
        check_same_global_batch(checkpoint.get("args") or {}, self.flags, path)
        for name, value in self.must_match.items():  # other classes of the same count; another epoch length
            if name in checkpoint and checkpoint[name] != value:
                raise CheckpointError(f"cannot resume from {path}: it was trained with {name} {checkpoint[name]}, "
                                      f"this run has {value}. Resume on the data it was trained on, or start a new "
                                      f"run from its weights with --weights {path}")
        self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if checkpoint["scaler"] and recorded_precision(checkpoint) == self.precision:  # precision may change
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.model_ema is not None and checkpoint.get("model_ema") is not None:
            load_model_state(self.model_ema.module, checkpoint["model_ema"], path)
            self.model_ema.n_averaged.copy_(checkpoint["model_ema_n_averaged"])
        self.best = checkpoint.get(self.best_key)
        epoch, step = checkpoint["epoch"], checkpoint.get("step")
        where = (epoch + 1, 0) if step is None else (epoch, step)
        best = "none yet" if self.best is None else f"{self.best:.2f}"
        print0(f"resumed from {path}: epoch {where[0]} step {where[1]}, best {self.best_name} {best}")
        return where
