"""The rich Console that graftlm's tables print to.

Rich falls back to 80 columns when output is not a terminal (CI logs, `| tee`), which
truncates the wider tables (`graft plan`, the demo's bill, `graft eval`) into "sft/lo…"
cells. At least 120 columns keeps every cell whole; a wider terminal keeps its width.
"""

from __future__ import annotations


def table_console(min_width: int = 120):
    from rich.console import Console
    # Lines soft-wrap (the terminal folds a long heading), tables keep their width.
    return Console(width=max(min_width, Console().width), soft_wrap=True)
