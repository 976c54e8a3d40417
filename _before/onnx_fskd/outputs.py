"""Every file a command writes, staged and committed together: a failed run leaves nothing behind,
and no output is (or resolves to, through links) one of the command's inputs.

    outputs = OutputSet(protected=input_files(teacher, data), force=force)
    outputs.claim(out, "-o")              # checked before any slow work
    ...
    with outputs.commit_on_success():
        outputs.stage(out, lambda path: write_model(model, path, like))
        outputs.stage(report, lambda path: write_json(document, path))

Each output is written to a staging folder beside its target (``.NAME.XXXX``); only when every one is
staged are they renamed into place. A failure at any point removes the staging folders, and a failed
rename puts back whatever the commit had already replaced."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import FskdError, UsageError
from .model_io import external_data_files, write_model

Writer = Callable[[Path], list[Path]]  # writes the output at the path given, returns every file it wrote


@dataclass(frozen=True)
class _Staged:
    target: Path
    folder: Path
    files: list[Path]  # inside ``folder``, each renamed to target.parent / its name


@dataclass
class OutputSet:
    """The outputs of one command run, checked against its inputs and written all or nothing."""

    protected: list[Path]
    force: bool = False
    claimed: dict[Path, str] = field(default_factory=dict, init=False)
    _staged: list[_Staged] = field(default_factory=list, init=False, repr=False)

    def claim(self, path: str | os.PathLike, option: str, force: bool | None = None) -> Path:
        """Check an output path before any work: not an input, not another output, not existing without
        --force (``force`` overrides the set's), in an existing writable folder."""
        if str(path).strip() == "":
            raise UsageError(f"{option} is empty; give a file name")
        path = Path(path)
        self._check_not_input(path, option)
        for other, other_option in self.claimed.items():
            if _same_file(path, other):
                raise UsageError(f"{option} {path} is the same file as {other_option} {other}")
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name")
        if path.exists() and not path.is_file():  # a device such as /dev/full, a FIFO: never replaced by a file
            raise UsageError(f"{option} {path} is not a regular file; give a file name")
        if path.exists() and not (self.force if force is None else force):
            raise UsageError(f"{option} {path} exists; pass --force to overwrite it")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise FskdError(f"cannot write {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FskdError(f"cannot write {path}: folder {parent} is not writable")
        self.claimed[path] = option
        return path

    def stage(self, path: Path, write: Writer) -> None:
        """Write one output into a staging folder beside ``path``; any OSError becomes one FskdError."""
        folder = None
        try:
            folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=str(path.resolve().parent)))
            files = write(folder / path.name)
            for file in files:
                self._check_not_input(path.parent / file.name, self.claimed.get(path, "output"))
            self._staged.append(_Staged(path, folder, files))
        except OSError as exc:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise FskdError(f"cannot write {path}: {_describe(exc)}") from None
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def commit_on_success(self) -> Iterator[OutputSet]:
        """Commit everything staged inside the block if it ends normally; otherwise discard it all."""
        try:
            yield self
            self._commit()
        finally:
            self._discard()

    def _commit(self) -> None:
        """Rename every staged file into place; on a failure restore what was replaced and remove the rest."""
        moves = [(staged.folder, file, staged.target.parent / file.name) for staged in self._staged
                 for file in staged.files]
        done: list[tuple[Path, Path, Path | None]] = []  # (target, staged file, backup of the old target)
        target = None
        try:
            for folder, file, target in moves:
                backup = None
                if target.exists() or target.is_symlink():
                    backup = folder / f".previous.{target.name}"
                    os.replace(target, backup)
                done.append((target, file, backup))
                os.replace(file, target)
        except OSError as exc:
            for target, file, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, target)
                    elif target.exists() and not file.exists():
                        target.unlink()
            raise FskdError(f"cannot write {target}: {_describe(exc)}; nothing was written") from None

    def _discard(self) -> None:
        for staged in self._staged:
            shutil.rmtree(staged.folder, ignore_errors=True)
        self._staged.clear()

    def _check_not_input(self, path: Path, option: str) -> None:
        for source in self.protected:
            if _same_file(path, source):
                raise UsageError(f"{option} {path} is the same file as input {source}; choose another name")


def write_json(document: dict, path: Path) -> list[Path]:
    path.write_text(json.dumps(document, indent=2) + "\n")
    return [path]


def _same_file(a: Path, b: Path) -> bool:
    """The same file by path (links resolved) or by inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def protected_files(models: Iterable[str | os.PathLike | None],
                    files: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
    """The input files no output may be: the models with their external-data files, and the other files."""
    protected: list[Path] = []
    for model in filter(None, models):
        protected += [Path(model), *external_data_files(model)]
    return protected + [Path(file) for file in filter(None, files)]


def save_model_atomic(model: onnx.ModelProto, out: str | os.PathLike, like: onnx.ModelProto | None = None,
                      force: bool = True, option: str = "output") -> Path:
    """Write one model, all or nothing (an existing ``out`` only with ``force``): the one-call form of OutputSet."""
    outputs = OutputSet(protected=[], force=force)
    out = outputs.claim(out, option)
    with outputs.commit_on_success():
        outputs.stage(out, lambda path: write_model(model, path, like))
    return out
