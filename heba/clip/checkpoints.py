"""Adapter checkpoints: heba's own files, and the published HeBA / AdapterTune ones.

The published formats live in :mod:`heba.adapters.published` (whatever the
backbone) and are re-exported here; :func:`find_checkpoint` finds one from a
published run folder (``<out>/adapter_learner/model.pth.tar-<epoch>``).

heba's own checkpoints (:func:`save_adapters`) are a safetensors file with the
adapter weights only, beside a JSON file with the configuration, both written
atomically (temporary file, then ``os.replace``; the mode a plain ``open`` gives,
0666 less the umask). A training run's resumable state (one checkpoint set per
saved epoch) is the trainer's: :mod:`heba.train.run_folder`.
"""

from __future__ import annotations

import errno
import json
import os

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
           "atomic_write", "replace_with", "write_file", "temp_name", "fsync",
           "atomic_torch_save", "WriteError", "write_error"]


def find_checkpoint(path: str) -> tuple[str, str]:
    """``(kind, file)`` for a checkpoint path: ``"heba"`` (safetensors + JSON) or ``"published"``.

    ``path`` is a file, a folder holding ``adapters.safetensors``, or a published run folder (``<out>`` or
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


class WriteError(OSError):
    """A write that failed, on one line: the path and the cause (:func:`write_error`)."""


def write_error(err: BaseException, path: str) -> WriteError:
    """``err`` (raised writing ``path``) as a :class:`WriteError`: ``cannot write PATH: cause``,
    the cause by its name (``no space left on device``, ``permission denied``, ...)."""
    if isinstance(err, WriteError):
        return err
    code = getattr(err, "errno", None)
    cause = os.strerror(code).lower() if code else (" ".join(str(err).split()) or
                                                    type(err).__name__)
    where = getattr(err, "filename", None) or path
    out = WriteError(f"cannot write {where}: {cause}")
    out.errno = code
    return out


def no_space(path: str) -> bool:
    """Whether the file system holding ``path`` is full (under 64 KiB left to this user)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def temp_name(path: str) -> str:
    """A fresh hidden name beside ``path`` (``.<name>.<pid>.<random>.tmp``)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then ``os.replace(tmp_path, path)``: readers never see half a file.

    The file gets the mode a plain ``open(path, "w")`` would (0666 less the umask), not
    ``mkstemp``'s 0600.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_with(path, lambda tmp: write_file(tmp, write))


def replace_with(path: str, make) -> None:
    """``make(tmp)`` into a fresh hidden name beside ``path``, then one ``os.replace``: readers
    see the old file or the new one; ``tmp`` is removed when either step fails."""
    tmp = temp_name(path)
    try:
        make(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_file(path: str, write) -> None:
    """``write(path)`` into a new file of mode 0666 less the umask, flushed to disk.

    (Writers that create their own file, as safetensors' does with 0600, get the mode
    back afterwards.)
    """
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))   # umask applies
    mode = os.stat(path).st_mode & 0o7777
    try:
        write(path)
    except OSError:
        raise
    except Exception as err:
        # A writer that hides the cause (torch.save on a full disk: "enforce fail ...
        # unexpected pos"): name it when the file system is full.
        if no_space(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from err
        raise
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)
    fsync(path)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def fsync(path: str) -> None:
    """``os.fsync`` a file or folder (a no-op where the file system does not support it)."""
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


