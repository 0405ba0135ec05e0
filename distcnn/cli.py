"""The command line: `distcnn train`, `forecast`, `models`, `datasets`, `show`, `study`, `analyze`, `export`, `report`,
`cluster`.

`train`'s flags are generated from TrainConfig's fields, so a new option needs no CLI code. A user mistake
prints one line `distcnn: error: …` and exits 2; nothing below this module imports it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_args, get_origin

from distcnn.config import TrainConfig, flag
from distcnn.errors import RunInterrupted, TrainingDiverged, UsageError, WorkersFailed, nearest


class Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (with the nearest flag) and exits 2, and takes no
    abbreviations: a typo such as `--epoch` must be refused, not run as `--epochs`."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            first = message.split(":", 1)[1].split()[0].split("=")[0]
            message += nearest(first, known_flags(self))
        # a subcommand names itself ("distcnn train: …"); the top parser's name is already the line's prefix
        raise UsageError(message if self.prog == "distcnn" else f"{self.prog}: {message}")


def known_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of a parser and of its subcommands (argparse reports unknown flags from the top parser)."""
    flags = []
    for action in parser._actions:
        flags += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags += known_flags(sub)
    return flags


def _literal_choices(annotation: Any) -> tuple | None:
    if get_origin(annotation) is not None and str(get_origin(annotation)).endswith("Literal"):
        return get_args(annotation)
    return None


def add_config_flags(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (but `leave_out`); unset flags are left out so the config's defaults
    apply."""
    for name, field in TrainConfig.model_fields.items():
        if name in leave_out:
            continue
        default = field.default
        help_text = f"{field.description} (default: {default})" if default not in (None, False) else field.description
        if field.annotation is bool:
            parser.add_argument(flag(name), action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        choices = _literal_choices(field.annotation)
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        parser.add_argument(flag(name), default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def version() -> str:
    """The installed distribution's version; the package's own when it is run from a checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("distcnn")
    except PackageNotFoundError:
        import distcnn

        return getattr(distcnn, "__version__", "unknown")


def build_parser() -> Parser:
    parser = Parser(prog="distcnn", description="Train CNNs with torchrun DDP and account what each choice costs.")
    parser.add_argument("--version", action="version", version=f"distcnn {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    train = commands.add_parser("train", help="train one model (1..N ranks through torchrun)",
                                description="Train one model; --batch-size is per rank.")
    add_config_flags(train)

    from distcnn.cli_forecast import add_forecast_parser

    add_forecast_parser(commands, add_config_flags)
    from distcnn.cli_study import add_study_parser

    for add in (add_models_parser, add_study_parser, add_table_parsers, add_machine_parsers):
        add(commands)
    return parser


def add_models_parser(commands) -> None:
    """distcnn models."""
    models = commands.add_parser("models", help="list models with parameters and training FLOPs per image")
    models.add_argument("--filter", default=None, help="timm name pattern, e.g. 'resnet*' (default: a short list)")
    models.add_argument("--image-size", type=int, default=28)
    models.add_argument("--in-chans", type=int, default=1)
    models.add_argument("--num-classes", type=int, default=10)
    models.add_argument("--width", type=float, default=1.0)
    models.add_argument("--flops", action="store_true",
                        help="with --filter, also count training FLOPs (builds and runs every model: slow)")


def add_table_parsers(commands) -> None:
    """distcnn analyze, export and report: what a study's table says."""
    analyze = commands.add_parser("analyze", help="allocation of variation / ANOVA of a study or a CSV table",
                                  description="Which factor explains how much of each response: 2^k r "
                                              "allocation of variation, or ANOVA for more levels.")
    analyze.add_argument("source", metavar="SOURCE", help="a study directory, or a CSV/Parquet file, one row per run")
    analyze.add_argument("--factors", metavar="A,B",
                         help="comma-separated factor columns (default for a study: its factors)")
    analyze.add_argument("--responses", metavar="X,Y",
                         help="comma-separated numeric response columns (default for a study: its responses)")
    analyze.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the intervals (default: 0.05)")
    analyze.add_argument("--json", action="store_true", help="print the result as JSON, and nothing else")
    export = commands.add_parser("export", help="a study as a CSV/Parquet table; a run or study into MLflow",
                                 description="--csv/--parquet: one row per run of a study, failed and pending "
                                             "ones too: factors, status, seed, time and every summary figure. "
                                             "--mlflow: each finished run as an MLflow run (params, metrics per "
                                             "epoch, artifacts); exporting again doubles nothing.")
    export.add_argument("study_dir", metavar="DIR", help="a study directory (with study.db); for --mlflow also "
                                                         "a run directory")
    export.add_argument("--csv", default=None, metavar="FILE", help="write the table as CSV")
    export.add_argument("--parquet", default=None, metavar="FILE", help="write the table as Parquet (needs pyarrow)")
    export.add_argument("--mlflow", default=None, metavar="URI",
                        help="log into this MLflow tracking store, e.g. sqlite:///mlflow.db (needs the extra: "
                             "pip install 'distcnn[mlflow]')")
    export.add_argument("--experiment", default=None, metavar="NAME",
                        help="with --mlflow: the experiment (default: the study's name; for a run: distcnn)")
    report = commands.add_parser("report", help="write a study's report (report.html and report.md)")
    report.add_argument("study_dir", metavar="STUDY_DIR", help="a study directory (with study.db)")


def add_machine_parsers(commands) -> None:
    """distcnn datasets, cluster and show: what this machine has, and a run's record."""
    commands.add_parser("datasets", help="list the dataset kinds and whether Fashion-MNIST is installed")

    cluster = commands.add_parser("cluster", help="emulated hosts on this machine (network namespaces; root)",
                                  description="Hosts as network namespaces on a LAN at 198.18.0.0/24, with "
                                              "optional caps; then `distcnn train --cluster emulated`.")
    actions = cluster.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    actions.required = True
    cluster_up = actions.add_parser("up", help="bring up N hosts (clearing an earlier cluster)")
    cluster_up.add_argument("--hosts", type=int, default=2, help="number of hosts (default: 2)")
    cluster_up.add_argument("--bandwidth", default=None, help="cap every link, e.g. 100mbit (default: none)")
    cluster_up.add_argument("--delay", default=None, help="one-way delay per link, e.g. 1ms (needs netem)")
    actions.add_parser("status", help="the hosts, their addresses, caps and counters")
    actions.add_parser("down", help="remove every host, link and cap")

    show = commands.add_parser("show", help="print a run's summary and draw its resource time series to a PNG")
    show.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (finished or not)")
    show.add_argument("--png", default=None, metavar="PATH", help="where to draw (default: RUN_DIR/telemetry.png)")
    show.add_argument("--no-plot", action="store_true", help="print the table only")


def command_train(options: dict) -> int:
    from distcnn.launch import config_from, run

    run(config_from(options))
    return 0


def command_models(args: argparse.Namespace) -> int:
    """One line per model as soon as it is measured: a pattern can match dozens of large timm nets."""
    import fnmatch

    from rich.console import Console

    from distcnn.models import LISTED_TIMM_MODELS, OWN_MODELS, describe_each, model_names

    names = list(OWN_MODELS) + list(LISTED_TIMM_MODELS)
    if args.filter:
        names = [name for name in model_names() if fnmatch.fnmatch(name, args.filter)]
        if not names:
            raise UsageError(f"no model matches {args.filter!r}{nearest(args.filter, model_names())}")
    flops = args.flops or not args.filter
    console = Console(markup=False, emoji=False, highlight=False)
    wide = max(len("model"), *map(len, names))
    console.print(f"models at {args.in_chans}×{args.image_size}×{args.image_size}, {args.num_classes} classes"
                  + ("" if flops else " (add --flops for training FLOPs per image)"))
    console.print(f"{'model':<{wide}}  {'source':<7}  {'params':>13}" + ("  train GFLOPs/image" if flops else ""))
    for row in describe_each(names, in_chans=args.in_chans, image_size=args.image_size,
                             num_classes=args.num_classes, width=args.width, flops=flops):
        params = f"{row['params']:,}" if row["params"] is not None else "-"
        line = f"{row['name']:<{wide}}  {row['source']:<7}  {params:>13}"
        value = row["train_flops_per_image"]
        if flops and value is not None:
            line += f"  {value / 1e9:>19.4f}"
        if row["error"]:
            line += f"  {row['error']}"
        console.print(line, soft_wrap=True)
    return 0


def command_cluster(args: argparse.Namespace) -> int:
    from distcnn import cluster

    if args.action == "up":
        members = cluster.up(args.hosts, args.bandwidth, args.delay)
        print(f"{len(members)} hosts up: " + ", ".join(f"{host.name} {host.address}" for host in members)
              + f"; caps: {cluster.caps(members[0])}")
        return 0
    cluster.require_privileges()
    if args.action == "down":
        removed = cluster.down()
        print(f"removed {', '.join(removed)}" if removed else "no emulated cluster was up")
        return 0
    layout = cluster.describe()
    if not layout["hosts"]:
        print("no emulated cluster is up (distcnn cluster up --hosts N)")
        return 0
    print(f"{len(layout['hosts'])} hosts" + (" on a bridge" if layout["switch"] else " on one veth pair"))
    for host in layout["hosts"]:
        print(f"  {host['name']}  {host['address']}  {host.get('state', '?')}  caps: {host['caps']}  "
              f"rx {host.get('rx_bytes', 0):,} B / {host.get('rx_packets', 0):,} pkt  "
              f"tx {host.get('tx_bytes', 0):,} B / {host.get('tx_packets', 0):,} pkt")
    return 0


def command_datasets() -> int:
    from distcnn.data import DATA_KINDS, load_data

    for kind in DATA_KINDS:
        print(kind)
    try:
        load_data("fashion-mnist", val_fraction=0.0, train_subset=None)
        print("Fashion-MNIST: installed")
    except UsageError as error:
        print(f"Fashion-MNIST: {error}")
    return 0


def command_show(args: argparse.Namespace) -> int:
    from distcnn.telemetry.show import show

    show(args.run_dir, png=args.png, plot=not args.no_plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            options = {key: value for key, value in vars(args).items() if key != "command"}
            return command_train(options)
        if args.command == "models":
            return command_models(args)
        if args.command == "forecast":
            from distcnn.cli_forecast import command_forecast

            return command_forecast(args)
        if args.command == "study":
            from distcnn.cli_study import command_study

            return command_study(args)
        if args.command == "analyze":
            from distcnn.study.analysis_command import command_analyze

            return command_analyze(args)
        if args.command == "export":
            from distcnn.study.export import command_export

            return command_export(args)
        if args.command == "report":
            from distcnn.study.report import command_report

            return command_report(args)
        if args.command == "show":
            return command_show(args)
        if args.command == "cluster":
            return command_cluster(args)
        return command_datasets()
    except UsageError as error:
        print(f"distcnn: error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print("distcnn: interrupted", file=sys.stderr)
        return 130
    except WorkersFailed as error:
        print(f"distcnn: error: {error}", file=sys.stderr)
        return error.exit_code if error.exit_code == 2 else 1
    except (RunInterrupted, TrainingDiverged) as error:
        print(f"distcnn: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a file-system condition met outside a run (writing a report, reading a table)
        from distcnn.ownership import filesystem_problem

        print(f"distcnn: error: {filesystem_problem(error, 'file-system error at')}", file=sys.stderr)
        return 1
