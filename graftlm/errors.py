"""One exception type for everything a user can get wrong.

The CLI catches `GraftError` and prints its message as one line with a non-zero exit,
instead of a traceback. Raise it with a message that names the file, line or field.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path


class GraftError(Exception):
    """An error caused by the user's input (files, config, data), shown as one line."""


class ConfigError(GraftError):
    """A config field is missing, unknown, of the wrong type or out of range."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during training (SLURM's preemption, `docker stop`, `kill`), met as Ctrl-C is:
    the run says which checkpoint it keeps and exits 143, where it used to die unsaid."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises `Terminated`. Only in the main thread (where Python runs
    signal handlers); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_text(path: str | Path, error: type[GraftError] = GraftError) -> str:
    """A UTF-8 text file's content; unreadable or not UTF-8 is one `error` naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file") from None


def read_json(path: str | Path) -> dict:
    """The object in a JSON file (every JSON file graftlm reads holds one). A file that
    cannot be read, is not UTF-8, does not parse or holds something other than an object
    is one `GraftError` naming it (and the line, for a parse error)."""
    path = Path(path)
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise GraftError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise GraftError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_yaml(path: str | Path, error: type[GraftError] = GraftError):
    """The value in a YAML file, with the same errors as `read_json` (raised as `error`)."""
    import yaml

    path = Path(path)
    text = read_text(path, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None


def make_directory(path: str | Path, flag: str, create: bool = True) -> Path:
    """`path` as a directory to write into, made (with its parents) unless `create` is
    False; a path that cannot be one (it, or a directory above it, is a file) or cannot
    be made is one `GraftError` naming the flag and the path, before any work is done."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            if existing == path and not path.is_dir():
                raise GraftError(f"{flag} {path}: exists and is not a directory")
            if not existing.is_dir():
                raise GraftError(f"{flag} {path}: cannot be a directory ({existing} is a file)")
            break
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GraftError(f"{flag} {path}: cannot create the directory ({e.strerror})") from None
    return path

