"""Checkpoints and the run folder: atomic writes, safe loads, the resume checks, RNG state,
export, OUT's lock.

Every file of a run (checkpoint, metrics, summary, mix grid, export) is written to a temporary
file in the same folder, fsync'ed and renamed over the old one (``atomic_write``), so a crash or
a full disk leaves either the old or the new file, never a truncated one, and a failed write is
an OSError that names its cause (``os_error_text``). A checkpoint is loaded with
``torch.load(weights_only=True)``, so it can hold tensors and plain data, never code. One run
at a time writes into an OUT (``lock_out``).
"""
import errno
import fcntl
import io
import os
import re
import sys
import tempfile
from dataclasses import asdict

import torch

from fastmix.backbones import classifier_state_dict

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


def unwritable_reason(folder):
    """None if ``folder`` exists and is writable, or can be made: its nearest existing ancestor
    is a writable folder; else why not (checked before any work, never by writing)."""
    nearest = os.path.abspath(folder)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        return f"{nearest} is a file"
    if not os.access(nearest, os.W_OK):
        return f"{nearest} is not writable"
    return None


def remove_stale_temporaries(folder, name=""):
    """Delete the temporary files an interrupted ``atomic_write`` of ``folder/name`` (of every
    file in ``folder`` when ``name`` is empty) left behind (a kill -9 mid-write cannot clean up
    after itself); returns their paths. Only safe while no other process writes ``folder``
    (``lock_out``)."""
    gone = []
    for entry in os.scandir(folder):
        if entry.name.startswith(TMP_PREFIX + name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            gone.append(entry.path)
    return gone


def os_error_text(e):
    """The cause of a failed write in words a user can act on: ``No space left on device
    (ENOSPC)``, ``Disk quota exceeded (EDQUOT)``, ``File too large (EFBIG)``..."""
    if isinstance(e, OSError) and e.errno:
        return f"{os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
    return str(e) or type(e).__name__


def atomic_write(path, data):
    """Write ``data`` (bytes or str) to ``path`` so that a crash at any moment leaves either the
    old or the new file, never a truncated one: a temporary file in the same folder, written
    with plain ``os.write`` (a failure is an ``OSError`` that carries its errno: ENOSPC, EDQUOT,
    EFBIG, EIO), fsync'ed, renamed over the target, the folder fsync'ed. On failure the
    temporary file is removed and the old file is left as it was."""
    _atomic(path, lambda: data.encode() if isinstance(data, str) else data)


def atomic_save(obj, path):
    """``torch.save(obj)`` to ``path`` the ``atomic_write`` way. The object is serialised in
    memory first: torch.save's zip writer reports a failed file write as a RuntimeError
    ("[enforce fail at inline_container.cc] unexpected pos ..."), which hides the cause (a full
    disk); written with ``os.write`` the failure is an OSError that names it. The cost is one
    in-memory copy of the file while it is written."""
    def serialised():
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getbuffer()
    _atomic(path, serialised)


# the process's umask, read once (os.umask can only be read by setting it): new files get the
# mode open() would give them, not mkstemp's 0600
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic(path, produce):
    folder = os.path.dirname(os.path.abspath(path))
    # the temporary file exists while the data is produced: a kill then leaves it behind for
    # remove_stale_temporaries, and an unwritable folder fails before the work
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path), dir=folder)
    try:
        try:
            view = memoryview(produce()).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_or_warn(path, data, what, consequence):
    """``atomic_write`` that turns a failed write into one warning line naming the file and the
    cause (the run goes on); returns None, or the cause."""
    try:
        atomic_write(path, data)
        return None
    except OSError as e:
        why = os_error_text(e)
        print(f"warning: could not write {what} {path} ({why}); {consequence}", file=sys.stderr,
              flush=True)
        return why


class OutInUseError(ValueError):
    """Another run holds the output folder."""


class OutLock:
    """OUT/.lock held with ``flock(LOCK_EX | LOCK_NB)`` for the whole run (``lock_out``): the
    kernel releases it when the process ends, however it ends, so a killed run leaves no stale
    lock; the file itself stays (unlinking it would let two runs lock two different files)."""

    def __init__(self, fd, path):
        self.fd, self.path = fd, path

    def release(self):
        if self.fd is not None:
            # LOCK_UN first: a forked child (a data-loader worker) that still holds a copy of
            # the descriptor would otherwise keep the folder locked after this run ends
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_out(folder):
    """Make ``folder`` and take its lock (``OutLock``), or raise ``OutInUseError`` naming the
    folder and the pid of the run that holds it. Where the file system cannot lock (or the lock
    file cannot be made: a full disk), a warning, and the run goes on without the guard."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        print(f"warning: could not create {path} ({os_error_text(e)}); nothing stops a second "
              f"run from writing into {folder} at the same time", file=sys.stderr)
        return OutLock(None, path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutInUseError(f"--out {folder} is in use by another run (pid {holder}, which holds "
                            f"{path}): wait for it to end or stop it, or choose another "
                            f"--out") from None
    except OSError as e:
        os.close(fd)
        print(f"warning: could not lock {path} ({os_error_text(e)}); nothing stops a second "
              f"run from writing into {folder} at the same time", file=sys.stderr)
        return OutLock(None, path)
    try:        # the holder's pid, for the refusal of the next run (a full disk: left out)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return OutLock(fd, path)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or from another configuration."""


def load_checkpoint(path):
    """``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain data only,
    never code. Any read failure names the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated, corrupt, or not a "
                              f"checkpoint of plain tensors and data): "
                              f"{load_failure_reason(e, path)}") from None


# Lead-ins of torch.load's messages that introduce the reason; the sentences around it that
# mention weights_only are advice (turning it off would run the file's code): never passed on.
_TORCH_LOAD_LEAD_INS = re.compile(r"Please file an issue[^:]*:|WeightsUnpickler error:")
_TORCH_LOAD_ADVICE = ("weights_only", "Weights only load failed", "trusted source",
                      "Check the documentation")


def load_failure_reason(e, path):
    """Why ``torch.load(path, weights_only=True)`` failed with ``e``, in one line: the real
    reason (an empty or cut-short file, a damaged zip archive, a refused object), never
    torch's advice to load with ``weights_only=False``."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    if size == 0:
        return "the file is empty (0 bytes)"
    text = str(e)
    if isinstance(e, EOFError) or not text.strip():
        return f"{type(e).__name__}: the file ends too early ({size} bytes: cut short?)"
    if "legacy .tar format" in text:
        return ("not a zip-format torch file (torch's legacy .tar format, or not a torch file at "
                "all): the safe loader does not read it")
    sentences = [s.strip() for line in _TORCH_LOAD_LEAD_INS.sub("\n", text).splitlines()
                 for s in re.split(r"(?<=\.)\s+", line)]
    sentences = [s for s in sentences if s and not any(a in s for a in _TORCH_LOAD_ADVICE)]
    reason = sentences[0] if sentences else "refused by the safe loader"
    if len(reason) > 300:
        reason = reason[:297].rsplit(" ", 1)[0] + "..."
    return f"{type(e).__name__}: {reason.rstrip('.')}"


TRAINING_KEYS = ("model", "optimizer", "scaler", "epoch", "batch", "step", "history", "partial",
                 "rng", "world", "config")
# Settings a resumed run may change: where and how it runs, not what it computes.
# epochs: a resumed run may be extended (or shortened, past the epochs done): the engine checks
# it and re-plans the schedules (fastmix.engine.plan_epochs_change).
RESUME_MAY_CHANGE = {"resume", "overwrite", "out", "data_dir", "device", "progress", "log_every",
                     "checkpoint_every", "grid_every", "export", "export_head", "max_bad_steps",
                     "workers", "compile", "eager", "selfcheck", "cuda_graphs", "optimizer_impl",
                     "epochs", "save_best", "keep_top_k", "best_metric", "log", "evaluate"}


def load_training_checkpoint(path, cfg, world):
    """A training checkpoint for resuming ``cfg``: refused, naming the file, when it is not a
    fastmix training checkpoint, was written by another number of processes, or by another
    configuration (any setting outside ``RESUME_MAY_CHANGE``)."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or any(k not in state for k in TRAINING_KEYS):
        what = (f"a dict with keys {sorted(state)[:8]}" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise CheckpointError(f"{path} is not a fastmix training checkpoint (it holds {what}); "
                              f"--resume takes the OUT/last.pt that train.py writes")
    if state["world"] != world:
        raise CheckpointError(f"checkpoint {path} was written by a run of {state['world']} "
                              f"process(es); this run has {world}")
    saved, now = state["config"], asdict(cfg)
    diff = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now
            if k not in RESUME_MAY_CHANGE and saved.get(k, now[k]) != now[k]]
    if diff:
        raise CheckpointError(f"checkpoint {path} does not fit this configuration: "
                              f"{'; '.join(diff)}. Resume with the settings it was written with, "
                              f"or start afresh in another --out")
    return state


def rng_states(model):
    state = {"torch": torch.get_rng_state(), "method": model.rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(model, state):
    torch.set_rng_state(state["torch"])
    model.load_rng_state(state["method"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_classifier(model, path, head=None):
    """Write the chosen encoder + head as the state dict of the plain classifier it is
    (``fastmix.backbones.classifier_state_dict``), loadable with ``strict=True`` and no key
    renamed, without fastmix, giving the same logits as ``model.predict(x)[head]``:
    ``timm.create_model(name, num_classes=K)`` for ``timm:<name>`` (the head under timm's
    classifier name), ``torchvision.models.<arch>(num_classes=K)`` for the ImageNet-stem
    ResNets, the wrapped model for a ``FeatureTap`` (the head under its ``classifier`` name),
    and for fastmix's CIFAR ResNets and WideResNets the backbone keys + ``fc.*``
    (``fastmix.backbones.PlainClassifier``). Returns the head's name."""
    head = head or model.default_head
    backbone, cls_head = model.head_modules(head)      # the live modules: no copy
    atomic_save(classifier_state_dict(backbone, cls_head), path)
    return head
