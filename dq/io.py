"""The file and hashing helpers every layer of dq uses (it imports nothing from dq but dq.errors).

- atomic_write(path, write) / write_json(path, payload): a file appears whole or not at all;
- staged_dir(path): a folder written beside its target and renamed into place;
- place_file(source, target): a hard link (or copy) replacing target atomically;
- read_json_object(path, what): a JSON object, or a UserError naming the file;
- file_sha256(path), stable_key(payload): content hashes and short keys of JSON-able descriptions;
- derived_seed(*parts) / seeded_generator(*parts): independent, reproducible seeds from labels and numbers;
- check_writable_dir(path, what): refuse an unwritable output before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from dq.errors import UserError

STAGING_MARK = ".tmp-"  # staging files end in .tmp-<pid>: a writer that died can be told from a live one


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) then rename the temporary file onto `path` (never a half-written file). The
    temporary file lies beside `path` as `.<name>.<random>.tmp-<pid>`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{STAGING_MARK}{os.getpid()}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, payload: Any, **dumps: Any) -> None:
    """`payload` as indented JSON (plus a newline), written atomically."""
    text = json.dumps(payload, **{"indent": 2, **dumps})
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove the staging files of `path` (atomic_write's) left by processes that died while writing;
    returns what was removed. A live writer's file is kept."""
    removed = []
    for staging in path.parent.glob(f".{path.name}.*{STAGING_MARK}*"):
        pid = staging.name.rsplit(STAGING_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            staging.unlink(missing_ok=True)
            removed.append(staging)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `target`; when the block ends without error, `target` (if any) is
    replaced by it, else it is removed. The folder gets a plain directory's mode (mkdtemp's is private)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=STAGING_MARK + str(os.getpid()),
                                    dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link of `source` at `target` (no second copy on disk), or a copy where links are refused."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def place_file(source: Path, target: Path) -> Path:
    """`source` at `target` (hard link or copy), replacing `target` atomically; returns target."""
    def link(tmp: str) -> None:
        os.unlink(tmp)
        link_or_copy(source, Path(tmp))

    atomic_write(target, link)
    return target


def read_json_object(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """The JSON object in `path`; UserError naming the file (and `what` it is) when it is not one."""
    try:
        payload = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise UserError(f"{what} {path} must hold a JSON object, got {type(payload).__name__}")
    return payload


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_key(payload: Mapping[str, Any], digest_size: int = 10) -> str:
    """A short hex key of a JSON-serialisable description (keys sorted; other values by str())."""
    text = json.dumps(dict(payload), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=digest_size).hexdigest()


def derived_seed(*parts: Any) -> int:
    """A seed for torch generators from labels and numbers: a hash of "part0:part1:...", so distinct
    tuples never share a stream; fits in int64."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts: Any) -> torch.Generator:
    """A CPU torch.Generator seeded with derived_seed(*parts)."""
    return torch.Generator().manual_seed(derived_seed(*parts))


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create `path` if needed and prove a file can be written there, before any work depends on it;
    UserError naming `what` (e.g. "data.cache_dir") and the path otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dq-write-check-"):
            pass
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or err}); choose another path") from err
    return path
