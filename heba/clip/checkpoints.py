"""Adapter checkpoints: heba's own files, and the published HeBA / AdapterTune ones.

The published formats live in :mod:`heba.adapters.published` (whatever the
backbone) and are re-exported here; :func:`find_checkpoint` finds one from a
published run folder (``<out>/adapter_learner/model.pth.tar-<epoch>``).

heba's own checkpoints (:func:`save_adapters`) are a safetensors file with the
adapter weights only, beside a JSON file with the configuration, both written
atomically (temporary file, then ``os.replace``; the mode a plain ``open`` gives,
0666 less the umask). A training run's resumable state is one *set* per saved
epoch (:func:`write_set`: ``<run>/epoch_<N>/`` with the adapters, their JSON,
the optimizer state and a manifest of sizes and sha256, committed by one
rename); :func:`read_set` returns the latest and checks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from heba.adapters import get_adapters
from heba.adapters.published import (  # noqa: F401  (re-exported: their old home)
    IGNORED, CheckpointError, extract_state_dict, load_adapter_state, load_published_checkpoint,
    published_layout, read_published,
)

__all__ = ["CheckpointError", "load_published_checkpoint", "extract_state_dict",
           "find_checkpoint", "published_layout", "read_published",
           "load_adapter_state", "adapter_writers", "save_adapters", "load_adapters",
           "config_path",
           "atomic_write",
           "atomic_torch_save", "CheckpointSet", "write_set", "read_set", "remove_stale",
           "notify_written"]


def find_checkpoint(path: str) -> tuple[str, str]:
    """``(kind, file)`` for a checkpoint path: ``"heba"`` (safetensors + JSON) or ``"published"``.

    ``path`` is a file, a heba run folder (its final ``adapters.safetensors``, else its
    latest ``epoch_<N>/`` set), or a published run folder (``<out>`` or
    ``<out>/adapter_learner``: the
    ``model.pth.tar-<N>`` of largest ``N``, else ``model-best.pth.tar``).
    """
    if os.path.isfile(path):
        return ("heba" if path.endswith(".safetensors") else "published"), path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    own = os.path.join(path, "adapters.safetensors")
    if os.path.isfile(own):
        return "heba", own
    latest = read_set(path)                     # an unfinished heba run: its latest epoch
    if latest is not None and "adapters.safetensors" in latest.files:
        return "heba", latest.file("adapters.safetensors")
    folder = os.path.join(path, "adapter_learner")
    folder = folder if os.path.isdir(folder) else path
    tagged = [f for f in os.listdir(folder) if f.startswith("model.pth.tar-")
              and f.rsplit("-", 1)[1].isdigit()]
    if tagged:
        return "published", os.path.join(folder, max(tagged, key=lambda f: int(f.rsplit("-", 1)[1])))
    if os.path.isfile(os.path.join(folder, "model-best.pth.tar")):
        return "published", os.path.join(folder, "model-best.pth.tar")
    raise CheckpointError(f"{path} holds no checkpoint (adapters.safetensors, or "
                          f"adapter_learner/model.pth.tar-<epoch>)")


# --- heba's own checkpoints ------------------------------------------------------------------

# Called with a description after every write heba makes to a run folder (a file replaced,
# a line appended, a folder renamed or removed): the seam the fault-injection tests use to
# stop a run between any two writes. None in normal use.
WRITE_HOOK: Optional[Callable[[str], None]] = None


def notify_written(what: str) -> None:
    """Tell :data:`WRITE_HOOK` (if set) that ``what`` was just written."""
    if WRITE_HOOK is not None:
        WRITE_HOOK(what)


def _temp_name(path: str) -> str:
    """A fresh hidden name beside ``path`` (``.<name>.<pid>.<random>.tmp``)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then ``os.replace(tmp_path, path)``: readers never see half a file.

    The file gets the mode a plain ``open(path, "w")`` would (0666 less the umask), not
    ``mkstemp``'s 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _temp_name(path)
    try:
        _write_file(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    notify_written(path)


def _write_file(path: str, write) -> None:
    """``write(path)`` into a new file of mode 0666 less the umask, flushed to disk.

    (Writers that create their own file, as safetensors' does with 0600, get the mode
    back afterwards.)
    """
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))   # umask applies
    mode = os.stat(path).st_mode & 0o7777
    write(path)
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)
    _fsync(path)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:                      # some file systems do not support it for a folder
        pass
    finally:
        os.close(fd)


def adapter_writers(model: nn.Module, config: dict) -> dict:
    """``{"adapters.safetensors": write(path), "adapters.json": write(path)}`` for ``model``.

    The weights are taken now (detached CPU copies); each writer writes one file.
    """
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in get_adapters(model).state_dict().items()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_json(path):
        with open(path, "w") as f:
            f.write(text)

    return {"adapters.safetensors": lambda path: save_file(state, path,
                                                           metadata={"format": "pt"}),
            "adapters.json": write_json}


def save_adapters(path: str, model: nn.Module, config: dict) -> None:
    """Write the adapter weights to ``path`` (safetensors) and ``config`` to ``path`` + ``.json``.

    The JSON is written last, so a checkpoint whose JSON exists is complete.
    """
    writers = adapter_writers(model, config)
    atomic_write(path, writers["adapters.safetensors"])
    atomic_write(config_path(path), writers["adapters.json"])


def read_config(path: str, require=()) -> dict:
    """The JSON beside checkpoint ``path`` (:func:`read_json_object`)."""
    cfg = config_path(path)
    if not os.path.exists(cfg):
        raise CheckpointError(f"checkpoint {path} has no configuration file {cfg}")
    return read_json_object(cfg, require)


def read_json_object(path: str, require=()) -> dict:
    """A JSON object file; :class:`CheckpointError` if it is missing, does not parse, is not
    an object, or lacks one of the keys in ``require``."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} does not parse as JSON ({type(err).__name__}: "
                              f"{_first_line(err)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a JSON object (got {type(obj).__name__})")
    missing = [k for k in require if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks key(s) {', '.join(missing)}: not a configuration "
                              f"written by heba-train")
    return obj


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def load_adapters(path: str, model: nn.Module) -> None:
    """Load a checkpoint written by :func:`save_adapters` into ``model``'s adapters."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_file(path)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    load_adapter_state(model, state, path)


def config_path(path: str) -> str:
    """The JSON file beside checkpoint ``path`` (``x.safetensors`` -> ``x.json``)."""
    root = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    return root + ".json"


_config_path = config_path      # its old name, still used by the classification trainer


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
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{EPOCH_PREFIX}{epoch}.partial-{os.getpid()}-"
                                   f"{os.urandom(3).hex()}")
    os.mkdir(partial)                               # 0777 less the umask
    notify_written(partial)
    files = {}
    for name, write in writers.items():
        path = os.path.join(partial, name)
        _write_file(path, write)
        files[name] = _describe(path)
        notify_written(path)
    manifest = os.path.join(partial, MANIFEST)
    text = json.dumps(dict(format="heba-checkpoint-set", version=1, epoch=epoch, files=files),
                      indent=2, sort_keys=True) + "\n"
    _write_file(manifest, lambda p: _write_text(p, text))
    notify_written(manifest)
    _fsync(partial)
    os.rename(partial, final)
    _fsync(folder)
    notify_written(final)
    remove_stale(folder, keep=epoch)
    return CheckpointSet(final, epoch, files)


def remove_stale(folder: str, keep: Optional[int]) -> None:
    """Remove every ``epoch_<n>`` folder but ``keep``'s, and heba's hidden leftovers."""
    if not os.path.isdir(folder):
        return
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
        got = _describe(fpath)
        if got["bytes"] != want.get("bytes"):
            raise CheckpointError(f"{fpath} is {got['bytes']} bytes, its manifest says "
                                  f"{want.get('bytes')} (truncated or replaced)" + hint)
        if got["sha256"] != want.get("sha256"):
            raise CheckpointError(f"{fpath} does not match its manifest's sha256 (changed "
                                  f"after it was written)" + hint)
    return CheckpointSet(path, epoch, files)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _describe(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return dict(bytes=os.path.getsize(path), sha256=h.hexdigest())
