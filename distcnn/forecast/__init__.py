"""What a configuration will cost on N nodes over a given link, before renting them: a one-rank profile
(distcnn.forecast.profile, or a finished run: sources) and a link (link: calibrated, or the nominal rate) fed
to one model (model), swept over nodes × bandwidth × hook (plan), printed (output); `--check` sets a finished
multi-rank run beside what the model predicts for it; `--calibrate` measures the link (calibrate).
"""

from __future__ import annotations

import json
from pathlib import Path

from distcnn.errors import UsageError

VALIDATION = Path(__file__).with_name("validation.json")  # written by benchmarks/forecast.py --write-validation


def validation_line() -> str | None:
    """The model's measured error, from the last validation run (benchmarks/forecast.py), or None."""
    try:
        data = json.loads(VALIDATION.read_text())
    except (OSError, ValueError):
        return "model error: not validated on this installation (run benchmarks/forecast.py)"
    return (f"model error on {data['held_out']} held-apart real runs ({data['where']}, {data['date']}): median "
            f"{data['median_abs_error']:.1%}, worst {data['worst_abs_error']:.1%}, Kendall tau "
            f"{data['kendall_tau']:.2f} — benchmarks/forecast.py")


def parse_list(text: str, what: str, parse) -> list:
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(parse(part))
        except ValueError as error:
            raise UsageError(f"--{what} {part!r}: {error}") from None
    if not values:
        raise UsageError(f"--{what}: give at least one value")
    return values


def parse_nodes(text: str) -> list[int]:
    def node(part: str) -> int:
        try:
            count = int(part)
        except ValueError:
            raise ValueError("a whole number of nodes, e.g. 1,2,4,8,16") from None
        if count < 1:
            raise ValueError("nodes must be at least 1")
        return count
    return sorted(set(parse_list(text, "nodes", node)))


def parse_rates(text: str) -> list[float | None]:
    from distcnn.config import parse_bandwidth

    return parse_list(text, "bandwidth", parse_bandwidth)


def parse_latency(text: str | None) -> float:
    from distcnn.config import DELAY, parse_delay

    if text is None:
        return 0.0
    try:
        delay = parse_delay(text)
    except ValueError as error:
        raise UsageError(f"--latency: {error}") from None
    if delay is None:
        return 0.0
    value, unit = DELAY.match(delay).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit.lower()]


def check_profile_seconds(seconds: float | None) -> None:
    """--profile-seconds (of `distcnn forecast` and of `study --forecast`): None for the default, else above 0."""
    if seconds is not None and not seconds > 0:
        raise UsageError(f"--profile-seconds must be above 0, got {seconds}")
