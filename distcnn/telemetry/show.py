"""`distcnn show RUN_DIR`: a run's summary as one table, its resource time series as one PNG.

Reads only the run record (summary.json, telemetry/rank{R}.csv). An empty cell or a null is a counter this
machine lacks: it reads as None and prints as n/a, never as 0, so a missing figure is not mistaken for an idle one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from distcnn import summary as declared
from distcnn.errors import UsageError
from distcnn.record import SUMMARY, TELEMETRY, per_host, rank_files, read_object, read_series, write_atomic
from distcnn.units import human_bytes

PHASE_SHADES = {"eval": ("gold", 0.25), "setup": ("0.5", 0.08), "finish": ("0.5", 0.08)}


# ---- the table -------------------------------------------------------------------------------------------

def _fixed(spec: str, unit: str = "", scale: float | None = None):
    return lambda value: f"{value if scale is None else value * scale:{spec}}{unit}"


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def cell(value, fmt=_plain) -> str:
    """n/a for None; a value of an unexpected type is printed as it is rather than breaking the table."""
    if value is None:
        return "n/a"
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


PERCENT, SECONDS, MS = _fixed(".1f", " %"), _fixed(",.1f", " s"), _fixed(",.2f", " ms", 1e3)
MIB, MB, MB_S = _fixed(",.1f", " MiB", 2**-20), _fixed(",.1f", " MB", 1e-6), _fixed(",.2f", " MB/s", 1e-6)
COUNT, JOULES, GIGA = _fixed(",.0f"), _fixed(",.0f", " J"), _fixed(",.4f", "", 1e-9)
# Each field of the summary that `show` prints (distcnn.summary: group, label) reads as its unit does, or as
# FORMATS says where its scale is another (MiB, ms).
UNIT_FORMATS = {"fraction": _fixed(".4f"), "s": SECONDS, "images/s": COUNT, "parameters": _fixed(","),
                "FLOP": GIGA, "FLOP/s": _fixed(",.2f", "", 1e-9), "%": PERCENT, "1/s": COUNT, "B/s": MB_S, "B": MB}
FORMATS = {"rss_peak_bytes": MIB, "gpu_memory_peak_bytes": human_bytes, "gradient_bytes": _fixed(","),
           "comm_bytes_per_step": _fixed(",.0f"), "comm_ring_bytes_per_step_formula": _fixed(",.0f"),
           "ddp_comm_seconds_mean": MS, "ddp_overlap_seconds_mean": MS, "ddp_backward_compute_seconds_mean": MS}
FIELDS = {group: [(field.label, field.name, FORMATS.get(field.name) or UNIT_FORMATS.get(field.unit, str))
                  for field in declared.shown(group)] for group in declared.GROUPS}
SPECIAL = {"step_time_breakdown", "energy_joules", "energy_sources", "hosts"}
KNOWN = {key for fields in FIELDS.values() for _, key, _ in fields} | SPECIAL


def step_rows(breakdown) -> list[tuple[str, str]]:
    """Each phase's mean in ms and its share of the whole step (of the phases' sum when no 'step')."""
    if not isinstance(breakdown, dict) or not breakdown:
        return []
    phases = {name: value for name, value in breakdown.items() if name != "step"}
    numbers = [value for value in phases.values() if isinstance(value, (int, float))]
    step = breakdown.get("step") if isinstance(breakdown.get("step"), (int, float)) else sum(numbers) or None
    rows = [("step time", cell(step, MS))]
    for name, value in phases.items():
        share = f" ({value / step:.1%})" if isinstance(value, (int, float)) and step else ""
        rows.append((f"  {name}", cell(value, MS) + share))
    return rows


def host_rows(hosts) -> list[tuple[str, str]]:
    """Per host: its ranks and interfaces, its network, CPU and memory means, then each interface's totals."""
    rows = []
    for name, host in hosts.items() if isinstance(hosts, dict) else ():
        get = host.get if isinstance(host, dict) else {}.get
        rows += [(f"host {name}", f"ranks {cell(get('ranks'))}; interfaces {cell(get('net_interfaces'))}"),
                 ("  packets/s", cell(get("net_packets_per_s_mean"), COUNT)),
                 ("  bytes total", cell(get("net_bytes_total"), MB)),
                 ("  bytes/s", cell(get("net_bytes_per_s_mean"), MB_S)),
                 ("  CPU", cell(get("cpu_percent_mean"), PERCENT)),
                 ("  memory", cell(get("mem_percent_mean"), PERCENT)),
                 ("  CPU energy", cell(get("cpu_energy_joules"), JOULES))]
        interfaces = get("interfaces")
        for interface, counts in interfaces.items() if isinstance(interfaces, dict) else ():
            count = counts.get if isinstance(counts, dict) else {}.get
            rows.append((f"  {interface} rx / tx", f"{cell(count('rx_bytes'), MB)} / {cell(count('tx_bytes'), MB)}, "
                         f"{cell(count('rx_packets'), COUNT)} / {cell(count('tx_packets'), COUNT)} packets"))
    return rows


def summary_rows(summary: dict) -> dict[str, list[tuple[str, str]]]:
    """group -> (label, formatted value): the known figures first, then any other scalar keys."""
    groups = {group: [(label, cell(summary.get(key), fmt)) for label, key, fmt in fields]
              for group, fields in FIELDS.items()}
    groups["time"] += step_rows(summary.get("step_time_breakdown"))
    sources = cell(summary.get("energy_sources"))
    groups["resources"].append(("energy", cell(summary.get("energy_joules"), JOULES)
                                + (f" ({sources})" if sources not in ("n/a", "-") else "")))
    groups["network"] += host_rows(summary.get("hosts"))
    scalar = (str, int, float, bool, list, type(None))
    other = [(key, cell(value)) for key, value in summary.items() if key not in KNOWN and isinstance(value, scalar)]
    return groups | ({"other": other} if other else {})


def summary_table(summary: dict, title: str) -> Table:
    table = Table(title=Text(title), title_justify="left")
    for column in ("group", "figure", "value"):
        table.add_column(column)
    for group, rows in summary_rows(summary).items():
        for index, (label, value) in enumerate(rows):
            table.add_row(group if index == 0 else "", Text(label), Text(value))
        table.add_section()
    return table


# ---- the plot --------------------------------------------------------------------------------------------

def _line(label: str, rows: list[dict], column: str, scale: float = 1.0, style: str = "-") -> list[tuple]:
    """[(label, x, y, style)] with NaN for missing samples (a gap, not a drop to 0); [] if nothing is there."""
    rows = [row for row in rows if row.get("elapsed_s") is not None]
    ys = [math.nan if row.get(column) is None else row[column] * scale for row in rows]
    return [(label, [row["elapsed_s"] for row in rows], ys, style)] if any(not math.isnan(y) for y in ys) else []


def panels(series: dict[int, list[dict]]) -> list[tuple]:
    """(y label, lines, twin y label, twin lines, drawn when empty) per panel, top to bottom."""
    def ranks(column, scale=1.0, style="-", suffix=""):
        return [line for rank, rows in series.items()
                for line in _line(f"rank {rank}{suffix}", rows, column, scale, style)]

    def hosts(column, suffix, scale=1.0, style="--"):
        return [line for host, rows in per_host(series, column).items()
                for line in _line(f"{host} {suffix}", rows, column, scale, style)]

    return [("CPU %", ranks("process_cpu_percent") + hosts("system_cpu_percent", "system"), None, [], True),
            ("RSS (MiB)", ranks("rss_bytes", 2**-20), "system memory %", hosts("system_mem_percent", "memory %"), True),
            ("packets/s (rx+tx)", hosts("net_packets_per_s", "packets/s", style="-"),
             "MB/s", hosts("net_bytes_per_s", "MB/s", 1e-6), True),
            ("GPU util %", ranks("gpu_util_percent"), "GPU memory (GiB)",
             ranks("gpu_memory_used_bytes", 2**-30, ":", " memory"), False)]


def phase_spans(rows: list[dict]) -> list[list]:
    """[phase, start, end] intervals: each row covers the time since the previous row."""
    spans, start = [], 0.0
    for row in rows:
        end = row.get("elapsed_s")
        if end is None:
            continue
        if spans and spans[-1][0] == row.get("phase"):
            spans[-1][2] = end
        else:
            spans.append([row.get("phase"), start, end])
        start = end
    return spans


def plot_series(series: dict[int, list[dict]], path: Path, title: str) -> Path:
    """Draw the panels that have data (or say what is unavailable) over elapsed seconds; write atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [panel for panel in panels(series) if panel[4] or panel[1] or panel[3]]
    figure = Figure(figsize=(11, 2.6 * len(shown) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    spans = phase_spans(max(series.values(), key=len, default=[]))
    for index, (ax, (label, lines, twin_label, twin_lines, _)) in enumerate(zip(axes, shown)):
        twin = ax.twinx() if twin_label else None
        pairs = [(ax, line) for line in lines] + [(twin, line) for line in twin_lines]  # one colour cycle for both
        drawn = [handle for colour, (target, (name, xs, ys, style)) in enumerate(pairs)
                 for handle in target.plot(xs, ys, style, color=f"C{colour % 10}", label=name, linewidth=1.2)]
        shades = {}
        for phase, start, end in spans:
            if phase in PHASE_SHADES:
                colour, alpha = PHASE_SHADES[phase]
                shades[phase] = ax.axvspan(start, end, color=colour, alpha=alpha, linewidth=0, label=phase)
        ax.set_ylabel(label)
        if twin:
            twin.set_ylabel(twin_label)
        if not drawn:
            ax.text(0.5, 0.5, f"{label}: unavailable on this machine", transform=ax.transAxes, ha="center",
                    color="0.4")
        handles = drawn + (list(shades.values()) if index == 0 else [])
        if handles:
            ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.08 if twin else 1.01, 1))
    axes[-1].set_xlabel("elapsed (s)")
    figure.suptitle(title)
    try:
        write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=110), binary=True)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error}") from None
    return path


# ---- the command -----------------------------------------------------------------------------------------

def show(run_dir: str | Path, png: str | Path | None = None, plot: bool = True) -> Path | None:
    """Print the run's table and draw its series; returns the PNG written (None when there is none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} {'is not a directory' if run_dir.exists() else 'does not exist'}")
    summary = read_object(run_dir / SUMMARY)
    series = {rank: rows for rank, rows in read_series(run_dir).items() if rows}
    if summary is None and not rank_files(run_dir):
        raise UsageError(f"not a run directory: no {SUMMARY} or {TELEMETRY}/ in {run_dir}")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    name = (summary or {}).get("name") or run_dir.name
    world_size = (summary or {}).get("world_size") or len(series)
    if summary is None:
        console.print(f"unfinished: no {SUMMARY} yet in {run_dir}", markup=False)
        hosts = sorted({row["host"] for rows in series.values() for row in rows if row.get("host")})
        elapsed = max((row.get("elapsed_s") or 0 for rows in series.values() for row in rows), default=0)
        console.print(f"{len(series)} ranks with telemetry on {', '.join(hosts) or 'unknown hosts'}, "
                      f"{elapsed:,.0f} s so far", markup=False)
    else:
        console.print(summary_table(summary, f"{name} ({run_dir})"))
    if not plot:
        return None
    if not series:
        console.print("no telemetry rows: nothing to plot", markup=False)
        return None
    path = Path(png) if png else run_dir / "telemetry.png"
    title = f"{name} — world size {world_size}" + (" (unfinished)" if summary is None else "")
    plot_series(series, path, title)
    console.print(f"plot: {path}", markup=False, soft_wrap=True)
    return path
