"""The hardware catalogue: memory, peak FLOP/s, typical MFU and price of each device.

The catalogue is data, not code: `graftlm/hardware.yaml` ships with the package and a
user adds or overrides entries with their own YAML file of the same layout
(`--hardware-file`). A device is asked for as `NAME` or `NAMExN` (N devices of one
machine); names match case-insensitively and ignore spaces, dashes and underscores, so
`rtx 4090`, `RTX4090` and `a100-80gb x8` all resolve. `this` is the machine graft runs
on, measured (`this_machine`), for a plan that is about the box at hand and not a
catalogue's typical one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from graftlm.errors import GraftError, read_yaml
from graftlm.metrics import DequantRate

GIB = 2 ** 30
_FIELDS = {"memory_gb": float, "reserved_gb": float, "bf16_tflops": float, "fp32_tflops": float, "mfu": float,
           "usd_per_hour": float, "fast_bf16": bool, "memory_gbs": float, "nf4_gparams_per_s": float,
           "op_overhead_us": float, "kind": str, "description": str, "interconnect": str}
KINDS = ("cpu", "gpu")
# A device without `memory_gbs`: its bandwidth taken as its bf16 peak over this many FLOPs
# per byte (an H100 SXM's ratio, 989 TFLOP/s over 3.35 TB/s; older and smaller cards have
# less compute per byte, so their NF4 dequantization is planned slower than it is).
FLOPS_PER_BYTE_FALLBACK = 295
# A device without `op_overhead_us`: the host's time per eager PyTorch operator, microseconds.
# Measured on graftlm's engine decoding a tiny model on this project's 2-core AMD EPYC
# (7.7 us per operator, Python included); a GPU's host spends about as much on each
# operator's dispatch and kernel launch (assumed: unmeasured here; `plan --check` compares).
OP_OVERHEAD_US_FALLBACK = 8.0
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
    memory_gbs: float | None = None  # memory bandwidth, GB/s (None: FLOPS_PER_BYTE_FALLBACK)
    nf4_gparams_per_s: float | None = None  # NF4 dequantization, when not bandwidth-bound (CPUs)
    nf4_dequant: DequantRate | None = None  # measured (`this` machine): rate and per-call cost
    op_overhead_us: float | None = None  # host time per eager operator (None: OP_OVERHEAD_US_FALLBACK)
    kind: str = "gpu"  # "cpu" or "gpu": which runs its time can be set against (`plan --check`)
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

    def dequant_rate(self) -> DequantRate:
        """How fast QLoRA's NF4 base weights dequantize here: measured for `this` machine,
        else the catalogue's `nf4_gparams_per_s`, else derived from the memory bandwidth."""
        if self.nf4_dequant is not None:
            return self.nf4_dequant
        if self.nf4_gparams_per_s:
            return DequantRate(self.nf4_gparams_per_s * 1e9)
        return DequantRate.from_bandwidth(self.bandwidth, self.fast_bf16)

    @property
    def bandwidth(self) -> float:
        """Memory bandwidth, bytes/s: the catalogue's, else assumed from the bf16 peak."""
        return self.memory_gbs * 1e9 if self.memory_gbs else self.bf16_tflops * 1e12 / FLOPS_PER_BYTE_FALLBACK

    @property
    def op_seconds(self) -> float:
        """Host time per eager PyTorch operator (dispatch; on a GPU, its kernel launch too)."""
        return (self.op_overhead_us if self.op_overhead_us is not None else OP_OVERHEAD_US_FALLBACK) * 1e-6

    @property
    def bandwidth_source(self) -> str:
        return "memory_gbs" if self.memory_gbs else f"bf16 peak / {FLOPS_PER_BYTE_FALLBACK}"

    @property
    def dequant_source(self) -> str:
        if self.nf4_dequant is not None:
            return "measured here"
        if self.nf4_gparams_per_s:
            return "catalogue nf4_gparams_per_s"
        return "memory bandwidth" if self.memory_gbs else f"bandwidth assumed as {self.bandwidth_source}"

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
        # A device is a GPU unless it says otherwise, or is named `cpu` (an older file's entry).
        values.setdefault("kind", "cpu" if _key(str(name)) == "cpu" else "gpu")
        if values["kind"] not in KINDS:
            raise GraftError(f"{source}: device '{name}': field 'kind' must be one of {', '.join(KINDS)}, "
                             f"got {values['kind']!r}")
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


THIS = "this"
CUDA_MFU = 0.35  # a GPU the catalogue does not name: a typical well-tuned run's


def this_machine(catalogue: dict[str, Device]) -> Device:
    """The machine graft runs on, as a run here would use it: its first CUDA card when
    there is one (memory from the card, peak from the card's name as runs measure MFU,
    the catalogue's MFU and price when it names the card), else its CPU, measured: RAM,
    the float32 (and, where bf16 is fast, bf16) matmul peak that runs record (cached in
    ~/.cache/graftlm), at the `cpu` entry's MFU and memory bandwidth. Either way QLoRA's NF4 dequantization
    rate is the one QLoRA runs record (measured once, then cached)."""
    import torch

    from graftlm.metrics import nf4_dequant_rate, peak_flops
    from graftlm.placement import fast_bfloat16
    if torch.cuda.is_available():
        card = torch.device("cuda", 0)
        name = torch.cuda.get_device_name(card)
        memory = torch.cuda.get_device_properties(card).total_memory / GIB
        named = [device for key, device in catalogue.items() if key in _key(name)]
        known = max(named, key=lambda device: len(_key(device.name)), default=None)
        return Device(name=THIS, memory_gb=memory, reserved_gb=known.reserved_gb if known else 0.8,
                      bf16_tflops=peak_flops(card, torch.bfloat16) / 1e12,
                      fp32_tflops=peak_flops(card, torch.float32) / 1e12, fast_bf16=fast_bfloat16("cuda"),
                      mfu=known.mfu if known else CUDA_MFU, usd_per_hour=known.usd_per_hour if known else 0.0,
                      memory_gbs=known.memory_gbs if known else None,
                      nf4_dequant=nf4_dequant_rate(card, measure=False), kind="gpu",
                      description=f"this machine's {name}, {memory:.1f} GiB")
    cpu = torch.device("cpu")
    fast = fast_bfloat16("cpu")
    fp32 = peak_flops(cpu, torch.float32) / 1e12
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    laptop = catalogue.get("cpu")
    return Device(name=THIS, memory_gb=ram, reserved_gb=min(4.0, ram / 4),
                  bf16_tflops=peak_flops(cpu, torch.bfloat16) / 1e12 if fast else fp32, fp32_tflops=fp32,
                  fast_bf16=fast, mfu=laptop.mfu if laptop else 0.3, usd_per_hour=0.0,
                  # A CPU's bandwidth is not its FLOPs over a GPU's ratio: the catalogue CPU's, unmeasured
                  memory_gbs=laptop.memory_gbs if laptop else None,
                  nf4_dequant=nf4_dequant_rate(cpu, measure=False), kind="cpu",
                  description=f"this machine's CPU ({torch.get_num_threads()} threads), {ram:.1f} GiB RAM, "
                              "measured matmul peak")


def resolve_hardware(spec: str, catalogue: dict[str, Device]) -> Hardware:
    """`NAME` or `NAMExN` -> Hardware (`this`: the machine at hand); an unknown name
    lists the known ones."""
    name, count = spec.strip(), 1
    match = re.fullmatch(r"(.+?)\s*[xX\*]\s*(\d+)", name)
    if match and _key(name) not in catalogue:  # "rtx 4090" is a name, "rtx4090 x2" a count
        name, count = match.group(1), int(match.group(2))
    if count < 1:
        raise GraftError(f"--hardware '{spec}': the device count must be at least 1")
    if _key(name) == THIS and THIS not in catalogue:
        return Hardware(this_machine(catalogue), count)
    device = catalogue.get(_key(name))
    if device is None:
        known = ", ".join(d.name for d in catalogue.values())
        raise GraftError(f"--hardware: unknown device '{name}' (known: {THIS} (the machine at hand), {known}; "
                         "add yours with --hardware-file)")
    return Hardware(device, count)
