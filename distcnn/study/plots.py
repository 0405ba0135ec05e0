"""The report's figures, each drawn headless (Agg) and returned as PNG bytes, one compact figure per question:
does a factor move a response (main effects), does its effect depend on another (interactions), what did the
runs use over time (resources), and which configurations buy accuracy cheapest (Pareto)."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from distcnn.record import per_host

PANEL = (3.2, 2.4)  # inches per small panel: many panels side by side still fit a page


def new_figure(rows: int, columns: int, squeeze: bool = False) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(PANEL[0] * columns + 0.4, PANEL[1] * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def colours(labels: list[str]) -> dict[str, str]:
    """One colour per configuration, the same in every figure."""
    palette = "tab10" if len(labels) <= 10 else "tab20"
    from matplotlib import colormaps

    cmap = colormaps[palette]
    return {label: cmap(index % cmap.N) for index, label in enumerate(labels)}


# ---- main effects and interactions -------------------------------------------------------------------------

def level_means(table: pd.DataFrame, response: str, by: list[str], factors: list[str], alpha: float) -> pd.DataFrame:
    """Mean response per level (combination) of `by`, with a CI from the error pooled within configurations:
    the spread that no factor explains, as the allocation of variation measures it."""
    rows = table[table[response].notna()]
    y = rows[response].astype(float)
    residual = y - y.groupby([rows[name].astype(str) for name in factors]).transform("mean")
    df = len(rows) - rows.groupby([rows[name].astype(str) for name in factors]).ngroups
    grouped = y.groupby([rows[name].astype(str) for name in by]).agg(["mean", "count"]).reset_index()
    if df > 0:
        t = stats.t.ppf(1 - alpha / 2, df)
        grouped["half"] = t * np.sqrt(float((residual ** 2).sum()) / df / grouped["count"])
    else:
        grouped["half"] = np.nan
    return grouped


def _ordered(frame: pd.DataFrame, name: str, levels: list) -> pd.DataFrame:
    order = {str(level): index for index, level in enumerate(levels)}
    return frame.sort_values(name, key=lambda column: column.map(order))


def _error_bars(half: pd.Series):
    return None if half.isna().all() else half.to_numpy()


MAX_COLUMNS = 4  # panels per row: readable on a page whatever the number of responses


def small_multiples(responses: list[str], terms: list, draw, title: str) -> bytes:
    """One panel per term and response, term by term, wrapped at MAX_COLUMNS panels a row; each panel titled
    by its response, so no panel needs its neighbours to be read."""
    panels = list(itertools.product(terms, responses))
    columns = min(MAX_COLUMNS, len(panels))
    figure, axes = new_figure(math.ceil(len(panels) / columns), columns)
    flat = axes.ravel()
    for ax, (term, response) in zip(flat, panels):
        draw(ax, response, term)
        ax.set_title(response, fontsize=9)
        ax.margins(x=0.25)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    return png(figure)


ANCHOR = 0.05  # an effect panel's y-axis spans at least ±5 % of the grand mean: a 0.1 % wobble stays flat


def anchored(ax, grand: float, unit: str, constant: bool) -> None:
    """A y-axis that says its unit and shows the relative size: at least ±ANCHOR of the grand mean around
    it, and a right-hand axis in % deviation from the grand mean (where the mean is not 0)."""
    ax.set_ylabel(unit, fontsize=8)
    if not math.isfinite(grand) or grand == 0:
        return
    low, high = ax.get_ylim()
    reach = abs(grand) * ANCHOR
    ax.set_ylim(min(low, grand - reach), max(high, grand + reach))
    ax.axhline(grand, color="0.6", linewidth=0.8, linestyle=":")
    percent = ax.secondary_yaxis("right", functions=(lambda y: 100 * (y - grand) / abs(grand),
                                                     lambda d: grand + d * abs(grand) / 100))
    percent.set_ylabel("% from grand mean", fontsize=7, color="0.4")
    percent.tick_params(labelsize=6, colors="0.4")
    if constant:
        ax.set_facecolor("0.95")
        ax.text(0.5, 0.04, "practically constant", transform=ax.transAxes, ha="center", fontsize=7, color="0.4")


def _scaled(table: pd.DataFrame, responses: list[str], scales: dict | None) -> pd.DataFrame:
    """The responses divided by the unit they are shown in (bytes in MiB, say)."""
    scales = scales or {}
    return table.assign(**{name: pd.to_numeric(table[name], errors="coerce") / scales[name][1]
                           for name in responses if name in scales})


def main_effects_figure(table, factors, level_order, responses, alpha, scales=None, constant=()) -> bytes:
    """Per response and factor: the mean response at each level, with its CI as error bars; the y-axis in the
    response's unit (`scales`: response -> (unit label, divisor)), anchored around the grand mean."""
    table = _scaled(table, responses, scales)

    def draw(ax, response, factor):
        means = _ordered(level_means(table, response, [factor], factors, alpha), factor, level_order[factor])
        ax.errorbar(means[factor], means["mean"], yerr=_error_bars(means["half"]), marker="o", capsize=4)
        ax.set_xlabel(factor, fontsize=8)
        anchored(ax, float(table[response].mean()), (scales or {}).get(response, ("",))[0], response in constant)

    return small_multiples(responses, factors, draw, f"main effects: mean per level "
                                                     f"(bars: {100 * (1 - alpha):g}% CI, where runs are replicated; "
                                                     f"dotted: grand mean)")


def interactions_figure(table, factors, level_order, responses, alpha, scales=None, constant=()) -> bytes | None:
    """Per response and pair of factors: one line per level of the second across the levels of the first;
    parallel lines mean no interaction."""
    table = _scaled(table, responses, scales)

    def draw(ax, response, pair):
        first, second = pair
        means = level_means(table, response, [first, second], factors, alpha)
        positions = {str(level): index for index, level in enumerate(level_order[first])}
        seconds = [str(level) for level in level_order[second]]
        for offset, level in enumerate(seconds):
            line = _ordered(means[means[second] == level], first, level_order[first])
            shift = 0.04 * (offset - (len(seconds) - 1) / 2)  # overlapping error bars stay readable
            ax.errorbar(line[first].map(positions) + shift, line["mean"], yerr=_error_bars(line["half"]),
                        marker="o", capsize=3, label=f"{second}={level}")
        ax.set_xticks(range(len(positions)), list(positions))
        ax.set_xlabel(first, fontsize=8)
        anchored(ax, float(table[response].mean()), (scales or {}).get(response, ("",))[0], response in constant)
        if response == responses[0]:
            ax.legend(fontsize=7)

    pairs = list(itertools.combinations(factors, 2))
    return small_multiples(responses, pairs, draw, f"interactions: mean per pair of levels "
                                                   f"(bars: {100 * (1 - alpha):g}% CI)") if pairs else None


# ---- resources over time -----------------------------------------------------------------------------------

RESOURCE_PANELS = (  # (title, column, scale, host-wide): host-wide figures come from the host of rank 0
    ("system CPU %", "system_cpu_percent", 1.0, True),
    ("system memory %", "system_mem_percent", 1.0, True),
    ("RSS of rank 0 (MiB)", "rss_bytes", 2**-20, False),
    ("network packets/s (rx+tx)", "net_packets_per_s", 1.0, True),
)


def _rows_for(series: dict[int, list[dict]], column: str, host_wide: bool) -> list[dict]:
    if host_wide:
        return next(iter(per_host(series, column).values()), [])
    return series.get(min(series), []) if series else []


def resources_figure(runs: list[tuple[str, dict]], palette: dict[str, str]) -> bytes:
    """One panel per resource, one thin line per run, coloured by its configuration."""
    figure, axes = new_figure(1, len(RESOURCE_PANELS))
    for ax, (title, column, scale, host_wide) in zip(axes[0], RESOURCE_PANELS):
        drawn = False
        for label, series in runs:
            rows = [row for row in _rows_for(series, column, host_wide) if row.get("elapsed_s") is not None]
            ys = [math.nan if row.get(column) is None else row[column] * scale for row in rows]
            if any(not math.isnan(y) for y in ys):
                ax.plot([row["elapsed_s"] for row in rows], ys, color=palette[label], linewidth=1, alpha=0.75)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "unavailable", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("elapsed (s)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _legend(figure, palette)
    return png(figure)


def _legend(figure: Figure, palette: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, marker="o", label=label) for label, colour in palette.items()]
    figure.legend(handles=handles, loc="outside lower center", ncols=legend_columns(figure, handles, 4), fontsize=7)


# ---- accuracy versus cost ----------------------------------------------------------------------------------

def pareto_front(points: list[tuple]) -> list[tuple]:
    """The (cost, accuracy, ...) points no other point beats on both: none cheaper and at least as accurate."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda point: (point[0], -point[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def pareto_figure(table: pd.DataFrame, labels: pd.Series, palette: dict[str, str], costs: list[str],
                  accuracy: str = "test_accuracy", axis_labels: dict[str, str] | None = None) -> bytes:
    """Per cost: every run as a small dot, each configuration's mean as a diamond, and the front of the means
    as a step line (the best accuracy reachable for at most that cost), its configurations named by their
    levels (the legend names them all)."""
    figure, axes = new_figure(1, len(costs))
    figure.set_size_inches(5.2 * len(costs), 4.6)
    for ax, cost in zip(axes[0], costs):
        rows = table[table[cost].notna() & table[accuracy].notna()]
        for label, group in rows.groupby(labels.loc[rows.index], sort=False):
            ax.scatter(group[cost], group[accuracy], s=14, alpha=0.5, color=palette[label])
        means = rows.groupby(labels.loc[rows.index], sort=False)[[cost, accuracy]].mean()
        for label, (x, y) in means.iterrows():
            ax.scatter([x], [y], s=60, marker="D", color=palette[label], edgecolor="black", zorder=3)
        front = pareto_front([(x, y, label) for label, (x, y) in means.iterrows()])
        for x, y, label in front:
            short = " / ".join(part.split("=", 1)[-1] for part in label.split(", "))
            ax.annotate(short, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7)
        if front:
            xs, ys, _ = zip(*front)
            ax.step(xs, ys, where="post", color="black", linewidth=1, linestyle="--", label="Pareto front")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel((axis_labels or {}).get(cost, cost), fontsize=8)
        ax.set_ylabel((axis_labels or {}).get(accuracy, accuracy), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle("accuracy versus cost: runs (dots), configuration means (diamonds)", fontsize=10)
    _legend(figure, palette)
    return png(figure)


# ---- curves: accuracy against data, severity, augmentation strength ----------------------------------------

def curves_figure(panels: list[dict], palette: dict[str, str], title: str, log_x: bool = False,
                  dashed_label: str | None = None) -> bytes:
    """Small multiples of mean curves with CI bars: each panel a dict of title, xlabel, ylabel, curves {label:
    (x, mean, half)}, dashed (the labels drawn dashed in that panel, e.g. a shift the policy trains on) and
    xticks (ticks at the measured levels, plainly labelled)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    columns = min(MAX_COLUMNS, len(panels))
    figure, axes = new_figure(math.ceil(len(panels) / columns), columns)
    if len(panels) == 1:
        figure.set_size_inches(5.6, 4.2)
    flat = axes.ravel()
    for ax, panel in zip(flat, panels):
        for label, (x, mean, half) in panel["curves"].items():
            half = np.asarray(half, dtype=float)
            ax.errorbar(x, mean, yerr=None if np.isnan(half).all() else half, marker="o", markersize=3, capsize=3,
                        color=palette[label], linestyle="--" if label in panel.get("dashed", ()) else "-")
        if log_x:
            ax.set_xscale("log")
        if panel.get("xticks") is not None:
            ax.set_xticks(panel["xticks"], [f"{tick:g}" for tick in panel["xticks"]])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(panel["xlabel"], fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colour, marker="o", label=label) for label, colour in palette.items()]
    if dashed_label:
        handles.append(Line2D([], [], color="0.3", linestyle="--", label=dashed_label))
    figure.legend(handles=handles, loc="outside lower center", ncols=legend_columns(figure, handles, 3), fontsize=7)
    figure.suptitle(title, fontsize=10)
    return png(figure)


def legend_columns(figure: Figure, handles: list, most: int) -> int:
    """As many legend columns as the figure's width holds (long configuration labels in a one-panel figure
    would otherwise run off both edges)."""
    longest = max((len(handle.get_label()) for handle in handles), default=1)
    entry_inches = 0.06 * longest + 0.5  # 7-point text is about 0.06 in a character, plus the marker
    return max(1, min(most, len(handles), int(figure.get_figwidth() // entry_inches)))
