"""Adapter names, adapter paths that cannot leave the adapter root, and the registry.

Design choices:
- A name is a plain identifier (`NAME_PATTERN`), never a path: it appears in URLs and
  in the `model` field, so it must not carry separators, `..` or encodings.
- A path sent by a client (POST /v1/adapters) is relative to `--adapter-root`.
  It is refused on its text first (absolute, `..`, `%` (URL-encoded tricks), `\\`,
  NUL or other control characters, too long) and then on where it really lands:
  `os.path.realpath` resolves every symlink, and the result must lie strictly inside
  the real root. The files the loader will open are checked the same way, so a link
  inside the root that points out is refused too. Only `lstat`/`readlink` run before
  the checks pass: no file outside the root is opened.
- Adapters given on the command line (`--adapter NAME=DIR`) come from the operator and
  may live anywhere; only client-sent paths are confined.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_PATH_CHARS = 1024
MAX_COMPONENT_CHARS = 255
# The files of a PEFT-format adapter directory that the loader reads.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterRequestError(Exception):
    """A client's adapter name or path is refused; `status` is the HTTP status."""

    def __init__(self, message: str, param: str, status: int = 400, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterRequestError(
            "adapter name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'", "name")
    return name


def _check_path_text(path: str) -> None:
    def refuse(why: str):
        raise AdapterRequestError(f"adapter path refused: {why}", "path")

    if not isinstance(path, str) or not path:
        refuse("empty")
    if len(path) > MAX_PATH_CHARS:
        refuse(f"longer than {MAX_PATH_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        refuse("contains NUL or another control character")
    if "%" in path:
        refuse("contains '%' (URL-encoded paths are not accepted)")
    if "\\" in path:
        refuse("contains '\\'")
    if path.startswith(("/", "~")) or os.path.isabs(path):
        refuse("must be relative to the adapter root")
    parts = path.split("/")
    if ".." in parts:
        refuse("contains '..'")
    if any(len(p) > MAX_COMPONENT_CHARS for p in parts):
        refuse(f"has a component longer than {MAX_COMPONENT_CHARS} characters")


def _inside(root_real: str, candidate: str) -> bool:
    real = os.path.realpath(candidate)
    return real != root_real and os.path.commonpath([root_real, real]) == root_real


def resolve_adapter_path(root: str | Path, path: str) -> Path:
    """The real directory of client path `path` under `root`, or AdapterRequestError."""
    _check_path_text(path)
    root_real = os.path.realpath(root)
    candidate = os.path.join(root_real, path)
    if not _inside(root_real, candidate):
        raise AdapterRequestError("adapter path refused: it resolves outside the adapter root",
                                  "path", status=403, code="path_outside_root")
    real = os.path.realpath(candidate)
    if not os.path.isdir(real):
        raise AdapterRequestError(f"adapter path '{path}' is not a directory under the adapter root",
                                  "path", status=404, code="adapter_not_found")
    for fname in ADAPTER_FILES:
        file_path = os.path.join(real, fname)
        if not os.path.lexists(file_path):
            raise AdapterRequestError(f"adapter path '{path}' has no {fname} (not a PEFT adapter)",
                                      "path", status=400, code="not_an_adapter")
        if not _inside(root_real, file_path):
            raise AdapterRequestError(f"adapter path refused: {fname} links outside the adapter root",
                                      "path", status=403, code="path_outside_root")
    return Path(real)


@dataclass
class AdapterEntry:
    name: str
    path: Path
    created: int  # unix time it was loaded, reported by /v1/models


class AdapterRegistry:
    """The adapters clients may name. Thread-safe: the HTTP side reads, the scheduler writes."""

    def __init__(self, base_name: str):
        self.base_name = base_name
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._entries.values())

    def add(self, entry: AdapterEntry) -> None:
        with self._lock:
            self._entries[entry.name] = entry

    def remove(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._entries.pop(name, None)
