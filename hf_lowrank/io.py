"""Crash-safe writing: every file goes to a temporary sibling first and is renamed into place.

A crash (or a kill) mid-save leaves the previous file, or the previous checkpoint directory, intact; a folder is
swapped in with one ``renameat2(RENAME_EXCHANGE)`` where Linux has it, so ``path`` is never missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import SaveConflictError

__all__ = [
    "SaveConflictError",
    "atomic_directory",
    "check_plain_name",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "carried_over",
    "read_json",
    "read_safetensors_header",
    "recover_directory",
]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_atomically(path: str | os.PathLike, write) -> None:
    """Have ``write(tmp)`` fill a temporary sibling of ``path``; fsync it, ``os.replace`` it over ``path``, fsync the
    folder. On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, fsync, then ``os.replace``."""
    _replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Read JSON with an error naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} '{path}' does not exist. Check the path, or re-create it.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"The {what} '{path}' is not valid JSON ({exc}); it may be truncated or edited. Re-create it."
        ) from exc


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temporary sibling and ``os.replace``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(
    path: str | os.PathLike,
    *,
    data: bytes | None = None,
    what: str = "weights file",
    fix: str = "Copy, download or save it again.",
    error: type[Exception] = ValueError,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The checked header of a safetensors file, read without loading any tensor.

    Every entry must have a safetensors dtype, a shape of sizes and ``data_offsets`` spanning exactly its bytes, and
    the file must hold all the data the header places.

    Args:
        path: the file (read from disk unless ``data`` is given; named in the errors).
        data: the file's bytes, when the caller already read them (e.g. to hash them).
        what: how the errors call the file (``"residual weights file"``).
        fix: the sentence the errors end with, what to do about it.
        error: the exception class raised.

    Returns:
        ``(tensors, metadata)``: ``{name: {"dtype", "shape", "data_offsets"}}`` and the ``__metadata__`` strings
        (``{}`` when the file has none).

    Raises:
        error: the header is unreadable (not JSON, a malformed entry), or the file is shorter than the header says.
    """
    path = Path(path)
    try:
        if data is None:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(8)
                header_len = int.from_bytes(head, "little")
                raw = fh.read(header_len) if len(head) == 8 and 0 < header_len <= size - 8 else b""
        else:
            size, header_len = len(data), int.from_bytes(data[:8], "little")
            raw = data[8 : 8 + header_len]
        if size < 8:
            raise ValueError("shorter than the 8-byte header length")
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError("header length past the end of the file")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("its __metadata__ is not a JSON object")
        end = max((_entry_end(key, entry) for key, entry in header.items()), default=0)
    except (ValueError, KeyError, TypeError) as exc:
        raise error(f"The {what} '{path}' is unreadable ({exc}); it is probably truncated or corrupted. {fix}") from exc
    if 8 + header_len + end > size:
        raise error(f"The {what} '{path}' is truncated ({size} bytes, its header needs {8 + header_len + end}). {fix}")
    return header, metadata


def _entry_end(key: str, entry: Any) -> int:
    """Check one header entry (known dtype, shape of non-negative ints, data extent matching them); its end."""
    dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(
        entry, dict) else (None, None, None)
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"tensor '{key}' has dtype {dtype!r}, not a safetensors dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"tensor '{key}' has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor '{key}' has data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _DTYPE_BYTES[dtype]:
        raise ValueError(
            f"tensor '{key}' is {dtype} of shape {shape} ({numel * _DTYPE_BYTES[dtype]} bytes) but holds "
            f"{offsets[1] - offsets[0]} bytes"
        )
    return offsets[1]


def check_plain_name(name: Any, *, field: str, where: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """Refuse a file name read from a JSON file unless it names a plain file inside the folder that JSON is in.

    A path (``"../outside.safetensors"``, ``"sub/x"``, an absolute path), ``"."``, ``".."``, an empty name or a
    non-string would make a loader read files outside the checkpoint.

    Args:
        name: the value read.
        field: the JSON field it came from (named in the error).
        where: the JSON file (named in the error).
        error: the exception class raised (a ValueError subclass of the caller's domain).

    Returns:
        ``name``.
    """
    plain = (
        isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        and "\0" not in name and os.sep not in name and not (os.altsep and os.altsep in name)
        and not os.path.isabs(name)
    )
    if not plain:
        raise error(
            f"The field '{field}' of '{where}' is {name!r}, not the plain name of a file in the same folder (a path "
            "there would make the loader read files outside the checkpoint): the file was edited or corrupted. "
            "Restore it from the original save, or re-create it."
        )
    return name


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` to ``dst``; copy where links are impossible (another file system, no link support)."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# Files of a previous save that a new save into the same folder must not inherit: whatever transformers, peft or
# hf-lowrank reads as (part of) the model, the adapter or the residual. A weights file the new save does not write
# would be loaded instead of (or together with) the new one, e.g. an old ``model.safetensors`` next to a new sharded
# save, which ``from_pretrained`` prefers.
_MODEL_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json",
)
_MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "adapter_config.json", "residual_manifest.json",
    "compression_report.json", "trainer_state.json",
})


def carried_over(entry: Path) -> bool:
    """Whether :func:`atomic_directory` keeps ``entry`` of the previous folder when the new save does not write it.

    Kept: sub-folders (the Trainer's ``checkpoint-*``, a ``compressed/`` or ``residual/`` written by a callback:
    separate saves that nothing reads as part of this folder) and files that are not part of a model, e.g. a
    tokenizer or a README saved earlier. Dropped: weights of any format (``*.safetensors`` including a Fisher state,
    ``*.bin``, ``*.pt``, ...), index files (``*.index.json``), ``config.json``, ``generation_config.json``,
    ``adapter_config.json``, ``residual_manifest.json``, ``compression_report.json`` and ``trainer_state.json``.
    """
    if entry.is_dir() and not entry.is_symlink():
        return True
    return entry.name not in _MODEL_FILES and not entry.name.endswith(_MODEL_SUFFIXES)


# ------------------------------------------------------------------------------------------- the atomic swap
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``; False where the C library, the kernel or the file system lacks it."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing folders in one step (``RENAME_EXCHANGE``); False where the system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to a ``dst`` that must not exist (``RENAME_NOREPLACE``, else a plain rename, which also
    fails onto a non-empty folder)."""
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        os.rename(src, dst)


_STALE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}")


def _siblings(path: Path, kind: str) -> list[Path]:
    """The hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` folders that atomic_directory makes beside ``path``."""
    out = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            m = _STALE.fullmatch(entry.name)
            if m and m["name"] == path.name and m["kind"] == kind and entry.is_dir():
                out.append(entry)
    return sorted(out, key=lambda p: p.stat().st_mtime)


@contextlib.contextmanager
def _writer_lock(path: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold the per-folder writer lock (``flock`` on a hidden ``.NAME.lock`` beside ``path``, removed on release).

    Yields True when held. With ``wait=False`` a lock held by another writer raises :class:`SaveConflictError`;
    ``wait=None`` yields False instead (for the recovery a load runs). Where ``fcntl`` is missing, yields True.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            if wait is None:
                yield False
                return
            raise SaveConflictError(
                f"Another process (or thread) is saving to '{path}' right now; this save was not started. Wait for "
                "it to finish, or save to another folder."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # the previous holder may have removed the file
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _recover_locked(path: Path, *, clean: bool) -> None:
    if not path.exists():
        # A kill between the two renames of the fallback swap: the previous folder waits in .NAME.old-*/NAME.
        for trash in reversed(_siblings(path, "old")):
            if (trash / path.name).is_dir():
                os.replace(trash / path.name, path)
                _fsync_dir(path.parent)
                break
    if clean:  # under the writer lock, every temporary beside path belongs to a writer that was killed
        for stale in _siblings(path, "tmp") + _siblings(path, "old"):
            shutil.rmtree(stale, ignore_errors=True)


def recover_directory(path: str | os.PathLike) -> None:
    """Restore a folder that a save killed mid-swap left only as a hidden ``.NAME.old-*`` sibling.

    Every load of hf-lowrank runs this first (every save too, inside :func:`atomic_directory`); it changes nothing
    when ``path`` exists, and leaves the folder to a writer that is saving it right now.
    """
    path = Path(path)
    if path.exists() or not _siblings(path, "old"):
        return
    with contextlib.suppress(OSError), _writer_lock(path, wait=None) as held:
        if held:
            _recover_locked(path, clean=False)


def _carry_over(path: Path, tmp: Path) -> None:
    for old in path.iterdir():
        target = tmp / old.name
        if target.exists() or target.is_symlink() or not carried_over(old):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.copytree(old, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(old, target)


def _swap(tmp: Path, path: Path) -> None:
    """Put the complete ``tmp`` at ``path``; ``path`` is never missing, even for a process killed midway."""
    if not path.exists():
        try:
            _rename_noreplace(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise SaveConflictError(
                f"'{path}' was created by another writer while this save ran; this save was discarded and '{path}' "
                "left as the other writer made it. Save again (or to another folder)."
            ) from exc
        return
    if _exchange(tmp, path):  # tmp now holds the previous folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # Without RENAME_EXCHANGE: two renames; a kill between them leaves the previous folder in .NAME.old-*/NAME,
    # which recover_directory (run by every load and save) moves back.
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, trash / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(trash / path.name, path)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` in one step.

    Entries of the previous ``path`` that the new save does not write are carried over as hard links (a copy only
    where the file system has none) when :func:`carried_over` says they are safe to keep: sub-folders (the Trainer's
    ``checkpoint-*``) and files that are not part of a model (a tokenizer saved earlier); never weights, index or
    config files of a model, adapter or residual, which would be loaded with (or instead of) the new save.

    The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, and a process killed between
    them leaves the previous folder as a hidden ``.NAME.old-*`` sibling that :func:`recover_directory` (which every
    load and save runs first) puts back. If the body raises, ``path`` is left as it was and the temporary directory
    is removed; after a kill it is left as a hidden ``.NAME.tmp-*`` sibling that the next save removes.

    Raises:
        SaveConflictError: ``path`` is a file, or another writer is saving to it at the same time (nothing is
            written, nothing left behind).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaveConflictError(
            f"Cannot save to '{path}': it is a file, not a folder. Pass a folder path, or remove the file first."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(path):
        _recover_locked(path, clean=True)
        before = _identity(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            if _identity(path) != before:  # only a writer that ignores the lock gets here
                raise SaveConflictError(
                    f"'{path}' was {'created' if before is None else 'replaced'} by another writer while this save "
                    f"ran; this save was discarded and '{path}' left as the other writer made it. Save again (or to "
                    "another folder)."
                )
            if path.exists():
                _carry_over(path, tmp)
            _fsync_dir(tmp)
            _swap(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync_dir(path.parent)
