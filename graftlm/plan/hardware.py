"""The hardware catalogue: memory, peak FLOP/s, typical MFU and price of each device.

The catalogue is data, not code: `graftlm/hardware.yaml` ships with the package and a
user adds or overrides entries with their own YAML file of the same layout
(`--hardware-file`). A device is asked for as `NAME` or `NAMExN` (N devices of one
machine); names match case-insensitively and ignore spaces, dashes and underscores, so
`rtx 4090`, `RTX4090` and `a100-80gb x8` all resolve.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from graftlm.errors import GraftError, read_yaml

GIB = 2 ** 30
_FIELDS = {"memory_gb": float, "reserved_gb": float, "bf16_tflops": float, "fp32_tflops": float, "mfu": float,
           "usd_per_hour": float, "fast_bf16": bool, "description": str, "interconnect": str}
_REQUIRED = ("memory_gb", "bf16_tflops", "mfu", "usd_per_hour")


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    bf16_tflops: float
    mfu: float
    usd_per_hour: float
    reserved_gb: float = 0.0
    fp32_tflops: float | None = None  # None: half of bf16_tflops
    fast_bf16: bool = True  # False: `train.precision auto` trains in fp32 on it (placement.fast_bfloat16)
    description: str = ""
    interconnect: str = ""

    @property
    def usable_bytes(self) -> int:
        """Bytes left for tensors once the runtime has taken its share."""
        return int((self.memory_gb - self.reserved_gb) * GIB)

    def peak_flops(self, precision: str) -> float:
        if precision == "fp32":
            return (self.fp32_tflops if self.fp32_tflops is not None else self.bf16_tflops / 2) * 1e12
        return self.bf16_tflops * 1e12

    def training_precision(self, requested: str) -> str:
        """`requested` with `auto` resolved as a run on this device resolves it."""
        if requested != "auto":
            return requested
        return "bf16-autocast" if self.fast_bf16 else "fp32"


@dataclass(frozen=True)
class Hardware:
    """`count` identical devices."""

    device: Device
    count: int = 1

    @property
    def label(self) -> str:
        return self.device.name if self.count == 1 else f"{self.device.name}x{self.count}"


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def _parse_entries(data, source: str) -> dict[str, Device]:
    if not isinstance(data, dict):
        raise GraftError(f"{source}: expected a mapping of device name -> fields")
    devices = {}
    for name, fields in data.items():
        if not isinstance(fields, dict):
            raise GraftError(f"{source}: device '{name}': expected a mapping of fields")
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise GraftError(f"{source}: device '{name}': unknown field '{sorted(unknown)[0]}' "
                             f"(fields: {', '.join(_FIELDS)})")
        for required in _REQUIRED:
            if required not in fields:
                raise GraftError(f"{source}: device '{name}': field '{required}' is missing")
        values = {}
        for key, value in fields.items():
            kind = _FIELDS[key]
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise GraftError(f"{source}: device '{name}': field '{key}' must be a non-negative number, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise GraftError(f"{source}: device '{name}': field '{key}' must be true or false, got {value!r}")
            values[key] = kind(value)
        if not 0 < values["mfu"] <= 1:
            raise GraftError(f"{source}: device '{name}': field 'mfu' must be in (0, 1], got {values['mfu']}")
        if values["memory_gb"] <= values.get("reserved_gb", 0.0):
            raise GraftError(f"{source}: device '{name}': memory_gb must exceed reserved_gb")
        devices[_key(str(name))] = Device(name=str(name), **values)
    return devices


def load_catalogue(extra_file: str | Path | None = None) -> dict[str, Device]:
    """The shipped catalogue, updated with `extra_file`'s entries (keyed by normalised name)."""
    text = resources.files("graftlm").joinpath("hardware.yaml").read_text()
    catalogue = _parse_entries(yaml.safe_load(text), "graftlm/hardware.yaml")
    if extra_file is not None:
        path = Path(extra_file)
        catalogue.update(_parse_entries(read_yaml(path), str(path)))
    return catalogue


def resolve_hardware(spec: str, catalogue: dict[str, Device]) -> Hardware:
    """`NAME` or `NAMExN` -> Hardware; an unknown name lists the known ones."""
    name, count = spec.strip(), 1
    match = re.fullmatch(r"(.+?)\s*[xX\*]\s*(\d+)", name)
    if match and _key(name) not in catalogue:  # "rtx 4090" is a name, "rtx4090 x2" a count
        name, count = match.group(1), int(match.group(2))
    if count < 1:
        raise GraftError(f"--hardware '{spec}': the device count must be at least 1")
    device = catalogue.get(_key(name))
    if device is None:
        known = ", ".join(d.name for d in catalogue.values())
        raise GraftError(f"--hardware: unknown device '{name}' (known: {known}; add yours with --hardware-file)")
    return Hardware(device, count)
