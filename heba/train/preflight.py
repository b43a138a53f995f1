"""Preflight: every check a run can fail on bad input, made before anything is written.

:meth:`heba.train.recipe.TrainRecipe.setup` calls :func:`validate` first (the
options, the configuration's values, the backend on this device, a
``--pretrained`` weights file, and what the output folder holds: the
:class:`Plan`), then :func:`check_images` once the data set is listed. Each
failure is a :class:`~heba.train.config.UsageError`,
:class:`~heba.clip.checkpoints.CheckpointError` or
:class:`~heba.data.coop.DataError` with one line that names the argument or the
file; ``heba-train`` prints it and exits with status 2.

Unreadable images: **the run fails before training, naming the file.** Every
image a run will read (its training shots and its test images) is checked on
a few threads by :func:`heba.data.check.check_images`: ``--check-images fast``
(default) reads each header and checks the file is whole (JPEG end-of-image
marker, PNG IEND, ...), ``full`` decodes every image; either way an empty,
truncated, damaged or non-image file stops the run before the model loads,
not after the last epoch. (Dassl's ``read_image`` retries such a file forever;
skipping it would silently change the training batches or the test set.)

Every place a run writes is proved writable first (:func:`probe_folder`: the folder
made if missing, a probe file created, flushed and removed, what was made removed
again), so ``/proc``, a name too long, a file where a folder should be or a
read-only disk is one line before any model loads; ``split --json`` and
``evaluate -o`` too (:func:`check_command_writes`). The data set folder must be a
folder, and it and ``-o`` must not nest. A run owns its folder
(:func:`heba.train.run_folder.lock`): a second process is refused before it writes
or removes anything.

``--resume`` re-checks what changes the result: every configuration field saved
with the run, ``--workers`` where loader workers seed the augmentations
(:func:`check_workers`, once the loader is built), and, once the data is listed, that each ``split_<sub>.json`` still lists the images
drawn now (:func:`heba.train.loop.open_folder`).

What happens with an output folder (``-o``; the Plan's ``note`` says it in the log):

* nothing of heba's there: a fresh run.
* a run there, no flag: refused (``--resume`` or ``--overwrite``).
* ``--resume``: continues after the latest saved epoch; a run killed before its
  first epoch was saved starts again at epoch 1; a finished run trains nothing,
  reports its saved accuracy and exits 0 (so a protocol over seeds can be
  resumed as a whole). ``--resume`` with ``--overwrite``: refused.
* ``--overwrite``: the previous run's files are removed, others stay.
* the bare demo (no ``-o``) writes ``runs/demo`` and replaces only a previous
  *demo* run there; any other run in ``runs/demo`` is refused.

Example::

    >>> from heba.train.config import Config
    >>> check_config(Config(lr=-1.0))
    Traceback (most recent call last):
    ...
    heba.train.config.UsageError: --lr must be a number >= 0, got -1.0
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from typing import Optional

from heba.clip import checkpoints as ckpt
from heba.train import run_folder as rf
from heba.train.config import RESUME_FIELDS, UsageError, check, flag

@dataclass
class Plan:
    """What a run does with its output folder (module docstring)."""

    mode: str                                   # fresh | overwrite | resume | finished
    start_epoch: int = 0
    latest: Optional[rf.CheckpointSet] = None  # the set resumed from
    saved: Optional[dict] = None                # its adapters.json
    state: Optional[dict] = None                # its train_state.pt
    note: Optional[str] = None                  # one log line: what happens


def validate(cfg, opts, device, lock: bool = False) -> Plan:
    """Every check that needs no data set and no model; returns the output folder's Plan.

    ``lock``: own the output folder first (:func:`heba.train.run_folder.lock`, rank 0), so
    the plan is made, and stays true, under the lock."""
    check_run(cfg, opts, device)
    pre = cfg.pretrained
    if pre not in (None, "", "none", "builtin") and os.path.isfile(pre):
        check_weights_file(pre)
    check_data_paths(cfg, opts.output)
    return plan_output(cfg, opts, lock)


def check_run(cfg, opts, device) -> None:
    """The options, the configuration and the backend (a run, or a checkpoint's evaluation)."""
    check_options(opts)
    check_config(cfg)
    check_backend(opts.backend, device)


def check_options(opts) -> None:
    """The run options' values (:class:`heba.train.recipe.RunOptions`)."""
    if opts.threads is not None and opts.threads < 1:
        raise UsageError(f"--threads must be >= 1 (leave it out to use the idle cores), "
                         f"got {opts.threads}")
    from heba.train.data import resolve_workers
    resolve_workers(opts.workers, "cpu")
    for name, hint in (("eval_every", " (0: evaluate at the end only)"),
                       ("checkpoint_blocks", " (0: off)")):
        if getattr(opts, name) < 0:
            raise UsageError(f"{flag(name)} must be >= 0{hint}, got {getattr(opts, name)}")
    if opts.resume and opts.overwrite:
        raise UsageError(f"--resume and --overwrite exclude each other: --resume continues "
                         f"the run in {opts.output}, --overwrite deletes it and starts over")


def check_config(cfg) -> None:
    """The configuration's values: :func:`heba.train.config.check`, their one check."""
    check(cfg)


def check_backend(backend: str, device) -> None:
    """``--backend``'s one check on its way to the kernels: a known name
    (:data:`heba.backends.BACKENDS`) that runs on ``device`` (``auto`` falls back by itself)."""
    if backend == "auto":
        return
    from heba.backends import BACKENDS, backend_status
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ok, why = backend_status(backend, device)
    if not ok:
        raise UsageError(f"--backend {backend} cannot run on {device}: {why} "
                         f"(--backend auto picks what runs here)")


# --- the output folder -----------------------------------------------------------------------

def plan_output(cfg, opts, lock: bool = False) -> Plan:
    """What the run does with ``opts.output`` (module docstring); raises on a refusal.

    The folder is proved writable first (:func:`probe_folder`); ``lock``: an existing
    folder is locked before it is looked at (a new one, at the run's first write)."""
    out = opts.output
    probe_folder(out, "-o")
    if lock and os.path.isdir(out):
        try:
            rf.lock(out)
        except rf.WriteError:
            if os.path.isdir(out):
                raise
            # The folder was another process's probe (a DDP rank proving the same path
            # writable makes and removes it): a new folder, locked at the run's first write.
    state = rf.inspect(out)
    if opts.resume:
        return _plan_resume(cfg, state, opts)
    if not state.holds_run:
        return Plan("fresh")
    if opts.overwrite:
        return Plan("overwrite", note=f"{out}: --overwrite: the previous run's files are "
                                      f"removed")
    if getattr(opts, "demo_default", False):
        if _source(state) == "demo":
            return Plan("overwrite", note=f"{out}: replacing the previous demo run (the demo "
                                          f"rewrites its own folder; -o DIR keeps a run)")
        raise UsageError(f"{out} holds a run that is not the demo's; the demo never replaces "
                         f"it: pass -o DIR for the demo, or --overwrite to replace that run")
    if state.latest is not None:
        what = (f"a checkpoint (epoch {state.latest}"
                + (", finished)" if state.finished else ")"))
    else:
        what = "a finished run" if state.finished else "a started run (no epoch saved yet)"
    raise UsageError(f"{out} already holds {what}: pass --resume to continue it or "
                     f"--overwrite to start over")


def probe_folder(path: str, flag: str) -> None:
    """Prove that files can be written in the folder ``path``: the missing folders are
    made, a probe file is created, written, flushed and removed, then the folders made
    here are removed again. Any failure is one :class:`UsageError` naming ``flag``,
    ``path`` and the cause (``permission denied``, ``file name too long``, ...)."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"{flag} {path} is a file, not a folder (the folder to write)")
    missing, parent = [], target
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    for attempt in range(3):
        try:
            return _probe_in(target, missing)
        except FileNotFoundError as err:     # another process (a DDP rank) probing the same
            if attempt == 2:                 # parents removed one they had made: try again
                failed = err
        except OSError as err:
            failed = err
            break
    where = failed.filename if isinstance(failed.filename, str) else target
    raise UsageError(f"{flag} {path}: cannot write in {where} ({_cause(failed)})") from None


def _probe_in(target: str, missing: list) -> None:
    """Make the ``missing`` folders (outermost first), probe ``target``, remove the folders
    this call made. A folder another process makes meanwhile is left to that process."""
    made = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
                made.append(folder)
            except FileExistsError:
                if not os.path.isdir(folder):
                    raise
        _probe_file(target)
    finally:
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:                  # not empty: another process writes there now
                pass


def _probe_file(folder: str) -> None:
    probe = os.path.join(folder, f".heba-probe-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"heba")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


def _cause(err: OSError) -> str:
    return os.strerror(err.errno).lower() if err.errno else one_line(err)


def probe_output_file(path: str, flag: str) -> None:
    """Prove that the file ``path`` can be written (replaced atomically in its folder)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: give the file to write")
    if not os.path.basename(os.path.abspath(path)):
        raise UsageError(f"{flag} {path} names no file")
    probe_folder(os.path.dirname(os.path.abspath(path)) or ".", flag)
    if len(os.path.basename(path).encode()) > 240:   # room for the temporary file's name
        raise UsageError(f"{flag} {path}: cannot write it (file name too long)")


def probe_appendable(path: str, flag: str) -> None:
    """Prove that a line can be appended to the file ``path`` (in a folder proved writable)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a folder, not a file to append to")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag}: {path} is not writable (permission denied)")


def check_command_writes(args) -> None:
    """``split --json FILE`` and ``evaluate -o DIR``: where they will write is writable."""
    if args.command == "split" and getattr(args, "json", None):
        probe_output_file(args.json, "--json")
    if args.command == "evaluate" and getattr(args, "output", None):
        probe_folder(args.output, "-o")
        probe_appendable(os.path.join(args.output, rf.METRICS_NAME), "-o")


def check_data_paths(cfg, out: Optional[str]) -> None:
    """The data set folder is a folder, and it and the run folder ``out`` do not nest."""
    if cfg.source == "folder" and cfg.dataset:
        data, what = cfg.dataset, f"the ImageFolder {cfg.dataset}"
    elif getattr(cfg, "root", None):
        data, what = cfg.root, f"--root {cfg.root}"
    else:
        return
    if os.path.exists(data) and not os.path.isdir(data):
        raise UsageError(f"{what} is a file, not a folder (the folder holding the images)")
    if not out:
        return
    d, o = os.path.realpath(data), os.path.realpath(out)
    if o == d or o.startswith(d.rstrip(os.sep) + os.sep):
        raise UsageError(f"-o {out} is inside {what}: the run's files would mix with the "
                         f"images; pass a folder outside it")
    if d.startswith(o.rstrip(os.sep) + os.sep):
        raise UsageError(f"{what} is inside -o {out}: --overwrite would clear its files "
                         f"and the run's files would mix with the images; pass another -o")


def _source(state: rf.FolderState) -> Optional[str]:
    """The data source of the run in a folder (``"demo"`` for the demo's), from any JSON."""
    paths = [os.path.join(state.path, rf.CONFIG_NAME), os.path.join(state.path, rf.CKPT_JSON)]
    paths += [os.path.join(rf.epoch_dir(state.path, e), rf.CKPT_JSON) for e in state.epochs]
    for p in paths:
        obj = rf.read_json(p)
        if obj is not None:
            return obj.get("source")
    return None


def _plan_resume(cfg, state: rf.FolderState, opts=None) -> Plan:
    out = state.path
    if state.latest is None:
        if rf.STATE_NAME in state.files:
            raise UsageError(f"--resume: {out} was written by an older heba-train (one "
                             f"{rf.STATE_NAME} at the top, no epoch_<N>/ set): it cannot be "
                             f"resumed; evaluate its adapters, or --overwrite")
        if rf.CONFIG_NAME in state.files and not state.finished:
            saved = ckpt.read_json_object(os.path.join(out, rf.CONFIG_NAME),
                                          require=RESUME_FIELDS)
            check_same(saved, cfg.to_dict(), result_fields(saved, cfg),
                       os.path.join(out, rf.CONFIG_NAME))
            return Plan("resume", note=f"{out}: no epoch was saved before the run stopped: "
                                       f"starting again at epoch 1")
        if state.finished:
            raise UsageError(f"--resume: {out} holds a finished run's adapters but no "
                             f"epoch_<N>/ set to resume from: evaluate it, or --overwrite")
        raise UsageError(f"--resume: {out} holds no run to resume (no {rf.CONFIG_NAME}, no "
                         f"epoch_<N>/ checkpoint)")
    latest = rf.read_set(out)
    missing = [n for n in (rf.CKPT_NAME, rf.CKPT_JSON, rf.STATE_NAME) if n not in latest.files]
    if missing:
        raise ckpt.CheckpointError(f"{latest.path} lacks {', '.join(missing)}: not a training "
                                   f"checkpoint")
    saved = ckpt.read_config(latest.file(rf.CKPT_NAME), require=RESUME_FIELDS + ("epoch",))
    check_same(saved, cfg.to_dict(), result_fields(saved, cfg), latest.path)
    train_state = load_train_state(latest.file(rf.STATE_NAME))
    if not (train_state.get("epoch") == saved["epoch"] == latest.epoch):
        raise ckpt.CheckpointError(f"{latest.path}: {rf.STATE_NAME} (epoch "
                                   f"{train_state.get('epoch')}) and {rf.CKPT_JSON} (epoch "
                                   f"{saved['epoch']}) disagree")
    if latest.epoch >= cfg.epochs:
        return Plan("finished", latest.epoch, latest, saved, train_state,
                    note=f"{out} has already finished: epoch {latest.epoch} of {cfg.epochs} "
                         f"is saved, nothing is trained; its final accuracy follows")
    return Plan("resume", latest.epoch, latest, saved, train_state,
                note=f"{out}: resuming after epoch {latest.epoch} of {cfg.epochs}")


def load_train_state(path: str) -> dict:
    """``train_state.pt`` (optimizer, scheduler, epoch, RNG), or :class:`CheckpointError`."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ckpt.CheckpointError(f"cannot read {path}: {type(err).__name__}: "
                                   f"{one_line(err)}") from None
    need = ("optimizer", "scheduler", "epoch")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise ckpt.CheckpointError(f"{path} is not a training state (expected the keys "
                                   f"{', '.join(need)})")
    return state


# Configuration fields that do not change a run's result (the test-time batch size).
NOT_RESULT_FIELDS = ("test_batch_size",)


def result_fields(saved: dict, cfg) -> tuple:
    """The fields a resumed run must share with the run it continues: every configuration
    field the saved file records (all of them change the result), the required ones too."""
    names = [k for k in cfg.to_dict() if k in saved and k not in NOT_RESULT_FIELDS]
    return tuple(dict.fromkeys(list(RESUME_FIELDS) + names))


def check_workers(train_state: dict, workers, path: str) -> None:
    """A resume keeps the saved worker count where the result depends on it (``workers``:
    :attr:`heba.train.data.TrainLoader.seeded_workers` of this run, None where it does not)."""
    saved = train_state.get("workers")
    if "workers" not in train_state or saved == workers:      # (a set saved before it was kept)
        return
    raise UsageError(f"--resume: {path} was trained with {saved} loader worker(s), now "
                     f"{workers}: this data set's random transforms run in the workers, so "
                     f"the result depends on it; resume with --workers {saved}")


def check_same(saved: dict, cfg: dict, fields, path) -> None:
    """The ``fields`` a checkpoint must share with the run that loads or resumes it."""
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {cfg.get(k)!r}" for k in fields
            if saved.get(k) != cfg.get(k)]
    if diff:
        raise UsageError(f"checkpoint {path} is from another configuration ({'; '.join(diff)})")


# --- files the run reads ---------------------------------------------------------------------

_ADAPTER_KEY = re.compile(r"^(module\.)?((visual|text)_adapter\.\d+\.|(text_)?blocks\.\d+\."
                          r"adapter\.)")


def check_weights_file(path: str, flag: str = "--pretrained") -> None:
    """``path`` must be backbone weights: safetensors, ``torch.save`` or TorchScript.

    A text file, an empty file, or an adapter checkpoint (heba's or a published one)
    is refused in one line.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise UsageError(f"{flag} {path} is an empty file")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        keys = _weight_keys(path, head, size)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"{flag} {path} cannot be read as weights ({type(err).__name__}: "
                         f"{one_line(err)})") from None
    if keys is None:                            # TorchScript (OpenAI's release): its own loader
        return
    if keys == []:
        raise UsageError(f"{flag} {path} holds no tensors")
    if all(_ADAPTER_KEY.match(k) or k.endswith(ckpt.IGNORED) for k in keys):
        raise UsageError(f"{flag} {path} holds adapter weights, not a backbone: evaluate it "
                         f"with `heba-train evaluate --checkpoint {path}`")


def _weight_keys(path, head, size):
    import torch
    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        if any(n.split("/")[-1] == "constants.pkl" for n in names):
            return None
        return _tensor_keys(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    if _is_safetensors(head, size):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return list(f.keys())
    if head[:1] == b"\x80":                     # a pickle: torch.save's legacy format
        return _tensor_keys(torch.load(path, map_location="cpu", weights_only=True))
    raise UsageError(f"--pretrained {path} is not a weights file (expected safetensors, "
                     f"torch.save or TorchScript; it starts with {head[:12]!r})")


def _is_safetensors(head: bytes, size: int) -> bool:
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    return 0 < n < size and head[8:9] == b"{"


def _tensor_keys(obj):
    import torch
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return []
    return [k for k, v in obj.items() if isinstance(v, torch.Tensor)]


def check_images(datasets, log=None, mode: str = "fast") -> int:
    """Check every image of ``datasets`` (each with ``.items`` of ``.path``) with
    :func:`heba.data.check.check_images` (``mode``: ``"fast"`` header + end marker,
    ``"full"`` decode); raises :class:`heba.data.coop.DataError` naming the first bad file."""
    from heba.data.check import check_images as check_paths
    return check_paths([it.path for ds in datasets for it in getattr(ds, "items", ())
                        if getattr(it, "path", None)], mode)


def image_error(path: str, mode: str = "full") -> Optional[str]:
    """Why ``path`` cannot be read as an image (None when it can; :mod:`heba.data.check`)."""
    from heba.data.check import image_error as error
    return error(path, mode)


def one_line(err, limit: int = 240) -> str:
    """``str(err)`` on one line (whitespace runs collapsed), cut at ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
