"""What a forecast prints: one table per bandwidth × hook (rows: nodes), the fastest choice, and the plot of
images/s against nodes per bandwidth."""

from __future__ import annotations

from pathlib import Path

from distcnn.forecast.link import format_rate
from distcnn.units import duration


def _cap(cap: float | None) -> str:
    return "default" if cap is None else f"{cap:g} MB"


def print_tables(rows: list[dict], title: str, validation: str | None, epochs: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, emoji=False, highlight=False, width=160)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["bandwidth_bits_per_s"], row["comm_hook"]), []).append(row)
    priced = any(row["cost"] is not None for row in rows)
    for (rate, hook), members in groups.items():
        latency = members[0]["latency_s"]
        table = Table(title=f"{title} · {format_rate(rate)}"
                            + (f" +{latency * 1e3:g} ms" if latency else "") + f" · {hook}"
                            + f" · {members[0]['ranks_per_node']} rank(s)/node · link: {members[0]['link']}",
                      title_justify="left")
        columns = ["nodes", "step ms", "images/s", "scaling eff.", "exposed comm", "MB/step/rank",
                   "epoch", f"{epochs} epochs", "node-hours"] + (["cost"] if priced else []) + ["fastest cap"]
        for column in columns:
            table.add_column(column, justify="right")
        for row in members:
            cells = [str(row["nodes"]), f"{row['step_seconds'] * 1e3:.1f}", f"{row['images_per_second']:,.0f}",
                     f"{row['scaling_efficiency']:.2f}" if row["scaling_efficiency"] is not None else "-",
                     f"{row['exposed_comm_share']:.0%}", f"{row['wire_bytes_per_step'] / 1e6:.2f}",
                     duration(row["epoch_seconds"]) if row["epoch_seconds"] is not None else "-",
                     duration(row["training_seconds"]) if row["training_seconds"] is not None else "-",
                     f"{row['node_hours']:.3f}" if row["node_hours"] is not None else "-"]
            if priced:
                cells.append(f"{row['cost']:.2f}" if row["cost"] is not None else "-")
            gain = 1 - row["best_step_seconds"] / row["step_seconds"] if row["step_seconds"] else 0.0
            cells.append(_cap(row["best_bucket_cap_mb"]) + (f" (-{gain:.0%})" if gain >= 0.005 else ""))
            table.add_row(*cells)
        console.print(table)
    if validation:
        console.print(validation)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """images/s against nodes, one line per bandwidth × hook."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["bandwidth_bits_per_s"], row["comm_hook"]), []).append(row)
    for (rate, hook), members in groups.items():
        members = sorted(members, key=lambda row: row["nodes"])
        axes.plot([row["nodes"] for row in members], [row["images_per_second"] for row in members], marker="o",
                  label=f"{format_rate(rate)} {hook}")
    nodes = sorted({row["nodes"] for row in rows})
    axes.set_xscale("log", base=2)
    axes.set_xticks(nodes, [str(n) for n in nodes])
    axes.set_xlabel("nodes")
    axes.set_ylabel("images/s (forecast)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
