"""`distcnn forecast`: the forecast, `--calibrate`, `--from` and `--check`, as the command line and the Python
API call them (the options as a dict of option names; nothing here parses flags)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distcnn import forecast as helpers
from distcnn.config import TrainConfig, make_config
from distcnn.console import say
from distcnn.errors import UsageError
from distcnn.forecast import link as links
from distcnn.forecast import output, plan
from distcnn.forecast.model import HOOKS, Profile, step


@dataclass
class Request:
    """What a forecast was asked for, besides the run options."""

    nodes: str = "1,2,4,8,16"
    bandwidth: str = "100mbit,1gbit,10gbit"
    latency: str | None = None
    ranks_per_node: int = 1
    price_per_node_hour: float | None = None
    hooks: str | None = None  # None: the run option's hook when given, else all four
    link_profile: str | None = None
    intra_profile: str | None = None
    from_run: str | None = None
    json: bool = False
    plot: str | None = None
    profile_seconds: float | None = None  # None: distcnn.forecast.profile.MAIN_SECONDS
    reference_runs: int = 3  # --calibrate: reference runs (each with its profile) the compute factor is fitted on


def backend_of(config: TrainConfig) -> str:
    from distcnn.parallel.world import device_type

    return "nccl" if device_type(config.device) == "cuda" else "gloo"


def load_links(request: Request, config: TrainConfig) -> tuple[links.LinkProfile | None, links.LinkProfile | None]:
    kind = "emulated" if config.cluster == "emulated" else "machines"
    found = []
    for path in (request.link_profile, request.intra_profile):
        profile = links.read(path) if path else None
        if profile is not None:
            links.check_matches(profile, kind, backend_of(config))
        found.append(profile)
    return found[0], found[1]


def get_profile(config: TrainConfig, request: Request, quiet: bool,
                hooks: tuple[str, ...] = HOOKS) -> tuple[Profile, dict]:
    if request.from_run:
        from distcnn.forecast.sources import profile_from_run

        return profile_from_run(request.from_run)
    from distcnn.forecast.profile import HOOK_SECONDS, MAIN_SECONDS, WARMUP_STEPS, profile
    from distcnn.launch import validate

    validate(config.model_copy(update={"nproc_per_node": 1, "nnodes": 1, "cluster": "none", "bandwidth": None,
                                        "delay": None, "rdzv_endpoint": None}))
    threads = config.threads or config.threads_per_rank(request.ranks_per_node)
    if not quiet:
        say(f"profiling {config.model} (batch {config.batch_size}, {config.precision}) on one rank with "
            f"{threads} thread(s): {WARMUP_STEPS} warm-up steps, then about {request.profile_seconds or MAIN_SECONDS:g} s of "
            "steps with allreduce"
            + (f" and {HOOK_SECONDS:g} s with each of {', '.join(h for h in hooks if h != 'allreduce')}"
               if set(hooks) - {"allreduce"} else ""))
    main = request.profile_seconds if request.profile_seconds is not None else MAIN_SECONDS
    profiled = profile(config, threads, quiet=quiet, hooks=hooks, alongside=sharing(config, request.ranks_per_node),
                       main_seconds=main, hook_seconds=min(HOOK_SECONDS, main / 4))
    return profiled.profile, profiled.meta


def sharing(config: TrainConfig, ranks_per_node: int) -> int:
    """The other ranks on the profiled rank's machine in the run forecast: every rank of every emulated host
    (they all run here), else the node's other ranks when they share its CPU."""
    from distcnn.parallel.world import device_type

    if config.cluster == "emulated":
        return config.nnodes * ranks_per_node - 1
    return ranks_per_node - 1 if device_type(config.device) == "cpu" else 0


def run_forecast(options: dict, request: Request) -> list[dict]:
    """The forecast rows (and, unless --json, the printed tables and the plot)."""
    nodes = helpers.parse_nodes(request.nodes)
    rates = helpers.parse_rates(request.bandwidth)
    latency = helpers.parse_latency(request.latency)
    helpers.check_profile_seconds(request.profile_seconds)
    if request.ranks_per_node < 1:
        raise UsageError(f"--ranks-per-node must be at least 1, got {request.ranks_per_node}")
    if request.price_per_node_hour is not None and request.price_per_node_hour < 0:
        raise UsageError(f"--price-per-node-hour must be 0 or more, got {request.price_per_node_hour}")
    hooks = helpers.parse_list(request.hooks, "comm-hooks", _hook) if request.hooks else (
        [options["comm_hook"]] if options.get("comm_hook") else list(HOOKS))
    config = make_config(options)
    inter, intra = load_links(request, config)
    for rate in rates:  # a link that cannot be forecast is one line before the profile, not after it
        for count in nodes:
            if count * request.ranks_per_node > 1:
                plan.link_at(inter, intra, count, rate, latency)
    started = time.perf_counter()
    profile, meta = get_profile(config, request, quiet=request.json, hooks=tuple(hooks))
    sweep = plan.Sweep(nodes, rates, latency, request.ranks_per_node, hooks, config.bucket_cap_mb, config.epochs,
                       request.price_per_node_hour, config.powersgd_rank, backend_of(config) == "gloo")
    rows = plan.rows(profile, sweep, inter, intra)
    for row in rows:
        row |= {"model": config.model, "batch_size": config.batch_size, "policy": config.policy,
                "precision": config.precision, "profile": meta.get("source")}
    if request.json:
        print(json.dumps(rows, indent=1))
        return rows
    title = (f"{config.model} · batch {config.batch_size}/rank · {config.policy} · {config.precision} · "
             f"from {meta.get('source')}")
    output.print_tables(rows, title, helpers.validation_line(), config.epochs)
    best = plan.fastest(rows)
    if best is not None:
        say(f"fastest at {best['nodes']} nodes: {best['comm_hook']} over {links.format_rate(best['bandwidth_bits_per_s'])} "
            f"with --bucket-cap-mb {best['best_bucket_cap_mb'] if best['best_bucket_cap_mb'] is not None else 25} "
            f"({best['best_step_seconds'] * 1e3:.1f} ms a step); one-time warm-up measured "
            f"{meta.get('warmup_seconds') or 0:.1f} s; forecast took {time.perf_counter() - started:.1f} s")
    if len({row["nodes"] for row in rows}) > 1:
        path = Path(request.plot or "runs/forecast.png")
        say(f"plot: {output.plot(rows, path, title)}")
    return rows


def _hook(text: str) -> str:
    if text not in HOOKS:
        from distcnn.errors import nearest

        raise ValueError(f"unknown comm hook; choose from {', '.join(HOOKS)}{nearest(text, HOOKS)}")
    return text


def check(options: dict, request: Request, run_dir: str) -> dict:
    """A finished multi-rank run beside what the model predicts for it."""
    from distcnn.forecast import sources
    from distcnn.record import RunRecord

    record = sources.finished(run_dir, "--check")
    saved = RunRecord(run_dir).read_config()
    summary = record.read_summary()
    world = summary.get("world_size", 1)
    if world < 2:
        raise UsageError(f"--check {run_dir}: a one-rank run has no communication to check; give a run of "
                         "several ranks (use it with --from instead)")
    fields = set(TrainConfig.model_fields)
    config = make_config({key: value for key, value in saved.items() if key in fields
                          and key not in ("out", "resume", "prepare_only")})
    nodes, per_node = config.nnodes, config.nproc_per_node
    cluster = {}
    if record.path("cluster.json").exists():
        cluster = json.loads(record.path("cluster.json").read_text())
    rate, latency = _caps(cluster, config)
    request.ranks_per_node = per_node
    inter, intra = load_links(request, config)
    if nodes == 1 and intra is None:
        raise UsageError(f"--check {run_dir}: its {world} ranks ran on one machine, over its loopback: give "
                         "--intra-profile FILE (distcnn forecast --calibrate --nproc-per-node 2 measures it)")
    environment = json.loads(record.path("environment.json").read_text()) if record.path(
        "environment.json").exists() else {}
    profile_config = config.model_copy(update={"threads": environment.get("threads_per_rank") or config.threads})
    profile, meta = get_profile(profile_config, request, quiet=request.json, hooks=(config.comm_hook,))
    link, how = plan.link_at(inter, intra, nodes, rate, latency)
    predicted = step(profile, link, world, config.comm_hook, config.bucket_cap_mb, config.powersgd_rank,
                     backend_of(config) == "gloo").seconds
    measured = sources.measured_step(record)
    result = {"run": str(record.dir), "nodes": nodes, "ranks_per_node": per_node, "bandwidth_bits_per_s": rate,
              "latency_s": latency, "comm_hook": config.comm_hook, "bucket_cap_mb": config.bucket_cap_mb,
              "predicted_step_seconds": predicted, "measured_step_seconds": measured,
              "error": (predicted - measured) / measured, "link": how, "profile": meta.get("source")}
    if request.json:
        print(json.dumps(result, indent=1))
    else:
        say(f"{record.dir}: {nodes} node(s) × {per_node} rank(s), {links.format_rate(rate)}"
            + (f" +{latency * 1e3:g} ms" if latency else "") + f", {config.comm_hook}: step predicted "
            f"{predicted * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms, error {result['error']:+.1%} "
            f"(link: {how}; profile: {meta.get('source')})")
    return result


def _caps(cluster: dict, config: TrainConfig) -> tuple[float | None, float]:
    """The link rate and delay a run had: its cluster.json's caps as tc showed them ("tbf rate 100Mbit burst
    …; netem delay 1ms"), else its own --bandwidth."""
    import re

    caps = (cluster.get("hosts") or [{}])[0].get("caps", "")
    if not caps:
        return (helpers.parse_rates(config.bandwidth)[0] if config.bandwidth else None), 0.0
    rate = re.search(r"rate (\d+(?:\.\d+)?[KMGT]?bit)", caps, re.IGNORECASE)
    delay = re.search(r"delay (\d+(?:\.\d+)?(?:us|ms|s))", caps)
    return (helpers.parse_rates(rate.group(1))[0] if rate else None,
            helpers.parse_latency(delay.group(1)) if delay else 0.0)


def refit(entries: list, world: int) -> list:
    """Every link's α (and PowerSGD's chain) from the fastest one, where small messages are not slowed by the
    rate, plus what its own added delay costs; each B_eff refitted with it."""
    from dataclasses import replace

    from distcnn.forecast.link import fit

    fastest = max(entries, key=lambda entry: entry.bytes_per_s)

    def moved(measured: float | None, entry, messages: int = 1) -> float | None:
        """The fastest link's time of `messages` allreduces one after another, with entry's added delay."""
        delay = messages * 2 * (world - 1) * (entry.latency_s - fastest.latency_s)
        return None if measured is None else measured + delay

    refitted = []
    for entry in entries:
        alpha, idle_alpha = moved(fastest.alpha_s, entry), moved(fastest.idle_alpha_s, entry)
        refitted.append(replace(entry, alpha_s=alpha, bytes_per_s=fit(entry.points, world, alpha)[1],
                                powersgd_bucket_s=moved(fastest.powersgd_bucket_s, entry, 3),
                                idle_alpha_s=idle_alpha, idle_bytes_per_s=fit(entry.idle_points, world, idle_alpha)[1],
                                powersgd_bucket_idle_s=moved(fastest.powersgd_bucket_idle_s, entry, 3)))
    return refitted


REFERENCE_STEPS = 12  # steps per rank per epoch of the reference run
REFERENCE_EPOCHS = 4  # the first is warm-up; the step is the mean of the other three (one epoch was too noisy)


def fit_compute_factor(config: TrainConfig, request: Request, profile: links.LinkProfile) -> links.LinkProfile:
    """Train the calibration's own configuration for real on these ranks (four short epochs, over the fastest
    calibrated link), profile it on one rank, and find the compute factor with which the model's step equals
    the measured one; `request.reference_runs` times, run and profile one after the other, and the median
    factor kept: on a shared machine one run or one profile can be 10-20 % off, which one pair passes on to
    every forecast. The configuration is the user's: keep it apart from those a forecast is judged on."""
    from dataclasses import replace
    from statistics import median

    fastest = profile.fastest
    world = config.nproc_per_node * config.nnodes
    link, _ = profile.link(fastest.rate_bits, 0.0)
    request.ranks_per_node = config.nproc_per_node  # the profiles share the machine as the ranks do
    say(f"reference: {request.reference_runs} run(s) of {config.model}, batch {config.batch_size}, {world} ranks "
        f"over {links.format_rate(fastest.rate_bits)}, {REFERENCE_EPOCHS} epochs of {REFERENCE_STEPS} steps, "
        "each with its one-rank profile")
    pairs = []
    for _ in range(request.reference_runs):
        measured, prof = _reference_pair(config, request, fastest, world)

        def predicted(factor: float, prof=prof) -> float:
            return step(prof, replace(link, compute_factor=factor), world, "allreduce", config.bucket_cap_mb).seconds

        factor = _solve(predicted, measured)
        pairs.append({"measured_step_seconds": measured, "predicted_step_seconds_at_1": predicted(1.0),
                      "compute_factor": factor})
        say(f"reference run: step measured {measured * 1e3:.1f} ms, profile predicted {predicted(1.0) * 1e3:.1f} ms "
            f"at factor 1: compute factor {factor:.3f}")
    factor = median(pair["compute_factor"] for pair in pairs)
    if len(pairs) > 1:
        say(f"compute factor {factor:.3f}: the median of {len(pairs)} reference runs "
            "(" + ", ".join(f"{pair['compute_factor']:.3f}" for pair in pairs) + ")")
    return replace(profile, compute_factor=factor, reference={
        "model": config.model, "batch_size": config.batch_size, "world_size": world,
        "rate_bits": fastest.rate_bits, "runs": pairs,
        "measured_step_seconds": median(pair["measured_step_seconds"] for pair in pairs),
        "predicted_step_seconds_at_1": median(pair["predicted_step_seconds_at_1"] for pair in pairs)})


def _reference_pair(config: TrainConfig, request: Request, fastest, world: int) -> tuple[float, Profile]:
    """One reference run's measured steady step, and the one-rank profile of its configuration."""
    from distcnn.forecast.sources import measured_step
    from distcnn.launch import run
    from distcnn.record import RunRecord

    folder = Path(tempfile.mkdtemp(prefix="distcnn-reference-"))
    try:
        images = int(world * config.batch_size * REFERENCE_STEPS / (1 - config.val_fraction)) + world
        reference = config.model_copy(update={
            "epochs": REFERENCE_EPOCHS, "train_subset": images, "out": str(folder / "run"), "resume": False,
            "comm_hook": "allreduce", "telemetry": "on",
            "bandwidth": (links.format_rate(fastest.rate_bits) if fastest.rate_bits else "none")
            if config.cluster == "emulated" else None, "delay": None, "name": "reference"})
        run(reference)
        measured = measured_step(RunRecord(folder / "run"))
        prof, _ = get_profile(reference, request, quiet=True, hooks=("allreduce",))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return measured, prof


def _solve(predicted, measured: float) -> float:
    """The factor at which `predicted` (growing with it) equals `measured`, by bisection in [0.25, 4]."""
    low, high = 0.25, 4.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if predicted(middle) < measured else (low, middle)
    return (low + high) / 2


def calibrate_rate(config, request: Request, folder: Path, rate: float | None, latency: float | None,
                   world: int):
    """One --bandwidth of a calibration: allreduce timed over DDP buckets of 4 KiB up to about half a second's
    worth, fitted to α and the effective bandwidth. (what the ranks measured, its Calibrated entry)"""
    from distcnn.forecast.link import Calibrated, fit
    from distcnn.parallel import emulated, torchrun
    from distcnn.record import RunRecord, write_json

    ring = 2 * (world - 1) / world
    # the largest size takes about half a second, and is at least 1 MiB: far above a tbf cap's burst
    budget = (rate / 8 if rate else 2e9) * 0.5 / ring
    max_bytes = int(min(64 * 2**20, max(2**20, budget)))
    emulated_cluster = config.cluster == "emulated"
    run_config = config.model_copy(update={
        "bandwidth": (links.format_rate(rate) if rate else "none") if emulated_cluster else None,
        "delay": request.latency if emulated_cluster else None})
    (folder / "calibration.json").unlink(missing_ok=True)
    RunRecord(folder).write_config(run_config.recorded | {"out": str(folder)})
    write_json(folder / "request.json", {"max_bytes": max_bytes, "repeats": 3})
    say(f"calibrating {links.format_rate(rate)}" + (f" +{request.latency}" if request.latency else "")
        + f": DDP buckets of 4 KiB to {max_bytes / 2**20:.2f} MiB over {world} ranks")
    worker = "distcnn.forecast.calibrate_worker"
    if emulated_cluster:
        emulated.launch_emulated(run_config, folder, worker=worker)
    else:
        torchrun.launch(run_config, folder, worker=worker)
    measured = json.loads((folder / "calibration.json").read_text())
    alpha, effective = fit(measured["points"], world)
    idle_alpha, idle_effective = fit(measured["idle_points"], world)
    burst = 0.0
    if emulated_cluster and rate:  # the shaper the hosts had: its bucket, as tc shows it
        hosts_caps = json.loads((folder / "cluster.json").read_text()).get("hosts") or [{}]
        burst = links.shaper_burst(hosts_caps[0].get("caps", ""))
    share = f", {effective * 8 / rate:.0%} of the rate" if rate else ""
    say(f"  measured: α {alpha * 1e3:.3f} ms, B_eff {effective * 8 / 1e6:,.1f} Mbit/s{share} beside compute; "
        f"α {idle_alpha * 1e3:.3f} ms, B_eff {idle_effective * 8 / 1e6:,.1f} Mbit/s alone; compute slowdown "
        f"{measured['slowdown_s_per_byte'] * 1e9:.3f} ns per byte sent")
    return measured, Calibrated(rate, latency, alpha, effective, measured["slowdown_s_per_byte"], world,
                                measured["points"], measured["powersgd_bucket_s"], burst,
                                measured.get("slowdown_s_per_message", 0.0), idle_alpha, idle_effective,
                                measured["idle_points"], measured["powersgd_bucket_idle_s"])


def calibrate(options: dict, request: Request, out: str) -> links.LinkProfile:
    """Time allreduce on the cluster the options describe, at each --bandwidth (emulated caps), and write the
    fitted link profile to `out`."""
    from distcnn.forecast.link import LinkProfile

    config = make_config(options)
    rates = helpers.parse_rates(request.bandwidth) if config.cluster == "emulated" else [None]
    latency = helpers.parse_latency(request.latency)
    world = config.nproc_per_node * config.nnodes
    if request.reference_runs < 1:
        raise UsageError(f"--reference-runs must be at least 1, got {request.reference_runs}")
    if world < 2:
        raise UsageError("--calibrate times a collective between ranks: give --cluster emulated --nnodes 2 (or "
                         "more), --nnodes N with --rdzv-endpoint for real machines, or --nproc-per-node 2 for "
                         "the ranks of one machine")
    if config.cluster == "emulated":
        from distcnn import cluster

        cluster.ready_hosts(config.nnodes)
    entries, hosts = [], []
    folder = Path(tempfile.mkdtemp(prefix="distcnn-calibrate-"))
    try:
        for rate in rates:
            measured, entry = calibrate_rate(config, request, folder, rate, latency, world)
            entries.append(entry)
            hosts = sorted(set(measured["hosts"]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    entries = refit(entries, world)
    for entry in entries:
        share = f" ({entry.share:.0%} of the rate)" if entry.share else ""
        say(f"{links.format_rate(entry.rate_bits)}: α {entry.alpha_s * 1e3:.3f} ms (from the fastest link), B_eff "
            f"{entry.bytes_per_s * 8 / 1e6:,.1f} Mbit/s{share} beside compute; α {entry.idle_alpha_s * 1e3:.3f} "
            f"ms, B_eff {entry.idle_bytes_per_s * 8 / 1e6:,.1f} Mbit/s alone")
    scope = "inter" if config.nnodes > 1 else "intra"
    kind = "emulated" if config.cluster == "emulated" else "machines"
    profile = LinkProfile(kind, backend_of(config), scope, hosts, entries, out)
    if kind == "emulated" or config.nnodes == 1:
        profile = fit_compute_factor(config, request, profile)
    profile.write(Path(out))
    say(f"link profile: {out} (use it with --link-profile {out})")
    return profile
