"""Checkpoints as plain dicts of tensors, written atomically, read with weights_only=True; the Checkpointer that
saves a run and resumes it, refusing what would not continue it."""
import os
import pickle
import re

import torch

from common.log import UserError, print0


class CheckpointError(UserError):
    """A checkpoint that cannot be used."""


def unwrap(model):  # of DDP
    return model.module if hasattr(model, "module") else model


def save_atomic(state, path):
    """A crash leaves the old file or the new one."""
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


def missing_checkpoint(path):
    return CheckpointError(f"checkpoint {path} does not exist: check the path, or use --resume auto to resume only "
                           "when <output-dir>/checkpoint.pth exists")


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise missing_checkpoint(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), as a copy or save cut short leaves a file: use "
                              "an earlier checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # e.g. torchvision's references store an argparse.Namespace
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects besides tensors, which weights_only loading refuses: "
                "if you trust the file, load it once with weights_only=False and torch.save its 'model' entry "
                "to a new file, then use that file") from None
        first_line = (re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or ["no message"])[0]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {first_line}): the file is "
                              "truncated, corrupt or not a PyTorch checkpoint; use an earlier checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict: give a "
                              "checkpoint written by train.py, or a model's state dict")
    return checkpoint


def is_bare_state_dict(checkpoint):
    return "model" not in checkpoint and bool(checkpoint) and all(
        isinstance(v, torch.Tensor) for v in checkpoint.values())


def state_dict_from(checkpoint, path):
    """The model's weights, of a training checkpoint or a bare state dict, without DDP/compile prefixes."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no model state dict (expected a dict of tensors or a 'model' "
                              "key): give a checkpoint written by train.py, or a model's state dict")
    stripped = True
    while stripped and state:  # in any order and nesting: module._orig_mod.x, _orig_mod.module.x
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state):
                state, stripped = {k[len(prefix):]: v for k, v in state.items()}, True
    return state


def load_model_state(model, state, path, skip_mismatched=()):
    """Strictly, but for keys in `skip_mismatched` whose shapes differ (a replaced head): returns those."""
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
    """The checkpoint --resume names, None for a fresh start; 'auto' is <output-dir>/checkpoint.pth if it exists."""
    if resume is None:
        return None
    if resume == "auto":
        if not output_dir:
            raise UserError("--resume auto looks for <output-dir>/checkpoint.pth: give --output-dir too")
        path = os.path.join(output_dir, "checkpoint.pth")
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise missing_checkpoint(resume)
    return resume


def read_training_checkpoint(path, model_name, class_names=None):
    """Refused unless trained with --model `model_name` and on `class_names` (if given): on other classes (cat,
    dog -> ant, cat) every image would be scored against another class."""
    checkpoint = load_checkpoint(path)
    trained_with = (checkpoint.get("args") or {}).get("model")
    if trained_with not in (None, model_name):
        raise CheckpointError(f"checkpoint {path} was trained with --model {trained_with}, not {model_name}: "
                              f"pass --model {trained_with} or another checkpoint")
    trained_on = checkpoint.get("class_names")
    if class_names is not None and trained_on is not None and list(trained_on) != list(class_names):
        raise CheckpointError(f"cannot evaluate {path} on this data: it was trained with class_names "
                              f"{list(trained_on)}, the data has {list(class_names)}. Evaluate it on the data it was "
                              "trained on")
    return checkpoint


# What train.py writes into every checkpoint and a resumed run needs (the best score may be missing: it starts over).
RESUME_KEYS = ("model", "optimizer", "lr_scheduler", "scaler", "epoch")


def check_resumable(checkpoint, path):
    if is_bare_state_dict(checkpoint):
        raise CheckpointError(f"{path} holds model weights alone (a state dict), not a training checkpoint: start a "
                              f"new run from them with --weights {path} instead of --resume")
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks {', '.join(missing)}, which train.py saves in "
                              "every checkpoint (the file was written otherwise, or edited); start a new run from its "
                              f"weights with --weights {path}")


# Flags younger than some checkpoints: one that does not record them was trained as their default.
UNRECORDED = {"class_weights": "none", "balanced_sampler": False, "freeze_backbone": False, "loss": "ce"}


def check_same_schedule(trained_flags, flags, names, path):
    """Other values of `names` would silently follow the old LR curve or another data order."""
    trained_flags = {**UNRECORDED, **trained_flags}
    changed = [f"{name} {trained_flags.get(name)} -> {flags[name]}" for name in names
               if trained_flags.get(name) != flags[name]]
    if changed:
        raise CheckpointError(f"cannot resume from {path}: its LR schedule and data order were laid out for other "
                              f"values ({'; '.join(changed)}). Resume with the same values, or start a new run from "
                              f"its weights with --weights {path}")


def layout_of(flags):
    """The BatchLayout a run's flags record; None without -b."""
    from common.data import BatchLayout  # here: the tools that only read checkpoints need no torchvision
    if flags.get("batch_size") is None:
        return None
    return BatchLayout(flags.get("world_size", 1), 0, flags["batch_size"], flags.get("accum_steps") or 1)


def check_same_global_batch(trained_flags, layout, path):
    """Any layout of processes x -b x --accum-steps with the checkpoint's global batch goes on where it stopped
    (BatchLayout); another global batch would take other samples in other steps."""
    trained = layout_of(trained_flags)
    if layout is None or trained is None:
        return
    if trained.global_batch == layout.global_batch:
        return
    per_step = layout.world_size * layout.batch_size
    fix = f"--accum-steps {trained.global_batch // per_step} here, or " if trained.global_batch % per_step == 0 else ""
    raise CheckpointError(f"cannot resume from {path}: it was trained with a global batch of {trained.described()}, "
                          f"this run has {layout.described()}. Keep the product: {fix}--global-batch "
                          f"{trained.global_batch}, which sets --accum-steps for any number of processes that, times "
                          f"-b, divides it; or start a new run from its weights with --weights {path}")


def last_good_checkpoint(output_dir):
    last = os.path.join(output_dir, "checkpoint.pth") if output_dir else None
    advice = "(if the run diverges again, try a lower --lr, --clip-grad-norm or --amp-dtype bfloat16)"
    if last and os.path.isfile(last):
        return f"the last good checkpoint is {last}, untouched: resume from it with --resume {last} {advice}"
    return f"no checkpoint was saved yet: start again {advice}"


def check_finite_weights(models, where, output_dir):
    """Never NaN or Inf over a good checkpoint. On every rank: DDP keeps the weights alike, so all stop together."""
    tensors = [t for model in models for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not torch.stack([t.isfinite().all() for t in tensors]).all():  # one sync; a norm could overflow
        raise CheckpointError(f"the model's weights or batch-norm statistics are NaN or Inf ({where}): nothing was "
                              f"saved; {last_good_checkpoint(output_dir)}")


def save_checkpoint_file(state, path, output_dir):
    """A failed write (a full disk, a file-size limit) in one line that says what is kept."""
    try:
        save_atomic(state, path)
    except (OSError, RuntimeError) as e:
        from common.output_dir import unwritable_output  # saves happen only with an output folder
        raise CheckpointError(unwritable_output(path, e, output_dir)) from None


def position(epoch, step):
    return f"epoch {epoch}" + ("" if step is None else f" step {step}")


def save_training(state, output_dir, is_best=False, keep=0):
    """checkpoint.pth; best.pth when `is_best`; at an epoch's end checkpoint_epoch<N>.pth of the last `keep`."""
    save_checkpoint_file(state, os.path.join(output_dir, "checkpoint.pth"), output_dir)
    if state["step"] is None and keep > 0:
        save_checkpoint_file(state, os.path.join(output_dir, f"checkpoint_epoch{state['epoch']}.pth"), output_dir)
        for old in range(state["epoch"] - keep, -1, -1):
            stale = os.path.join(output_dir, f"checkpoint_epoch{old}.pth")
            if not os.path.exists(stale):
                break
            os.remove(stale)
    if is_best:
        save_checkpoint_file(state, os.path.join(output_dir, "best.pth"), output_dir)
    print0(f"saved {output_dir}/checkpoint.pth ({position(state['epoch'], state['step'])})"
           f"{' and best.pth' if is_best else ''}")


class Checkpointer:
    """Everything a run needs to continue: the step's `parts` (StepParts), the position, the best `score` (its key
    and its name in the log: "best_acc1", "top-1"), the flags, the bad samples, the `provenance` (never checked: an
    older checkpoint without it resumes), and what a resume must keep: the global batch of `layout`, the
    `must_match` entries (class names, the epoch's length in steps)."""

    def __init__(self, parts, output_dir, is_main, *, flags, score, layout=None, keep=0, bad_samples=None,
                 provenance=None, **must_match):
        self.parts, self.output_dir, self.is_main, self.keep = parts, output_dir, is_main, keep
        self.layout = layout or layout_of(flags)  # this run's; from its flags where not given
        self.model = unwrap(parts.model)  # keys without DDP's prefix; compile keeps them
        self.best_key, self.best_name = score
        self.flags, self.must_match, self.bad_samples = flags, must_match, bad_samples
        self.provenance = provenance
        self.best = None  # the first evaluated epoch is the best so far, whatever its score
        self.validated = False  # of a resumed checkpoint: whether the validation due where it was saved has run

    def state(self, epoch, step, validated=False, confusion=None):
        """`step`: the steps done in `epoch`, None at its end."""
        parts, ema = self.parts, self.parts.ema
        return {"model": self.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                "lr_scheduler": parts.lr_scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
                "precision": parts.precision.name, "epoch": epoch, "step": step, "validated": validated,
                "confusion": confusion, "args": dict(self.flags), "provenance": self.provenance,
                self.best_key: self.best, "model_ema": ema.module.state_dict() if ema is not None else None,
                "model_ema_n_averaged": ema.n_averaged if ema is not None else None,
                "bad_samples": self.bad_samples.state() if self.bad_samples is not None else [], **self.must_match}

    def save_on_all_ranks(self, epoch, step=None, is_best=False, validated=False, confusion=None):
        """A collective: every rank calls it at the same step (the ranks agree on the bad samples met), the main
        one writes. Without an output folder nothing is written, but a run whose weights went NaN stops here."""
        models = [self.model] if self.parts.ema is None else [self.model, self.parts.ema]
        check_finite_weights(models, position(epoch, step), self.output_dir)
        if self.bad_samples is not None:
            self.bad_samples.agree()
        if self.output_dir and self.is_main:
            save_training(self.state(epoch, step, validated, confusion), self.output_dir, is_best, self.keep)

    def save_validated_on_all_ranks(self, epoch, score, step=None, confusion=None):
        """With the validation's confusion matrix (for tools/report.py); also best.pth, and True, for the best."""
        is_best = self.best is None or score > self.best
        self.best = score if is_best else self.best
        self.save_on_all_ranks(epoch, step, is_best=is_best, validated=True, confusion=confusion)
        return is_best

    @staticmethod
    def resolve_resume(args, trained_names):
        """`args.resume_from`: the checkpoint to start from (None: afresh), resolved once and before any work. Under
        --test-only, the flags of `trained_names` left unset (None) take the checkpoint's values."""
        args.resume_from = resume_path(args.resume, args.output_dir)
        if not args.test_only or not args.resume:
            return
        if args.resume_from is None:
            raise UserError(f"--resume auto found no checkpoint in {args.output_dir}: nothing to evaluate")
        trained = load_checkpoint(args.resume_from).get("args") or {}
        for name in trained_names:
            if getattr(args, name, None) is None and name in trained:
                setattr(args, name, trained[name])

    @staticmethod
    def load_for_evaluation(path, model, model_name, class_names):
        """--test-only: the checkpoint's weights into `model`; returns its EMA weights (a state dict), or None."""
        checkpoint = read_training_checkpoint(path, model_name, class_names)
        load_model_state(model, state_dict_from(checkpoint, path), path)
        return checkpoint.get("model_ema")

    def resume(self, path, model_name, schedule_names):
        """Returns where to go on: (epoch, optimizer steps already done in it); (0, 0) for no `path`."""
        if path is None:
            return 0, 0
        checkpoint = read_training_checkpoint(path, model_name)
        check_resumable(checkpoint, path)
        load_model_state(self.model, state_dict_from(checkpoint, path), path)
        # Before the optimizer's state, which fails less clearly for another --head-lr or --freeze-backbone.
        check_same_schedule(checkpoint.get("args") or {}, self.flags, schedule_names, path)
        check_same_global_batch(checkpoint.get("args") or {}, self.layout, path)
        optimizer, ema = self.parts.optimizer, self.parts.ema
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {path}: {e}. Resume with the flags it was trained with "
                                  "(--opt, --norm-weight-decay, --head-lr)") from None
        # The saved groups bring back the implementation that stepped them (fused, foreach), which another device
        # or version may have chosen; the scaler steps the optimizer this run built, with its choice.
        for group in optimizer.param_groups:
            group.update({key: optimizer.defaults.get(key) for key in ("fused", "foreach")})
        for name, value in self.must_match.items():  # other classes of the same count; another epoch length
            if name in checkpoint and checkpoint[name] != value:
                raise CheckpointError(f"cannot resume from {path}: it was trained with {name} {checkpoint[name]}, "
                                      f"this run has {value}. Resume on the data it was trained on, or start a new "
                                      f"run from its weights with --weights {path}")
        self.parts.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if checkpoint["scaler"] and checkpoint.get("precision") == self.parts.precision.name:  # precision may change
            self.parts.scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None and checkpoint.get("model_ema") is not None:
            load_model_state(ema.module, checkpoint["model_ema"], path)
            ema.n_averaged.copy_(checkpoint["model_ema_n_averaged"])
        self.best = checkpoint.get(self.best_key)
        if self.best_key not in checkpoint:
            print0(f"note: {path} holds no {self.best_key}: the best {self.best_name} starts over, and best.pth is "
                   "overwritten by the next evaluated epoch")
        self.validated = checkpoint.get("validated", False)
        saved = checkpoint.get("bad_samples") or []
        if self.bad_samples is not None:
            self.bad_samples.load_state(saved)
        elif saved:  # --max-bad-samples 0: the files its run replaced would go uncounted
            raise UserError(f"the checkpoint counts {len(saved)} bad samples, more than --max-bad-samples 0: resume "
                            f"with --max-bad-samples {len(saved)} or more")
        epoch, step = checkpoint["epoch"], checkpoint.get("step")
        where = (epoch + 1, 0) if step is None else (epoch, step)
        best = "none yet" if self.best is None else f"{self.best:.2f}"
        print0(f"resumed from {path}: epoch {where[0]} step {where[1]}, best {self.best_name} {best}")
        return where
