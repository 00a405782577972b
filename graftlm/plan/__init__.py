"""The cost model: what each regime needs (memory, FLOPs, time, money) and which to use.

- `hardware`: the device catalogue (graftlm/hardware.yaml, extensible).
- `memory`: per-device memory of a run, broken down; fit and largest batch.
- `compute`: FLOPs (on graftlm.metrics' shared per-token function), time, money.
- `advice`: the recommendation and data warnings.
- `planner`: all regimes for one model, data size and hardware (`graft plan`).
- `check`: prediction against a finished run's summary.json (`graft plan --check`).
- `measure`: peak live tensor bytes on any device (what the plan predicts).
"""

from graftlm.plan.hardware import Device, Hardware, load_catalogue, resolve_hardware
from graftlm.plan.memory import MemoryBreakdown, RunShape, largest_batch, memory_breakdown
from graftlm.plan.planner import PlanOptions, make_plan, resolve_data, resolve_model

__all__ = ["Device", "Hardware", "load_catalogue", "resolve_hardware", "MemoryBreakdown", "RunShape",
           "largest_batch", "memory_breakdown", "PlanOptions", "make_plan", "resolve_data", "resolve_model"]
