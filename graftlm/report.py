"""report.html for one run, and one comparison page across runs.

Design choices:
- One self-contained HTML file: plots are matplotlib PNGs embedded as base64 data URIs,
  styles inline, no JavaScript and no network, so a report opens offline in any
  browser, from an archive or an e-mail attachment.
- The inputs are the run directory's plain files only (config.yaml, summary.json,
  metrics.jsonl), so a report can be regenerated at any time (`graft report RUN_DIR`)
  and a crashed run without summary.json still gets its curves.
- metrics.jsonl holds training records (step, loss, lr, tokens_per_s, memory_bytes...),
  validation records (step, val_loss, val_bpb or val_reward) and skipped-step records; each plot
  takes the records that carry its field.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from graftlm import errors
from graftlm.config import flatten
from graftlm.errors import GraftError, make_directory


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GraftError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if isinstance(record, dict) and not record.get("skipped"):
            records.append(record)
    return records


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    return errors.read_json(path)


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    return errors.read_yaml(path) or {}


def series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


# -- plots ---------------------------------------------------------------------------------------

def _figure(rows: int, cols: int, size=(11, 3.6)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(size[0], size[1] * rows), squeeze=False)
    return fig, axes


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot(ax, records, keys, title, ylabel, scale=1.0):
    drawn = False
    for key, label in keys:
        x, y = series(records, key)
        if x:
            ax.plot(x, [v * scale for v in y], marker="o" if len(x) < 30 else None, markersize=3, label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn and len(keys) > 1:
        ax.legend()
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def run_plots(records: list[dict]) -> str:
    fig, axes = _figure(2, 2)
    _plot(axes[0][0], records, [("loss", "train"), ("val_loss", "validation")], "loss", "loss")
    if any("val_reward" in r or "train_reward/mean" in r for r in records):  # online RL
        # Several rewards: each one's sampled mean beside their sum (is one gamed while another stays flat?).
        each = sorted({k for r in records for k in r if k.startswith("train_reward/") and k.endswith("/mean")
                       and k != "train_reward/mean"})
        _plot(axes[0][1], records, [("train_reward/mean", "sampled (train)"), ("val_reward", "held-out (greedy)"),
                                    *((k, k.split("/")[1]) for k in each)], "reward", "mean reward")
    else:
        _plot(axes[0][1], records, [("lr", "learning rate")], "learning rate", "lr")
    _plot(axes[1][0], records, [("tokens_per_s", "tokens/s")], "throughput", "tokens / s")
    _plot(axes[1][1], records, [("memory_bytes", "peak memory")], "memory", "GB", scale=1e-9)
    return _png(fig)


# -- HTML ----------------------------------------------------------------------------------------

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}"""


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class='n'>{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"


def table_html(data: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th>{_cell(v)}</tr>" for k, v in flatten(data).items())
    return f"<table>{rows}</table>" if rows else "<p>(none)</p>"


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html from the run's files; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GraftError(f"{run_dir}: not a run directory")
    records = read_metrics(run_dir)
    summary = read_json(run_dir / "summary.json")
    config = read_config(run_dir)
    if not records and not summary:
        raise GraftError(f"{run_dir}: no metrics.jsonl or summary.json to report on")
    body = (f"<h1>run {html.escape(run_dir.name)}</h1>"
            f"<p>{html.escape(str(summary.get('objective', config.get('objective', ''))))} / "
            f"{html.escape(str(summary.get('parameterization', '')))}, {len(records)} metric records</p>"
            f"<h2>curves</h2><img alt='loss, learning rate, throughput and memory' "
            f"src='data:image/png;base64,{run_plots(records)}'>"
            f"<h2>summary</h2>{table_html(summary)}<h2>config</h2>{table_html(config)}")
    out = run_dir / "report.html"
    out.write_text(page(f"graftlm run {run_dir.name}", body))
    return out


def write_report_or_warn(run_dir: Path) -> bool:
    """`write_report`, for a run that is saved: a plotting failure must not turn it into a
    failed run, so it is one warning line (with the command that retries) and False."""
    try:
        write_report(run_dir)
        return True
    except Exception as e:
        print(f"warning: {run_dir}/report.html not written ({e}); retry with `graft report {run_dir}`", flush=True)
        return False


# -- graft compare -------------------------------------------------------------------------------


def run_row(run_dir: Path, price_per_hour: float | None) -> dict:
    if not run_dir.is_dir():
        raise GraftError(f"{run_dir}: run directory does not exist")
    summary = read_json(run_dir / "summary.json")
    if not summary:
        raise GraftError(f"{run_dir}: no summary.json (is the run finished?)")
    time_s = summary.get("wall_time_s") or summary.get("train_time_s")
    devices = summary.get("world_size", 1)
    cost = None if price_per_hour is None or time_s is None else time_s / 3600 * price_per_hour * devices
    # Two memories, named apart: the live tensors of a step (what `graft plan` predicts:
    # CUDA's allocator peak, or on a CPU the trainer's count) and the process's RSS (CPU).
    # A summary's `peak_memory_bytes` is the one or the other, by device.
    on_cuda = str(summary.get("device", "cpu")).startswith("cuda")
    tensors = summary.get("peak_tensor_bytes") or (summary.get("peak_memory_bytes") if on_cuda else None)
    rss = summary.get("peak_host_memory_bytes") or (None if on_cuda else summary.get("peak_memory_bytes"))
    known = {"objective", "parameterization", "params_trainable", "params_total", "tokens", "flops",
             "peak_memory_bytes", "peak_host_memory_bytes", "peak_tensor_bytes", "final_train_loss",
             "final_val_loss", "val_bpb"}
    objective = summary.get("objective", "?")
    loss = (read_config(run_dir).get("dpo") or {}).get("loss") if objective == "dpo" else None
    if loss and loss != "sigmoid":  # SimPO, IPO, ORPO...: the losses differ too much to be one "dpo"
        objective = f"dpo ({loss})"
    return {
        "run": run_dir.name, "path": str(run_dir),
        "regime": f"{objective}/{summary.get('parameterization', '?')}",
        "val_score": val_score(summary),
        "precision": summary.get("precision"), "device": summary.get("device"),
        "params_trainable": summary.get("params_trainable"), "params_total": summary.get("params_total"),
        "tokens": summary.get("tokens"), "time_s": time_s, "flops": summary.get("flops"),
        "peak_tensor_bytes": tensors, "peak_rss_bytes": rss, "cost_usd": cost,
        "final_train_loss": summary.get("final_train_loss"), "final_val_loss": summary.get("final_val_loss"),
        "val_bpb": summary.get("val_bpb"),
        "metrics": {k: v for k, v in summary.items() if k not in known and isinstance(v, (int, float))
                    and not isinstance(v, bool)},
    }


def val_score(summary: dict) -> str | None:
    """The held-out figure a run is judged by beside its loss: RL's mean reward on the
    validation prompts, preference accuracy for DPO and reward models."""
    reward, accuracy = summary.get("final_val_reward"), summary.get("final_val_rewards/accuracy")
    if isinstance(reward, (int, float)):
        return f"reward {reward:.3g}"
    if isinstance(accuracy, (int, float)):
        return f"accuracy {accuracy:.0%}"
    return None


def comparison_plot(run_dirs: list[Path], rows: list[dict]) -> str:
    fig, axes = _figure(1, 3, size=(13, 4))
    loss_ax, time_ax, memory_ax = axes[0]
    for run_dir, row in zip(run_dirs, rows):
        records = read_metrics(run_dir)
        x, y = series(records, "loss")
        if x:
            loss_ax.plot(x, y, label=row["run"])
        vx, vy = series(records, "val_loss")
        if vx:
            loss_ax.plot(vx, vy, linestyle="--", marker="o", markersize=3, label=f"{row['run']} (val)")
    loss_ax.set_title("loss")
    loss_ax.set_xlabel("step")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    names = [row["run"] for row in rows]
    time_ax.bar(names, [row["time_s"] or 0 for row in rows], color="#4c72b0")
    time_ax.set_title("wall time (s)")
    memory_ax.bar(names, [(row["peak_tensor_bytes"] or 0) / 1e9 for row in rows], color="#dd8452")
    memory_ax.set_title("peak live tensors in a step (GB)")
    for ax in (time_ax, memory_ax):
        ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def compare_runs(run_dirs: list[Path], out: Path, price_per_hour: float | None = None) -> list[dict]:
    """One row per run, and `out` (HTML): the table and the comparison plot."""
    run_dirs = [Path(r) for r in run_dirs]
    rows = [run_row(r, price_per_hour) for r in run_dirs]
    columns = ["run", "regime", "precision", "params_trainable", "tokens", "time_s", "peak_tensor_bytes",
               "peak_rss_bytes", "cost_usd", "final_train_loss", "final_val_loss", "val_bpb", "val_score"]
    head = "".join(f"<th>{c}</th>" for c in columns)
    body_rows = "".join("<tr>" + "".join(_cell(row[c]) for c in columns) + "</tr>" for row in rows)
    body = (f"<h1>comparison of {len(rows)} runs</h1><table><tr>{head}</tr>{body_rows}</table>"
            f"<img alt='loss curves, wall time and peak live tensors' "
            f"src='data:image/png;base64,{comparison_plot(run_dirs, rows)}'>")
    make_directory(out.parent, "--out")
    if out.is_dir():
        raise GraftError(f"--out {out}: is a directory; name the HTML file to write")
    out.write_text(page("graftlm comparison", body))
    return rows
