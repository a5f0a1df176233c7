"""How dq's command-line entries report what a user can fix: one line, `dq: error: <message>`, exit code 2.

    run_hydra_entry(main)          # train.py / evaluate.py: wraps a @hydra.main function
    parser = ArgumentParser(...)   # python -m dq... entries: argparse's own errors in the same form
    with reported_errors(): ...    # python -m dq... entries: the body of main()

A user's mistake is a `dq.errors.UserError`, one of Hydra's config errors (an unknown group option, an
override that does not parse, a missing `???` value), or an OS error on a path (permission denied, a
read-only or full disk). Everything else is a programming error and keeps its full traceback.
`--debug` (or HYDRA_FULL_ERROR=1) shows the full stack for a user's mistake too.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from dq.errors import UserError

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "DQ_DEBUG"
# OS errors a user fixes by choosing another path or freeing room, not by changing code
PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.ENAMETOOLONG, errno.ENOENT}
CONF_DIR = Path(__file__).resolve().parent / "conf"  # the Hydra configs, shipped inside the package
HYDRA_FILES = (".hydra",)  # what Hydra writes into a run dir before the job starts (plus <job>.log)


def one_line(text: str) -> str:
    """`text` on one line: Hydra's "Available options in 'quant':" list becomes "...: w4a4, w4a8, ..."."""
    parts: list[str] = []
    options: list[str] = []
    for raw in str(text).splitlines():
        line = raw.strip()
        if not line:
            continue
        if raw[:1] == "\t" and parts and parts[-1].rstrip().endswith(":"):  # an option of the list above
            options.append(line)
            continue
        if options:
            parts[-1] += " " + ", ".join(options)
            options = []
        parts.append(line)
    if options:
        parts[-1] += " " + ", ".join(options)
    return "; ".join(parts)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def user_message(err: BaseException) -> str | None:
    """The one-line message of a user's mistake, or None for a programming error."""
    for link in _chain(err):
        if isinstance(link, UserError):
            return one_line(str(link))
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in PATH_ERRNOS:
            where = link.filename or "a path"
            return (f"{where}: {link.strerror}; check the path and its permissions (an output dir is set with "
                    "hydra.run.dir=...)")
    hydra_message = _hydra_message(err)
    if hydra_message is not None:
        return hydra_message
    return None


def _hydra_message(err: BaseException) -> str | None:
    try:
        from hydra.errors import CompactHydraException
        from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
    except ImportError:  # the light entries (python -m dq.export) may run without Hydra
        return None
    if isinstance(err, CompactHydraException):
        message = one_line(str(err))
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException):
            message += "; " + one_line(str(cause))
        return message
    for link in _chain(err):
        if isinstance(link, MissingMandatoryValue):
            return one_line(f"a required config value is not set: {link}")
    return None


def fail(message: str) -> NoReturn:
    """Print `dq: error: <message>` (one line) to stderr and exit with code 2."""
    print(f"dq: error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def debug_requested() -> bool:
    """Full stacks for user errors too: `--debug` on the command line (run_hydra_entry sets DQ_DEBUG=1 for
    it), DQ_DEBUG=1 or HYDRA_FULL_ERROR=1 in the environment (DQ_DEBUG=0 overrides the latter)."""
    if os.environ.get(DEBUG_ENV) in ("0", "1"):
        return os.environ[DEBUG_ENV] == "1"
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def reported_errors(debug: bool | None = None) -> Iterator[None]:
    """Turn a user's mistake raised inside into `dq: error: ...` + exit 2 (unless debugging); re-raise the
    rest. SystemExit is not an Exception: raised inside a Hydra job, it passes Hydra's handlers untouched."""
    try:
        yield
    except Exception as err:
        message = None if (debug_requested() if debug is None else debug) else user_message(err)
        if message is None:
            raise
        fail(message)


def run_hydra_entry(main: Callable[[], Any]) -> None:
    """Call a @hydra.main function with dq's error reporting for what fails before the job starts (an unknown
    group option, an override that does not parse, an unwritable run dir). The job itself reports its own
    errors with `reported_errors` (inside the job, so that Hydra adds no line of its own)."""
    if DEBUG_FLAG in sys.argv[1:]:
        os.environ[DEBUG_ENV] = "1"
        sys.argv = [arg for arg in sys.argv if arg != DEBUG_FLAG]
    debug = debug_requested()
    os.environ[DEBUG_ENV] = "1" if debug else "0"  # the job's own handler decides the same way
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        with reported_errors(debug):
            main()
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors read `dq: error: <prog>: <message>` (one line, exit 2), like dq's own."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see {self.prog} --help)")


@contextlib.contextmanager
def discard_if_untouched(run_dir: str | os.PathLike) -> Iterator[None]:
    """On a user's mistake, remove what Hydra wrote into `run_dir` before the job (`.hydra/`, `<job>.log`),
    and `run_dir` itself if that leaves it empty, so that a refused run leaves no folder behind. A run dir
    holding anything else (checkpoints, samples, results of an earlier run) is left as it is."""
    try:
        yield
    except BaseException as err:
        refused = isinstance(err, SystemExit) and err.code == EXIT_USER_ERROR
        if refused or (isinstance(err, Exception) and user_message(err) is not None):
            _remove_hydra_leftovers(Path(run_dir))
        raise


def _remove_hydra_leftovers(run_dir: Path) -> None:
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    # plan.json: every run writes its plan before it starts (dq.jobs.plan); a refused run's goes with it
    if not all(e.name in (*HYDRA_FILES, "plan.json") or (e.is_file() and e.suffix == ".log") for e in entries):
        return
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def entry(main: Callable[[list[str]], Any]) -> Callable[[list[str] | None], Any]:
    """Decorate a `python -m dq...` main(argv): `--debug` is taken out of argv, and a user's mistake raised
    inside becomes `dq: error: ...` with exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> Any:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in args or debug_requested()
        with reported_errors(debug):
            return main([arg for arg in args if arg != DEBUG_FLAG])

    return wrapped
