"""`distcnn study FILE --forecast`: what each configuration of a study will cost before anything runs, kept in
STUDY_DIR/forecast.json for the report to set beside what the runs measured.

Each configuration is profiled on one rank here (a short profile: its own comm hook only) and forecast at its
own ranks (nnodes × nproc_per_node) over its link: the emulated cluster's --bandwidth, or a --link-profile.
A configuration of several ranks on this one machine has its communication forecast only with an
--intra-profile (the loopback link between ranks is not a network rate); otherwise its row says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from distcnn.config import parse_bandwidth
from distcnn.errors import UsageError
from distcnn.forecast import link as links
from distcnn.forecast import plan
from distcnn.forecast.model import step
from distcnn.study.spec import StudySpec
from distcnn.units import duration

FORECAST = "forecast.json"
PROFILE_SECONDS = 3.0  # a study's configurations are many: a shorter profile each than `distcnn forecast`'s


def forecast_study(spec: StudySpec, out: Path, link_profile: str | None = None, intra_profile: str | None = None,
                   profile_seconds: float = PROFILE_SECONDS) -> list[dict]:
    """Forecast every configuration of `spec` (each profiled for about `profile_seconds`), print the table,
    write STUDY_DIR/forecast.json."""
    from distcnn.config import make_config
    from distcnn.forecast.commands import sharing
    from distcnn.forecast.profile import profile

    inter = links.read(link_profile) if link_profile else None
    intra = links.read(intra_profile) if intra_profile else None
    rows = []
    for levels in spec.configurations():
        config = make_config(spec.options(levels))
        world = config.nnodes * config.nproc_per_node
        if config.strategy != "ddp":
            rows.append({"levels": levels, "note": "not forecast: the forecast models data-parallel runs (ddp)"})
            continue
        threads = config.threads_per_rank(config.nproc_per_node)
        prof = profile(config, threads, quiet=True, main_seconds=profile_seconds, hooks=(config.comm_hook,),
                       alongside=sharing(config, config.nproc_per_node)).profile
        rate = parse_bandwidth(config.bandwidth) if config.bandwidth else None
        note = ""
        if world == 1:
            link, note = None, "one rank: no communication"
        elif config.nnodes == 1 and intra is None:
            link, note = None, "communication not forecast: give --intra-profile (ranks of this machine)"
        else:
            try:
                link, note = plan.link_at(inter, intra, config.nnodes, rate, 0.0)
            except UsageError as error:  # an uncapped link without a link profile: say so in its row
                link, note = None, f"communication not forecast: {error}"
        seconds = step(prof, link, world, config.comm_hook, config.bucket_cap_mb, config.powersgd_rank).seconds \
            if link is not None else prof.compute_seconds
        per_epoch = plan.steps_per_epoch(prof.train_images, world, config.batch_size)
        train = config.epochs * per_epoch * seconds
        run = train + config.epochs * (prof.eval_seconds or 0.0) / world
        rows.append({"levels": levels, "world_size": world, "step_seconds": seconds,
                     "images_per_second": world * config.batch_size / seconds, "steps_per_epoch": per_epoch,
                     "train_seconds": train, "run_seconds": run, "replicates": spec.replicates,
                     "node_hours": config.nnodes * run * spec.replicates / 3600, "note": note})
    from distcnn.record import write_json

    write_json(out / FORECAST, {"rows": rows})
    print_forecast(rows, spec)
    return rows


def print_forecast(rows: list[dict], spec: StudySpec) -> None:
    factors = list(spec.factors)
    print(f"forecast of study {spec.name} ({len(rows)} configurations × {spec.replicates} replicate(s)):")
    total = hours = 0.0
    for row in rows:
        label = ", ".join(f"{name}={value}" for name, value in row["levels"].items() if name in factors) or "base"
        if "step_seconds" not in row:
            print(f"  {label}: {row['note']}")
            continue
        total += row["run_seconds"] * row["replicates"]
        hours += row["node_hours"]
        print(f"  {label}: step {row['step_seconds'] * 1e3:.1f} ms, {row['images_per_second']:,.0f} images/s, "
              f"training {duration(row['train_seconds'])} per run"
              + (f" ({row['note']})" if row["note"] else ""))
    print(f"  in all: about {duration(total)} of runs, {hours:.3f} node-hours (training and validation; start-up, "
          "checkpoints and the test set not included)")


def read_forecast(study_dir: Path) -> list[dict] | None:
    """STUDY_DIR/forecast.json's rows; None when the study was not forecast; one line when it is damaged."""
    path = Path(study_dir) / FORECAST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path}: damaged ({error.__class__.__name__}); forecast again with "
                         "distcnn study FILE --forecast") from None
