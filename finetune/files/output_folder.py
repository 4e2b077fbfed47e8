"""Output folders that never touch a command's own inputs, and that land whole or not at all.

Every command that writes a folder (export, tiny, evaluate, the demo, training's `output_dir`) first
checks, before loading anything, that the folder is none of its inputs, holds none of them and lies in
none of them (resolved paths, so symlinks count), and that it is new or empty unless the user said
`--overwrite`.

Folders written in one go (export, tiny, evaluate) are then built in a hidden sibling `.NAME.partial`
and renamed to NAME only after everything, the export's verification included, has succeeded: a
failure or a kill never leaves a half-written NAME, and an existing NAME (with `--overwrite`) is
replaced only at that moment. A `.partial` left by a killed run is removed by the next run to the same
folder; one still being written by a live process is refused.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from finetune.errors import InputError

OWNER_FILE = ".writer-pid"
RUN_LOCK_FILE = ".run.lock"
"""In a training run's output_dir: locked (flock) by the process training there, so two runs never share one
folder. The lock dies with its process, so the file a killed run leaves behind blocks nothing."""


class OutputError(InputError):
    """An output folder that would overwrite an input or someone else's files; the message says which."""


def overlap(out: str | Path, inputs: Mapping[str, str | Path | None]) -> str | None:
    """How `out` collides with one of the named input paths (is it, holds it, or lies inside it), or None."""
    target = resolved(out)
    for name, path in inputs.items():
        if path is None or not Path(path).exists():
            continue  # a Hub id, or nothing given
        source = resolved(path)
        if target == source:
            return f"it is the {name} ({path})"
        if source.is_relative_to(target):
            return f"it holds the {name} ({path})"
        if target.is_relative_to(source):
            return f"it lies inside the {name} ({path})"
    return None


def resolved(path: str | Path) -> Path:
    """The absolute path with links followed; an OutputError for a symlink loop (which `resolve` raises on)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as err:
        raise OutputError(f"{path}: cannot be followed ({err}); choose another folder") from None


def check_output(out: str | Path, inputs: Mapping[str, str | Path | None], overwrite: bool = False,
                 option: str = "--out") -> None:
    """Refuse an output folder that collides with an input, is a file, or is not empty (unless overwrite)."""
    out = Path(out)
    collision = overlap(out, inputs)
    if collision:
        raise OutputError(f"{option} {out}: {collision}; a command never writes into its own inputs. "
                          f"Choose a new folder for {option}.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out}: is a file, not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{option} {out}: the folder exists and is not empty ({listing(out)}). "
                          "Choose a new folder, or pass --overwrite to replace it once the new one is complete.")


def listing(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces `out`, on any failure it is
    removed and `out` is left as it was. The caller has run `check_output` first."""
    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(partial, out)
    partial.mkdir()
    (partial / OWNER_FILE).write_text(str(os.getpid()))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / OWNER_FILE).unlink()
    if out.exists():
        # Swap, then delete the old one: at no moment is there a half-written folder under `out`.
        replaced = out.parent / f".{out.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        out.rename(replaced)
        partial.rename(out)
        shutil.rmtree(replaced)
    else:
        partial.rename(out)


def _clear_stale(partial: Path, out: Path) -> None:
    if not partial.exists():
        return
    owner = (partial / OWNER_FILE).read_text().strip() if (partial / OWNER_FILE).is_file() else ""
    pid = int(owner) if owner.isdigit() else None
    if pid is not None and pid != os.getpid() and is_alive(pid):
        raise OutputError(f"{out}: process {pid} is writing it right now ({partial}); wait for it or stop it")
    print(f"removing {partial}, left unfinished by an earlier run that was stopped")
    shutil.rmtree(partial)


def is_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
