"""A run folder: what it holds, and every write the trainer makes to it.

::

    <run>/config.json              the configuration (written first)
    <run>/split_<sub>.json         the images the run uses (``heba-train split``'s format)
    <run>/metrics.jsonl            one line per epoch and evaluation
    <run>/epoch_<N>/               the latest saved epoch, committed as one set
        adapters.safetensors, adapters.json, train_state.pt, manifest.json
    <run>/adapters.safetensors     the finished run's adapters (+ adapters.json: hard links
    <run>/summary.md               to the last set's files), once that set is committed

Only ``epoch_<N>/`` is read by ``--resume``; the top-level adapters are the result
(they exist once the run has finished). ``metrics.jsonl`` is trimmed on resume to
the records of the committed epochs, so an epoch is never listed twice.

Example::

    >>> state = inspect("/nonexistent/run")
    >>> state.holds_run, state.latest
    (False, None)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from heba.clip import checkpoints as ckpt

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
    epochs = ckpt.set_epochs(path)
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
    for name in (CKPT_JSON, CKPT_NAME, SUMMARY_NAME, STATE_NAME):
        _remove(os.path.join(path, name))
    ckpt.remove_stale(path, keep=None)
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
    ckpt.notify_written(f"removed {path}")


def trim_metrics(path: str, epoch: int) -> None:
    """Keep the records of ``path`` up to the committed ``epoch`` (none for 0); drop the rest.

    A record is a JSON object per line with an ``"epoch"``; a line cut short by a kill
    does not parse and goes too. Rewritten atomically, and only when something changes.
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
        if epoch > 0 and isinstance(rec, dict) and isinstance(rec.get("epoch"), int) \
                and rec["epoch"] <= epoch:
            keep.append(line)
    if keep == lines:
        return
    if not keep:
        _remove(path)
        return
    text = "".join(line + "\n" for line in keep)
    ckpt.atomic_write(path, lambda tmp: write_text(tmp, text))


def append_record(path: str, record: dict) -> None:
    """One line of ``metrics.jsonl``, flushed to disk before the next write."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    ckpt.notify_written(path)


def publish_final(path: str, latest: ckpt.CheckpointSet, summary: str) -> None:
    """The finished run's adapters (copied from its last set) and ``summary.md`` at the top."""
    for name in (CKPT_NAME, CKPT_JSON):             # the JSON last: it marks the run finished
        _publish(latest.file(name), os.path.join(path, name))
    ckpt.atomic_write(os.path.join(path, SUMMARY_NAME), lambda tmp: write_text(tmp, summary))


def _publish(src: str, dst: str) -> None:
    """``dst`` = ``src`` atomically: a hard link where the file system allows (no second copy
    of a large checkpoint; neither name is ever written in place), else a copy."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return                      # already this file (rename would leave the link behind)
    tmp = ckpt._temp_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    ckpt.notify_written(dst)


def is_published(path: str, latest: ckpt.CheckpointSet) -> bool:
    """Whether the top-level adapters and summary are those of ``latest``."""
    for name in (CKPT_NAME, CKPT_JSON):
        top = os.path.join(path, name)
        if not os.path.isfile(top) or ckpt._describe(top) != latest.files[name]:
            return False
    return os.path.isfile(os.path.join(path, SUMMARY_NAME))


def write_text(tmp: str, text: str) -> None:
    with open(tmp, "w") as f:
        f.write(text)
