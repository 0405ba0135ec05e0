"""Is the forecast right? Predicted against measured step time on real 2-host jobs of the emulated cluster.

1. Calibrate (kept apart: these are the only measurements the model is fitted to): `distcnn forecast
   --calibrate` on the 2 emulated hosts at each link cap used below (α, B_eff, PowerSGD's chain, compute
   slowdown per byte), and its reference run (simplecnn, batch 96: no scored configuration) for the compute
   factor.
2. Profile each (model, batch) on one rank, one thread, on this machine (distcnn.forecast.profile).
3. Score: train each configuration for real on the 2 emulated hosts (one rank, one thread each), measure its
   steady step (epoch 2 of 2), and set it beside the forecast for it. None of these runs is fitted to.
   Steps 2 and 3 are repeated in rounds (--repeats): this shared 2-core machine slows down now and then for a
   few seconds, which moves one run by up to 30 %, so each configuration's median forecast is scored against
   its median measured step, and the table shows how far its runs spread.
Regimes: compute-bound (fast links), bandwidth-bound (capped links, large gradients), latency-bound (many small
messages: tiny buckets, PowerSGD's three allreduces per bucket; this kernel has no netem for added delay).
Then the bucket cap the model recommends is trained against DDP's default 25 MB.

Needs root (network namespaces); brings its own cluster up and takes it down.

    .venv/bin/python benchmarks/forecast.py [--steps 16] [--repeats 3] [--quick | --regime R] [--write-validation]
    .venv/bin/python benchmarks/forecast.py --rescore [--write-validation]   # the kept runs, the model as it is
    .venv/bin/python benchmarks/forecast.py --caps [--repeats 3]   # the recommended bucket caps only, trained
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import shutil
import time
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table
from scipy.stats import kendalltau

from distcnn import cluster
from distcnn.config import make_config, parse_bandwidth
from distcnn.forecast import VALIDATION, link as links, model, sources
from distcnn.forecast.profile import profile
from distcnn.record import RunRecord

ROOT = Path(__file__).resolve().parents[1]
RATES = ["10mbit", "100mbit", "1gbit", "none"]
# model, batch per rank, link, hook, bucket cap (MB, None: DDP's default), regime
CONFIGS = [
    ("simplecnn", 128, "none", "allreduce", None, "compute"),
    ("deepcnn", 64, "none", "allreduce", None, "compute"),
    ("mobilenetv3_small_050", 64, "none", "allreduce", None, "compute"),
    ("resnet18", 32, "none", "fp16", None, "compute"),
    ("simplecnn", 64, "1gbit", "bf16", None, "compute"),
    ("simplecnn", 64, "10mbit", "allreduce", None, "bandwidth"),
    ("simplecnn", 128, "10mbit", "fp16", None, "bandwidth"),
    ("deepcnn", 32, "100mbit", "allreduce", None, "bandwidth"),
    ("mobilenetv3_small_050", 32, "100mbit", "allreduce", None, "bandwidth"),
    ("resnet18", 32, "1gbit", "allreduce", None, "bandwidth"),
    ("resnet18", 32, "100mbit", "powersgd", None, "bandwidth"),
    ("deepcnn", 64, "10mbit", "powersgd", None, "bandwidth"),
    ("lenet", 32, "none", "allreduce", 0.002, "latency"),
    ("simplecnn", 32, "none", "allreduce", 0.01, "latency"),
    ("lenet", 16, "1gbit", "bf16", 0.001, "latency"),
    ("mobilenetv3_small_050", 16, "none", "fp16", 0.05, "latency"),
]
QUICK = [0, 5, 9, 12, 13]
# the calibration's reference run, which its compute factor is fitted on: no scored configuration is it
REFERENCE = ["--model", "simplecnn", "--batch-size", "96", "--data", "synthetic:n=8000,test=64"]


def data(batch: int, steps: int) -> str:
    return f"synthetic:n={int(2 * batch * steps / 0.9) + 2},test=64"


def train(out: Path, name: str, batch: int, rate: str, hook: str, cap: float | None, steps: int) -> RunRecord:
    command = [sys.executable, "-m", "distcnn", "train", "--model", name, "--epochs", "2", "--data",
               data(batch, steps), "--batch-size", str(batch), "--cluster", "emulated", "--nnodes", "2",
               "--bandwidth", rate, "--comm-hook", hook, "--out", str(out), "--val-fraction", "0.1"]
    command += ["--bucket-cap-mb", str(cap)] if cap is not None else []
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return RunRecord(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="steps per rank per epoch")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of profile and run per configuration (their medians are scored)")
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} configurations only")
    parser.add_argument("--regime", choices=("compute", "bandwidth", "latency"),
                        help="only the configurations of one regime (and the links they use)")
    parser.add_argument("--keep", default="runs/forecast-benchmark", help="where the runs are kept (replaced)")
    parser.add_argument("--write-validation", action="store_true",
                        help=f"store the errors in {VALIDATION.relative_to(ROOT)} for the forecast's output")
    parser.add_argument("--caps", action="store_true",
                        help="only train the bucket caps the model recommends beside DDP's default (--repeats times "
                             "each), from the kept calibration and profiles")
    parser.add_argument("--rescore", action="store_true",
                        help="score the kept calibration, profiles and runs again with the model as it is now "
                             "(trains nothing)")
    args = parser.parse_args()
    if args.caps:
        caps_only(args)
        return
    if args.rescore:
        started = time.perf_counter()
        report(Console(width=190), merge(rescore(ROOT / args.keep)), [], started, args)
        return
    try:
        cluster.require_privileges()
    except Exception as error:  # noqa: BLE001 — the one line the CLI would print
        raise SystemExit(f"forecast benchmark: {error}")
    console = Console(width=190)
    chosen = QUICK if args.quick else range(len(CONFIGS))  # run{i} is CONFIGS[i], as --rescore reads it back
    chosen = [i for i in chosen if args.regime in (None, CONFIGS[i][5])]
    configs = [CONFIGS[i] for i in chosen]
    started = time.perf_counter()
    cluster.up(2)
    try:
        folder = ROOT / args.keep
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        link_profile = calibrate(console, folder, configs)
        rounds = []
        for round_ in range(args.repeats):  # each round profiles and trains every configuration once more
            profiles: dict[tuple, model.Profile] = {}
            rounds.append([score(console, folder / f"round{round_}", i, profiles, link_profile, args.steps)
                           for i in chosen])
        cap_rows = bucket_check(profiles, link_profile, Path(folder), args.steps, args.repeats)
    finally:
        cluster.down()
    report(console, merge(rounds), cap_rows, started, args)


def calibrate(console: Console, folder: Path, configs: list) -> links.LinkProfile:
    """`distcnn forecast --calibrate` at every rate the configurations use, and its table."""
    profile_path = folder / "link.json"
    rates = sorted({rate for _, _, rate, *_ in configs}, key=RATES.index)
    done = subprocess.run(
        [sys.executable, "-m", "distcnn", "forecast", "--calibrate", "--cluster", "emulated", "--nnodes",
         "2", "--bandwidth", ",".join(rates), "--link-profile", str(profile_path), *REFERENCE],
        cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"calibration failed:\n{done.stderr[-2000:]}")
    link_profile = links.read(profile_path)
    calibration = Table(title="calibration (fitted to; not scored): allreduce on 2 emulated hosts")
    for column in ("link", "α ms", "B_eff Mbit/s", "α idle ms", "B_eff idle Mbit/s", "share of rate", "hop ms",
                   "slowdown ns/B", "slowdown ms/message", "burst KiB", "points"):
        calibration.add_column(column, justify="right")
    for entry in link_profile.entries:
        calibration.add_row(links.format_rate(entry.rate_bits), f"{entry.alpha_s * 1e3:.3f}",
                            f"{entry.bytes_per_s * 8 / 1e6:,.1f}", f"{entry.idle_alpha_s * 1e3:.3f}",
                            f"{entry.idle_bytes_per_s * 8 / 1e6:,.1f}",
                            f"{entry.share:.3f}" if entry.share else "-", f"{entry.hop_s * 1e3:.3f}",
                            f"{entry.slowdown_s_per_byte * 1e9:.3f}", f"{entry.slowdown_s_per_message * 1e3:.3f}",
                            f"{entry.burst_bytes / 1024:.0f}", str(len(entry.points)))
    console.print(calibration)
    reference = link_profile.reference or {}
    console.print(f"compute factor {link_profile.compute_factor:.3f}, fitted on the reference run "
                  f"({' '.join(REFERENCE)}, 2 hosts, {links.format_rate(reference.get('rate_bits'))}): "
                  f"step measured {reference.get('measured_step_seconds', 0) * 1e3:.1f} ms, "
                  f"{reference.get('predicted_step_seconds_at_1', 0) * 1e3:.1f} ms forecast at factor 1")
    return link_profile


def score(console: Console, folder: Path, i: int, profiles: dict, link_profile, steps: int) -> dict:
    """Configuration i: its profile (once a round per model and batch), its forecast, its real run."""
    name, batch, rate, hook, cap, _ = CONFIGS[i]
    key = (name, batch)
    folder.mkdir(parents=True, exist_ok=True)
    if key not in profiles:
        config = make_config({"model": name, "batch_size": batch, "data": data(batch, steps), "threads": 1,
                              "val_fraction": 0.1})
        profiles[key] = profile(config, threads=1, quiet=True, alongside=1).profile  # the other host
        keep_profile(folder / f"profile-{name}-{batch}.json", profiles[key])
    record = train(folder / f"run{i}", name, batch, rate, hook, cap, steps)
    row = scored(CONFIGS[i], profiles[key], link_profile, sources.measured_step(record))
    phases = sources.steady_phases(record)
    last = record.read_epochs()[-1]
    console.print(f"  {name} b{batch} {rate} {hook} cap {cap}: predicted {row['predicted'] * 1e3:.1f} ms, "
                  f"measured {row['measured'] * 1e3:.1f} ms ({row['predicted'] / row['measured'] - 1:+.1%}); "
                  "profile fwd/bwd/opt "
                  + "/".join(f"{profiles[key].phases[p] * 1e3:.1f}" for p in ("forward", "backward", "optimizer"))
                  + ", run " + "/".join(f"{phases[p] * 1e3:.1f}" for p in ("forward", "backward", "optimizer"))
                  + f", DDP comm {float(last.get('ddp_comm_mean_s') or 0) * 1e3:.1f} ms, "
                  f"{last.get('comm_calls_per_step')} calls/step, {row['buckets']} buckets forecast")
    return row


def scored(config: tuple, prof: model.Profile, link_profile: links.LinkProfile, measured: float) -> dict:
    """A configuration's forecast from its profile over the calibrated link, beside the step its run measured."""
    name, batch, rate, hook, cap, regime = config
    link, how = link_profile.link(parse_bandwidth(rate), 0.0)
    predicted = model.step(prof, link, 2, hook, cap)
    return {"model": name, "batch": batch, "link": rate, "hook": hook, "cap": cap, "regime": regime,
            "predicted": predicted.seconds, "measured": measured, "compute": predicted.compute_seconds,
            "exposed": predicted.exposed_comm_share, "buckets": predicted.buckets, "how": how}


def merge(rounds: list[list[dict]]) -> list[dict]:
    """Each configuration's median forecast (and its compute and exposed share) and median measured step over
    the rounds, and how far its rounds' measured steps spread (max − min over the median): what this machine's
    noise alone does to one run."""
    merged = []
    for rows in zip(*rounds):
        measured = [row["measured"] for row in rows]
        row = rows[0] | {key: statistics.median(row[key] for row in rows)
                         for key in ("predicted", "compute", "exposed")}
        row |= {"measured": statistics.median(measured), "rounds": len(rows)}
        row["spread"] = (max(measured) - min(measured)) / row["measured"]
        row["error"] = (row["predicted"] - row["measured"]) / row["measured"]
        merged.append(row)
    return merged


def keep_profile(path: Path, profiled: model.Profile) -> None:
    """The profile beside the runs, so that the forecast can be scored again without training again."""
    import dataclasses

    path.write_text(json.dumps(dataclasses.asdict(profiled)) + "\n")


def kept_profile(path: Path) -> model.Profile:
    kept = json.loads(path.read_text())
    kept["gradients"] = tuple(model.Gradient(tuple(g["shape"]), g["element_size"], g["ready_s"])
                              for g in kept["gradients"])
    return model.Profile(**kept)


def rescore(folder: Path) -> list[list[dict]]:
    """Every kept round's forecasts made again from its kept profiles and the kept link profile, beside the
    steps its runs measured."""
    if not (folder / "link.json").exists():
        raise SystemExit(f"forecast benchmark: nothing kept in {folder} to score again (run it first)")
    link_profile = links.read(folder / "link.json")
    rounds = []
    for kept in sorted(folder.glob("round*")):
        rows = []
        for i, config in enumerate(CONFIGS):
            record = RunRecord(kept / f"run{i}")
            if not record.finished:
                continue
            name, batch = config[:2]
            rows.append(scored(config, kept_profile(kept / f"profile-{name}-{batch}.json"), link_profile,
                               sources.measured_step(record)))
        rounds.append(rows)
    return rounds


# where the model keeps DDP's default (the first three) and where it recommends another cap (the last two)
CAP_CHECKS = [("resnet18", 32, "1gbit"), ("deepcnn", 32, "100mbit"), ("mobilenetv3_small_050", 32, "100mbit"),
              ("deepcnn", 32, "1gbit"), ("resnet18", 32, "none")]


def bucket_check(profiles, link_profile, folder: Path, steps: int, repeats: int = 1) -> list[dict]:
    """DDP's default cap and the one the model recommends, trained side by side (one after the other, `repeats`
    times, medians kept) where the recommendation differs; the default alone where it does not."""
    rows = []
    for name, batch, rate in CAP_CHECKS:
        if (name, batch) not in profiles:
            continue
        link, _ = link_profile.link(parse_bandwidth(rate), 0.0)
        cap, _ = model.best_cap(profiles[(name, batch)], link, 2, "allreduce")
        chosen = [("default (25 MB)", None)] + ([(f"recommended ({cap:g} MB)", cap)] if cap is not None else [])
        measured = {label: [] for label, _ in chosen}
        for i in range(repeats if cap is not None else 1):
            for label, value in chosen:
                record = train(folder / f"cap-{name}-{batch}-{rate}-{value}-{i}", name, batch, rate, "allreduce",
                               value, steps)
                measured[label].append(sources.measured_step(record))
        for label, value in chosen:
            rows.append({"config": f"{name} b{batch} {rate}", "cap": label,
                         "predicted": model.step(profiles[(name, batch)], link, 2, "allreduce", value).seconds,
                         "measured": statistics.median(measured[label]), "runs": len(measured[label])})
    return rows


def caps_only(args) -> None:
    """--caps: the bucket-cap check alone, from the kept link profile and the last kept round's profiles."""
    folder = ROOT / args.keep
    rounds = sorted(folder.glob("round*"))
    if not (folder / "link.json").exists() or not rounds:
        raise SystemExit(f"forecast benchmark: nothing kept in {folder} (run it first)")
    profiles = {(name, batch): kept_profile(rounds[-1] / f"profile-{name}-{batch}.json")
                for name, batch, _ in CAP_CHECKS if (rounds[-1] / f"profile-{name}-{batch}.json").exists()}
    started = time.perf_counter()
    cluster.up(2)
    try:
        rows = bucket_check(profiles, links.read(folder / "link.json"), folder / "caps", args.steps, args.repeats)
    finally:
        cluster.down()
    print_caps(Console(width=190), rows)
    print(f"python {' '.join(sys.argv)}; {os.cpu_count()} cores; {time.perf_counter() - started:.0f} s")


def print_caps(console: Console, rows: list[dict]) -> None:
    caps = Table(title="bucket cap the model recommends (allreduce, 2 hosts) beside DDP's default, both trained")
    for column in ("configuration", "cap", "predicted ms", "measured ms (median)", "runs"):
        caps.add_column(column, justify="right")
    for row in rows:
        caps.add_row(row["config"], row["cap"], f"{row['predicted'] * 1e3:.1f}", f"{row['measured'] * 1e3:.1f}",
                     str(row["runs"]))
    console.print(caps)


def report(console: Console, results: list[dict], cap_rows: list[dict], started: float, args) -> None:
    table = Table(title="held apart (scored; no run here was fitted to): 2 emulated hosts × 1 rank × 1 thread, "
                        f"step = mean of epoch 2 ({args.steps} steps/rank); median of {results[0]['rounds']} "
                        "rounds")
    for column in ("regime", "model", "batch", "link", "hook", "cap MB", "buckets", "compute ms", "predicted ms",
                   "measured ms", "error", "runs' spread", "exposed comm (forecast)"):
        table.add_column(column, justify="left" if column in ("regime", "model", "link", "hook") else "right")
    for row in results:
        table.add_row(row["regime"], row["model"], str(row["batch"]), row["link"], row["hook"],
                      "default" if row["cap"] is None else f"{row['cap']:g}", str(row["buckets"]),
                      f"{row['compute'] * 1e3:.1f}", f"{row['predicted'] * 1e3:.1f}", f"{row['measured'] * 1e3:.1f}",
                      f"{row['error']:+.1%}", f"{row['spread']:.0%}", f"{row['exposed']:.0%}")
    console.print(table)
    summary = Table(title="absolute error of the step time, held-apart configurations")
    for column in ("regime", "configurations", "median", "worst"):
        summary.add_column(column, justify="right")
    errors = {}
    for regime in ("compute", "bandwidth", "latency"):
        errors[regime] = [abs(row["error"]) for row in results if row["regime"] == regime]
    errors["all"] = [abs(row["error"]) for row in results]
    for regime, values in errors.items():
        if values:
            summary.add_row(regime, str(len(values)), f"{statistics.median(values):.1%}", f"{max(values):.1%}")
    console.print(summary)
    tau = kendalltau([row["predicted"] for row in results], [row["measured"] for row in results]).statistic
    console.print(f"Kendall tau of the {len(results)} configurations' step times, predicted vs measured: {tau:.3f}")
    if cap_rows:
        print_caps(console, cap_rows)
    console.print(f"python {' '.join(sys.argv)}; {os.cpu_count()} cores; {time.perf_counter() - started:.0f} s")
    if args.write_validation and not args.quick and not args.regime:
        VALIDATION.write_text(json.dumps({
            "held_out": len(results),
            "where": "2 emulated hosts, each pinned to a core of its own, 1 rank × 1 thread each",
            "date": date.today().isoformat(), "median_abs_error": statistics.median(errors["all"]),
            "worst_abs_error": max(errors["all"]), "kendall_tau": tau,
            "by_regime": {regime: {"median": statistics.median(v), "worst": max(v)}
                          for regime, v in errors.items() if v and regime != "all"}}, indent=1) + "\n")
        console.print(f"wrote {VALIDATION}")


if __name__ == "__main__":
    main()
