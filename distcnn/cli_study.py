"""`distcnn study`'s flags and its command: the command line only (distcnn.cli builds the parser with it); the
study itself is distcnn.study (its one front door: distcnn.study.runner.run_study)."""

from __future__ import annotations

import argparse

from distcnn.errors import UsageError


def add_study_parser(commands) -> None:
    """distcnn study, with its executors' options."""
    study = commands.add_parser("study", help="run a factorial study (without FILE: the built-in cost study)",
                                description="Run every configuration × replicate of a study file; run it "
                                            "again to resume. Without FILE: the built-in cost study.")
    study.add_argument("file", nargs="?", default=None, metavar="FILE.toml")
    study.add_argument("--out", default=None, help="study directory (default: runs/study-<name>)")
    study.add_argument("--retries", type=int, default=1, help="re-runs of a failed run (default: 1)")
    study.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    study.add_argument("--status", action="store_true",
                       help="show each run's state (and Slurm job id) and exit; runs nothing")
    study.add_argument("--forecast", action="store_true",
                       help="first forecast each configuration's cost (a short profile each), kept for the report "
                            "to set beside what the runs measure; then run the study")
    study.add_argument("--forecast-only", action="store_true", help="forecast, and run nothing")
    study.add_argument("--link-profile", default=None, metavar="FILE",
                       help="with --forecast: the link between nodes as distcnn forecast --calibrate measured it")
    study.add_argument("--intra-profile", default=None, metavar="FILE",
                       help="with --forecast: the link between the ranks of one machine (calibrated there)")
    study.add_argument("--profile-seconds", type=float, default=None, metavar="S",
                       help="with --forecast: seconds each configuration's profile times (default 3; shorter is "
                            "sooner and noisier)")
    study.add_argument("--executor", choices=("local", "slurm"), default=None,
                       help="local: runs on this machine (default); slurm: each run a Slurm job via submitit "
                            "(overrides [study] executor)")
    study.add_argument("--parallel", type=int, default=None, metavar="N",
                       help="local: N runs at once, on disjoint GPUs or cores (default 1)")
    slurm = study.add_argument_group("Slurm (--executor slurm; override the study file's [slurm] table)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default=None, help="time limit per run: minutes or HH:MM:SS (default 60 min)")
    slurm.add_argument("--gpus-per-node", type=int, default=None)
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node (one task per node)")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--sbatch", action="append", default=[], metavar="OPTION=VALUE",
                       help="any other sbatch option, e.g. --sbatch qos=high (repeatable)")


def command_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distcnn.forecast import check_profile_seconds
    from distcnn.study.runner import run_study
    from distcnn.study.spec import load_spec

    if args.parallel is not None and args.parallel < 1:
        raise UsageError(f"--parallel must be 1 or more, got {args.parallel}")
    check_profile_seconds(args.profile_seconds)
    spec = load_spec(args.file, execution_options(args))
    out = Path(args.out or f"runs/study-{spec.name}")
    if args.status:
        from distcnn.study.runner import status_lines

        print("\n".join(status_lines(out)))
        return 0

    def forecast_first(spec, out) -> bool:
        from distcnn.study.forecast import PROFILE_SECONDS, forecast_study

        forecast_study(spec, out, args.link_profile, args.intra_profile, args.profile_seconds or PROFILE_SECONDS)
        return args.forecast_only

    runs = run_study(spec, out, args.retries, forecast_first if args.forecast or args.forecast_only else None)
    if runs is None:  # --forecast-only
        return 0
    done = sum(run["status"] == "done" for run in runs)
    failed = [run for run in runs if run["status"] == "failed"]
    print(f"study {spec.name}: {done}/{len(runs)} runs done" + (f", {len(failed)} failed" if failed else "")
          + f" — {out / 'study.db'}")
    for run in failed:
        print(f"  failed {run['run_id']}: {run['error']}")
    if done >= 2:
        print_study_analysis(out, spec)
    if not args.no_report and done:
        from distcnn.study.report import write_report

        html, _ = write_report(out)
        print(f"report: {html}")
    return 0 if not failed else 1


def execution_options(args: argparse.Namespace) -> dict:
    """What the study's flags set over its file's [study] executor/parallel and [slurm] table."""
    slurm = {name: value for name in ("partition", "time", "gpus_per_node", "cpus_per_task", "account")
             if (value := getattr(args, name)) is not None}
    extra = {}
    for option in args.sbatch:
        name, equals, value = option.partition("=")
        if not equals or not name:
            raise UsageError(f"--sbatch {option!r}: give OPTION=VALUE, e.g. --sbatch qos=high")
        extra[name.removeprefix("--")] = value
    if extra:
        slurm["sbatch"] = extra
    return {"executor": args.executor, "parallel": args.parallel, "slurm": slurm}


def print_study_analysis(out, spec) -> None:
    """The allocation of variation of every response that has figures (a GPU figure on a CPU has none)."""
    from distcnn.study.analysis import analyse_responses
    from distcnn.study.analysis_command import load_source, print_result
    from distcnn.study.store import option_name

    table, order = load_source(out)
    analyses = analyse_responses(table, [option_name(name) for name in spec.factors], spec.responses, order)
    for result in analyses.results.values():
        print_result(result, 0.05)
    reasons = analyses.failed
    if not analyses.results and len(set(reasons.values())) == 1:
        print(f"no analysis: {next(iter(reasons.values()))}")
    else:
        for response, reason in reasons.items():
            print(f"no analysis of {response}: {reason}")
