"""The report's figures of what each configuration's runs did (validation curves per epoch, the step-time
breakdown and the bytes per step) and of how well the linear model fits (residuals and their normal QQ plot),
drawn headless like distcnn.study.plots' and returned as PNG bytes."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from distcnn.study.plots import MAX_COLUMNS, legend_columns, new_figure, png


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _legend(figure, palette: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, marker="o", label=label) for label, colour in palette.items()]
    figure.legend(handles=handles, loc="outside lower center", ncols=legend_columns(figure, handles, 3), fontsize=7)


def epochs_figure(curves: dict[str, dict[str, tuple]], palette: dict[str, str]) -> bytes:
    """One panel per figure of epochs.csv (`curves`: title -> configuration -> (epochs, mean, min, max)): the
    mean over the replicates as a line, their range as a band."""
    figure, axes = new_figure(1, len(curves))
    figure.set_size_inches(4.6 * len(curves) + 0.4, 3.8)
    for ax, (title, lines) in zip(axes[0], curves.items()):
        for label, (epochs, mean, low, high) in lines.items():
            ax.plot(epochs, mean, marker="o", markersize=3, color=palette[label])
            if len(epochs) > 1:
                ax.fill_between(epochs, low, high, color=palette[label], alpha=0.15, linewidth=0)
        if not lines:
            ax.text(0.5, 0.5, "unavailable", transform=ax.transAxes, ha="center", color="0.4")
        _style(ax, title, "epoch", title.split(" (")[-1].rstrip(")") if " (" in title else "")
        epochs = sorted({int(e) for line in lines.values() for e in line[0]})
        if 0 < len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    figure.suptitle("per epoch: mean over each configuration's replicates (band: their range)", fontsize=10)
    _legend(figure, palette)
    return png(figure)


def steps_figure(phases: dict[str, dict[str, float]], bytes_per_step: dict[str, float] | None, byte_unit: str,
                 palette: dict[str, str]) -> bytes:
    """Left: each configuration's mean step as stacked bars of its timed phases (ms); right: the gradient
    bytes each rank sends per step (when any configuration has a figure)."""
    from matplotlib import colormaps

    labels = list(phases)
    panels = 2 if bytes_per_step else 1
    figure, axes = new_figure(1, panels)
    figure.set_size_inches(5.6 * panels + 0.4, 0.45 * len(labels) + 1.8)
    ax = axes[0][0]
    names = list(dict.fromkeys(name for parts in phases.values() for name in parts))
    cmap = colormaps["tab10"]
    left = np.zeros(len(labels))
    for index, name in enumerate(names):
        widths = np.array([phases[label].get(name, 0.0) for label in labels])
        ax.barh(labels, widths, left=left, color=cmap(index % 10), label=name, height=0.6)
        left += widths
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncols=min(3, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    _style(ax, "time per training step by phase", "ms per step (mean)", "")
    ax.tick_params(axis="y", labelsize=7)
    if bytes_per_step:
        ax = axes[0][1]
        present = {label: value for label, value in bytes_per_step.items() if value is not None}
        ax.barh(list(present), list(present.values()), color=[palette[label] for label in present], height=0.6)
        ax.invert_yaxis()
        _style(ax, "gradient bytes per step per rank (counted)", byte_unit, "")
        ax.set_yticks([])
    return png(figure)


def residuals_figure(fits: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> bytes:
    """Per response (`fits`: response -> (fitted, residuals, unit)): residuals against fitted values, then
    their normal QQ plot (scipy.stats.probplot) — a funnel or a bent QQ line warns that the F tests' and
    intervals' assumptions (equal variance, normal errors) do not hold."""
    panels = [(response, kind) for response in fits for kind in ("residuals", "qq")]
    columns = min(MAX_COLUMNS, len(panels))
    figure, axes = new_figure(math.ceil(len(panels) / columns), columns)
    flat = axes.ravel()
    for ax, (response, kind) in zip(flat, panels):
        fitted, residuals, unit = fits[response]
        if kind == "residuals":
            ax.scatter(fitted, residuals, s=12)
            ax.axhline(0, color="0.5", linewidth=0.8)
            _style(ax, f"{response}: residuals", f"fitted ({unit})" if unit else "fitted", unit)
        else:
            (theoretical, ordered), (slope, intercept, _) = stats.probplot(residuals, dist="norm")
            ax.scatter(theoretical, ordered, s=12)
            ax.plot(theoretical, slope * np.asarray(theoretical) + intercept, color="0.4", linewidth=0.8)
            _style(ax, f"{response}: normal QQ", "normal quantile", f"residual ({unit})" if unit else "residual")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    figure.suptitle("model checks: residuals of the fitted model", fontsize=10)
    return png(figure)
