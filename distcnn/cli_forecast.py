"""`distcnn forecast`'s flags and its dispatch: the command line only (distcnn.cli builds the parser with it);
the forecast itself is distcnn.forecast."""

from __future__ import annotations

import argparse

from distcnn.errors import UsageError

FORECAST_OWN = ("nodes", "bandwidth", "latency", "ranks_per_node", "price_per_node_hour", "comm_hooks",
                "link_profile", "intra_profile", "from_run", "check", "calibrate", "json", "plot", "profile_seconds",
                "reference_runs")


def add_forecast_parser(commands, add_config_flags) -> None:
    forecast = commands.add_parser(
        "forecast", help="what a configuration will cost on N nodes over a given link, before running it",
        description="Profile the configuration on one rank here (or take a finished one-rank run, --from), then "
                    "forecast step time, images/s, scaling, exposed communication, bytes on the wire, epoch and "
                    "training time, node-hours and cost for every nodes × bandwidth × comm hook. --calibrate "
                    "measures a cluster's link; --check compares a finished multi-rank run with the forecast.")
    add_config_flags(forecast, leave_out=("bandwidth", "delay"))
    own = forecast.add_argument_group("forecast")
    own.add_argument("--nodes", default="1,2,4,8,16", help="node counts, e.g. 1,2,4,8,16 (default)")
    own.add_argument("--bandwidth", default="100mbit,1gbit,10gbit",
                     help="link rates between nodes, e.g. 100mbit,1gbit,10gbit (default); none: uncapped (needs a "
                          "link profile); with --calibrate on the emulated cluster: the caps to measure at")
    own.add_argument("--latency", default=None, help="one-way delay per link, e.g. 0.1ms (default: none)")
    own.add_argument("--ranks-per-node", type=int, default=1, help="ranks on each node (default: 1)")
    own.add_argument("--price-per-node-hour", type=float, default=None, help="price of a node-hour, for a cost column")
    own.add_argument("--comm-hooks", default=None, metavar="LIST",
                     help="hooks to forecast, e.g. allreduce,fp16 (default: --comm-hook if given, else all four)")
    own.add_argument("--link-profile", default=None, metavar="FILE",
                     help="the link between nodes as --calibrate measured it (with --calibrate: where to write it, "
                          "default link-profile.json)")
    own.add_argument("--intra-profile", default=None, metavar="FILE",
                     help="the link between the ranks of one node, calibrated with --nproc-per-node 2")
    own.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR",
                     help="forecast from this finished one-rank run instead of profiling")
    own.add_argument("--check", default=None, metavar="RUN_DIR",
                     help="compare this finished multi-rank run with what the model predicts for it")
    own.add_argument("--calibrate", action="store_true",
                     help="measure allreduce on this cluster (--cluster emulated --nnodes N, or real machines) "
                          "and write a link profile")
    own.add_argument("--profile-seconds", type=float, default=None, metavar="S",
                     help="how long to time the profile's steps (default 12; shorter: sooner, noisier)")
    own.add_argument("--reference-runs", type=int, default=3, metavar="N",
                     help="with --calibrate: reference runs the compute factor is the median of (default 3; "
                          "each trains 4 short epochs and profiles them)")
    own.add_argument("--json", action="store_true", help="print the rows as JSON, and nothing else")
    own.add_argument("--plot", default=None, metavar="PNG", help="where to draw images/s against nodes "
                                                                 "(default: runs/forecast.png)")


def command_forecast(args: argparse.Namespace) -> int:
    from distcnn.forecast.commands import Request, calibrate, check, run_forecast

    given = vars(args)
    options = {key: value for key, value in given.items() if key != "command" and key not in FORECAST_OWN}
    request = Request(nodes=args.nodes, bandwidth=args.bandwidth, latency=args.latency,
                      ranks_per_node=args.ranks_per_node, price_per_node_hour=args.price_per_node_hour,
                      hooks=args.comm_hooks, link_profile=args.link_profile, intra_profile=args.intra_profile,
                      from_run=args.from_run, json=args.json, plot=args.plot,
                      profile_seconds=args.profile_seconds, reference_runs=args.reference_runs)
    if sum(bool(x) for x in (args.calibrate, args.check, args.from_run and args.check)) > 1 or (
            args.calibrate and args.from_run):
        raise UsageError("--calibrate, --check and --from: give --calibrate alone, or --check RUN_DIR (with "
                         "--from ONE_RANK_RUN at most), or --from RUN_DIR")
    if args.calibrate:
        request.link_profile = None
        calibrate(options, request, args.link_profile or "link-profile.json")
    elif args.check:
        check(options, request, args.check)
    else:
        run_forecast(options, request)
    return 0


