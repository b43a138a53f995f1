"""A run folder: what it holds, and every write the trainer makes to it.

::

    <run>/config.json              the configuration (written first)
    <run>/split_<sub>.json         the images the run uses (``heba-train split``'s format)
    <run>/metrics.jsonl            one line per epoch and evaluation
    <run>/epoch_<N>/               the latest saved epoch, committed as one set
        adapters.safetensors, adapters.json, train_state.pt, manifest.json
    <run>/adapters.safetensors     the finished run's adapters (+ adapters.json: hard links
    <run>/summary.md               to the last set's files), once that set is committed

    <run>/.heba-train.lock         held (fcntl.flock) by the one process running it

Only ``epoch_<N>/`` is read by ``--resume``; the top-level adapters are the result
(they exist once the run has finished). ``metrics.jsonl`` is trimmed on resume to
the records of the committed epochs, so an epoch is never listed twice (records
the run did not write, as ``heba-train evaluate -o``'s, stay).

A write that fails is one :class:`WriteError` line naming the path and the cause
(``no space left on device``); a set that fails half-way is removed at once. A set
is written beside the previous one, which goes only after the new one is committed:
a run needs room for two sets. SIGINT / SIGTERM (:func:`handle_signals`) wait for the
write in progress, then stop the run (:class:`Interrupted`).

Example::

    >>> state = inspect("/nonexistent/run")
    >>> state.holds_run, state.latest
    (False, None)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from heba.clip import checkpoints as ckpt
from heba.clip.checkpoints import CheckpointError, WriteError  # noqa: F401  (re-exported)

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.md"
CKPT_NAME = "adapters.safetensors"
CKPT_JSON = "adapters.json"
STATE_NAME = "train_state.pt"
RUN_FILES = (CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, CKPT_NAME, CKPT_JSON, STATE_NAME)


@dataclass
class FolderState:
    """What ``path`` holds: heba's files by name, the epochs of its sets, the final adapters."""

    path: str
    exists: bool
    files: tuple            # heba's top-level files present (RUN_FILES order)
    epochs: list            # epoch_<n> folders, largest first
    latest: Optional[int]   # the largest saved epoch (None: none)

    @property
    def holds_run(self) -> bool:
        return bool(self.files or self.epochs)

    @property
    def finished(self) -> bool:
        return CKPT_JSON in self.files


def inspect(path: str) -> FolderState:
    """Look at ``path`` without reading any file's content."""
    if not os.path.isdir(path):
        return FolderState(path, os.path.exists(path), (), [], None)
    files = tuple(f for f in RUN_FILES if os.path.exists(os.path.join(path, f)))
    epochs = set_epochs(path)
    return FolderState(path, True, files, epochs, epochs[0] if epochs else None)


def read_json(path: str) -> Optional[dict]:
    """A JSON object file, or None when it is missing or does not parse as one."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# --- writes ----------------------------------------------------------------------------------

def clear(path: str) -> None:
    """Remove a previous run's files from ``path`` (``--overwrite``); other files stay.

    The result goes first and the configuration last, so a folder cleared half-way still
    reads as a run (``--overwrite`` again finishes the job).
    """
    with writing(path):
        _clear(path)


def _clear(path: str) -> None:
    for name in (CKPT_JSON, CKPT_NAME, SUMMARY_NAME, STATE_NAME):
        _remove(os.path.join(path, name))
    remove_stale(path, keep=None)
    for name in sorted(os.listdir(path)):
        if name.startswith("split_") and name.endswith(".json"):
            _remove(os.path.join(path, name))
    for name in (METRICS_NAME, CONFIG_NAME):
        _remove(os.path.join(path, name))


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)
    else:
        return
    notify_written(f"removed {path}")


def trim_metrics(path: str, epoch: int) -> None:
    """Drop the training records of ``path`` after the committed ``epoch`` (all of them for
    0); keep every other line (``heba-train evaluate -o``'s records, anything without an
    integer ``"epoch"``).

    A line cut short by a kill does not parse and goes too. Rewritten atomically, and only
    when something changes.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ours = isinstance(rec, dict) and type(rec.get("epoch")) is int
        if not ours or (epoch > 0 and rec["epoch"] <= epoch):
            keep.append(line)
    if keep == lines:
        return
    if not keep:
        _remove(path)
        return
    text = "".join(line + "\n" for line in keep)
    atomic_write(path, lambda tmp: write_text(tmp, text))


def append_record(path: str, record: dict) -> None:
    """One line of ``metrics.jsonl``, flushed to disk before the next write.

    Strict JSON: a non-finite number is written as ``null`` (never a bare ``NaN``)."""
    line = json.dumps(finite_json(record), allow_nan=False) + "\n"
    with writing(path):
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        notify_written(path)


def finite_json(obj):
    """``obj`` with every NaN / infinity (in dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def publish_final(path: str, latest: "CheckpointSet", summary: str) -> None:
    """The finished run's adapters (copied from its last set) and ``summary.md`` at the top."""
    for name in (CKPT_NAME, CKPT_JSON):             # the JSON last: it marks the run finished
        _publish(latest.file(name), os.path.join(path, name))
    atomic_write(os.path.join(path, SUMMARY_NAME), lambda tmp: write_text(tmp, summary))


def _publish(src: str, dst: str) -> None:
    """``dst`` = ``src`` atomically: a hard link where the file system allows (no second copy
    of a large checkpoint; neither name is ever written in place), else a copy."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return                      # already this file (rename would leave the link behind)

    def link_or_copy(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    replace_with(dst, link_or_copy)


def is_published(path: str, latest: "CheckpointSet") -> bool:
    """Whether the top-level adapters and summary are those of ``latest``."""
    for name in (CKPT_NAME, CKPT_JSON):
        top = os.path.join(path, name)
        if not os.path.isfile(top) or describe(top) != latest.files[name]:
            return False
    return os.path.isfile(os.path.join(path, SUMMARY_NAME))


def write_text(tmp: str, text: str) -> None:
    """Write ``text`` to the file ``tmp`` (a writer of :func:`atomic_write`, :func:`write_set`)."""
    with open(tmp, "w") as f:
        f.write(text)


# --- atomic writes ---------------------------------------------------------------------------

# Called with a description after every write heba makes to a run folder (a file replaced,
# a line appended, a folder renamed or removed): the seam the fault-injection tests use to
# stop a run between any two writes. None in normal use.
WRITE_HOOK: Optional[Callable[[str], None]] = None


def notify_written(what: str) -> None:
    """Tell :data:`WRITE_HOOK` (if set) that ``what`` was just written."""
    if WRITE_HOOK is not None:
        WRITE_HOOK(what)


def atomic_write(path: str, write) -> None:
    """:func:`heba.clip.checkpoints.atomic_write`, then :func:`notify_written`."""
    with writing(path):
        ckpt.atomic_write(path, write)
        notify_written(path)


def replace_with(path: str, make) -> None:
    """:func:`heba.clip.checkpoints.replace_with`, then :func:`notify_written`."""
    with writing(path):
        ckpt.replace_with(path, make)
        notify_written(path)


# --- one write at a time: errors in one line, signals after the write ------------------------

class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised at a safe point: never inside a write (:func:`writing`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_DEPTH = [0]                # writes in progress (nested)
_PENDING: list = []         # a signal that arrived during one
_OWNER = [None]             # the pid whose handlers stop the run (a forked worker ignores them)


@contextlib.contextmanager
def writing(path: str):
    """One write (or a group of them) to ``path``: an ``OSError`` becomes a one-line
    :class:`WriteError` naming the path and the cause; SIGINT / SIGTERM wait for its end."""
    _DEPTH[0] += 1
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise ckpt.write_error(err, path) from None
    finally:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0 and _PENDING:
            raise Interrupted(_PENDING[0])


def _on_signal(signum, frame) -> None:
    # The run is stopping, in the DataLoader's workers too (Ctrl-C reaches the whole process
    # group): what is torn down half-way on the way out must not print a traceback, be it
    # an object torn down half-built (a DataLoader iterator interrupted while it starts its
    # workers) or a helper thread cut mid-transfer (multiprocessing's file-descriptor
    # sharer between a worker and the main process, whose peer has stopped reading).
    sys.unraisablehook = _quiet
    threading.excepthook = _quiet
    if os.getpid() != _OWNER[0]:    # a forked DataLoader worker: the main process stops it
        if signum == signal.SIGTERM:
            os._exit(128 + signum)      # quietly (no traceback from a worker)
        # The fd sharer's thread reports its errors through sys.excepthook itself; in a
        # worker that hook serves nothing else (torch sends the worker loop's errors to
        # the main process), so it goes quiet too.
        sys.excepthook = _quiet_excepthook
        return
    _PENDING[:] = [signum]      # kept: an exception raised inside an at-fork callback (a
    if not _DEPTH[0]:           # worker starting) is swallowed; check_stop raises it again
        raise Interrupted(signum)


def check_stop() -> None:
    """A safe point: raise :class:`Interrupted` if SIGINT / SIGTERM arrived and is pending."""
    if _PENDING and not _DEPTH[0]:
        raise Interrupted(_PENDING[0])


def _quiet(unraisable) -> None:
    pass


def _quiet_excepthook(exc_type, exc, tb) -> None:
    pass


def handle_signals() -> Callable[[], None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` at the next safe point (now, unless a
    write is in progress). Returns the function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _OWNER[0], _PENDING[:] = os.getpid(), []
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    hooks = sys.unraisablehook, threading.excepthook, sys.excepthook

    def restore():
        for s, h in old.items():
            signal.signal(s, h)
        sys.unraisablehook, threading.excepthook, sys.excepthook = hooks
        _PENDING[:] = []
    return restore


# --- one process per run folder ---------------------------------------------------------------

LOCK_NAME = ".heba-train.lock"
_LOCKS: dict = {}           # real path of a folder -> the open lock file this process holds


class FolderBusy(CheckpointError):
    """The run folder is locked by another process."""


def lock(folder: str) -> None:
    """Own ``folder`` for this process: ``fcntl.flock`` on its hidden lock file, held until
    :func:`unlock` or the process ends (a killed holder's lock is free at once). Raises
    :class:`FolderBusy` when another process holds it; nothing else is written."""
    import fcntl
    key = os.path.realpath(folder)
    if key in _LOCKS:
        return                                  # this process owns it already
    path = os.path.join(key, LOCK_NAME)
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise FolderBusy(f"{folder} is in use by another heba-train process"
                             + (f" (pid {holder})" if holder else "")
                             + ": wait for it to end, or pass another -o") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False                        # the holder removed it as we opened it
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def unlock(folder: str) -> None:
    """Give ``folder`` back: its lock file removed (while still held), then released."""
    fd = _LOCKS.pop(os.path.realpath(folder), None)
    if fd is None:
        return
    try:
        os.unlink(os.path.join(os.path.realpath(folder), LOCK_NAME))
    except OSError:
        pass
    os.close(fd)


def unlock_all() -> None:
    """Every folder this process holds (:func:`unlock`)."""
    for key in list(_LOCKS):
        unlock(key)


def locked(folder: str) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return os.path.realpath(folder) in _LOCKS


# --- a run's checkpoint, committed as one set ------------------------------------------------
#
# <run>/epoch_<N>/  adapters.safetensors, adapters.json, train_state.pt, manifest.json
#
# (torchtune's layout: one ``epoch_<N>`` folder per saved epoch, the largest N is the one
# to resume.) The set is written into a hidden partial folder and committed by one rename;
# a visible ``epoch_<N>`` folder is therefore always complete, and the previous one is only
# removed after the new one is in place.

EPOCH_PREFIX = "epoch_"
MANIFEST = "manifest.json"
_EPOCH_RE = re.compile(r"^epoch_(\d+)$")
_HIDDEN_RE = re.compile(r"^\.(epoch_\d+\.(partial|stale)-.*|.+\.\d+\.[0-9a-f]{8}\.tmp)$")


@dataclass
class CheckpointSet:
    """A committed set: ``path`` = ``<run>/epoch_<epoch>``, ``files`` = name -> size, sha256."""

    path: str
    epoch: int
    files: dict

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def epoch_dir(folder: str, epoch: int) -> str:
    return os.path.join(folder, f"{EPOCH_PREFIX}{epoch}")


def write_set(folder: str, epoch: int, writers: Mapping[str, Callable[[str], None]]
              ) -> CheckpointSet:
    """Commit ``{name: write(path)}`` as ``folder/epoch_<epoch>/``: all of it or none.

    The files go into a hidden ``.epoch_<epoch>.partial-*`` folder and are flushed;
    ``manifest.json`` (each file's size and sha256) is written last; one rename makes the
    folder ``epoch_<epoch>``; only then are older ``epoch_<n>`` folders removed (each
    renamed out of sight first). A kill at any point leaves the previous set or the new
    one, never a mix; leftovers are hidden and :func:`remove_stale` clears them.

    Example::

        write_set("runs/x", 3, {"a.json": lambda p: open(p, "w").write("{}")})
        read_set("runs/x").epoch        # 3
    """
    final = epoch_dir(folder, epoch)
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists: a set is never written twice")
    # The whole set is one write: a stop (SIGINT / SIGTERM) arriving at any point of it
    # waits for the commit and the removal of the older sets, so it leaves no partial set.
    with writing(folder):
        os.makedirs(folder, exist_ok=True)
        partial = os.path.join(folder, f".{EPOCH_PREFIX}{epoch}.partial-{os.getpid()}-"
                                       f"{os.urandom(3).hex()}")
        with writing(partial):
            os.mkdir(partial)                       # 0777 less the umask
        files = _commit_partial(folder, partial, final, epoch, writers)
        notify_written(final)
        remove_stale(folder, keep=epoch)
    return CheckpointSet(final, epoch, files)


def _commit_partial(folder: str, partial: str, final: str, epoch: int, writers: Mapping
                    ) -> dict:
    """Write the set into ``partial`` and rename it ``final``; on a failure remove it."""
    try:
        with writing(partial):
            notify_written(partial)
        files = _write_partial(partial, epoch, writers)
        with writing(final):
            os.rename(partial, final)
            ckpt.fsync(folder)
        return files
    except BaseException as err:
        # A write failed (a full disk): the partial set goes at once, so it does not keep
        # the disk full; the previous set is untouched. (A kill leaves it for remove_stale.)
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, WriteError) and err.errno == errno.ENOSPC:
            raise _more(err, f" (the unfinished set was removed; a run needs room for two "
                             f"sets: the previous one stays until the new one is "
                             f"committed)") from None
        raise


def _more(err: WriteError, text: str) -> WriteError:
    out = WriteError(str(err) + text)
    out.errno = err.errno
    return out


def _write_partial(partial: str, epoch: int, writers: Mapping) -> dict:
    """The set's files and its manifest, written into ``partial``; ``{name: description}``."""
    files = {}
    for name, write in writers.items():
        path = os.path.join(partial, name)
        with writing(path):
            ckpt.write_file(path, write)
            files[name] = describe(path)
            notify_written(path)
    manifest = os.path.join(partial, MANIFEST)
    text = json.dumps(dict(format="heba-checkpoint-set", version=1, epoch=epoch, files=files),
                      indent=2, sort_keys=True) + "\n"
    with writing(manifest):
        ckpt.write_file(manifest, lambda p: write_text(p, text))
        notify_written(manifest)
        ckpt.fsync(partial)
    return files


def remove_stale(folder: str, keep: Optional[int]) -> None:
    """Remove every ``epoch_<n>`` folder but ``keep``'s, and heba's hidden leftovers."""
    if not os.path.isdir(folder):
        return
    with writing(folder):
        _remove_stale(folder, keep)


def _remove_stale(folder: str, keep: Optional[int]) -> None:
    for name in sorted(os.listdir(folder)):
        m = _EPOCH_RE.match(name)
        path = os.path.join(folder, name)
        if m and int(m.group(1)) != keep and os.path.isdir(path):
            hidden = os.path.join(folder, f".{name}.stale-{os.getpid()}-{os.urandom(3).hex()}")
            os.rename(path, hidden)                 # out of sight at once, then removed
            notify_written(hidden)
            path = hidden
        elif not _HIDDEN_RE.match(name):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)
        notify_written(f"removed {path}")


def stale_entries(folder: str) -> list:
    """heba's hidden leftovers in ``folder`` (partial / stale sets, temporary files)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if _HIDDEN_RE.match(n))


def set_epochs(folder: str) -> list:
    """The epochs of the ``epoch_<n>`` folders in ``folder``, largest first."""
    if not os.path.isdir(folder):
        return []
    return sorted((int(m.group(1)) for m in map(_EPOCH_RE.match, os.listdir(folder))
                   if m and os.path.isdir(os.path.join(folder, m.group(0)))), reverse=True)


def read_set(folder: str) -> Optional[CheckpointSet]:
    """The latest committed set of ``folder`` (None if it has none), its files checked.

    Raises :class:`CheckpointError` naming the file when the set was damaged after it
    was written (a file missing, truncated or changed: its size or sha256 is not the
    manifest's).
    """
    epochs = set_epochs(folder)
    if not epochs:
        return None
    path = epoch_dir(folder, epochs[0])
    mpath = os.path.join(path, MANIFEST)
    hint = (f"; delete {path} to resume an earlier epoch if one is left, or start over "
            f"with --overwrite")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files, epoch = dict(manifest["files"]), int(manifest["epoch"])
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: not a set heba-train wrote" + hint) \
            from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{mpath} does not parse ({type(err).__name__}: "
                              f"{_first_line(err)})" + hint) from None
    if epoch != epochs[0]:
        raise CheckpointError(f"{mpath} says epoch {epoch}, its folder {epochs[0]}" + hint)
    for name, want in files.items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{fpath} is missing from its checkpoint set" + hint)
        got = describe(fpath)
        if got["bytes"] != want.get("bytes"):
            raise CheckpointError(f"{fpath} is {got['bytes']} bytes, its manifest says "
                                  f"{want.get('bytes')} (truncated or replaced)" + hint)
        if got["sha256"] != want.get("sha256"):
            raise CheckpointError(f"{fpath} does not match its manifest's sha256 (changed "
                                  f"after it was written)" + hint)
    return CheckpointSet(path, epoch, files)


def describe(path: str) -> dict:
    """``{"bytes", "sha256"}`` of the file ``path`` (a set's manifest entry)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return dict(bytes=os.path.getsize(path), sha256=h.hexdigest())


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
