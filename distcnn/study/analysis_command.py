"""Where `distcnn analyze` and the API's `analyze()` meet the analysis (distcnn.study.analysis): the source
read as a table (a study directory, a CSV or a Parquet file), the factors and responses it is asked for
checked, and the result printed as tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from distcnn.errors import UsageError
from distcnn.study.analysis import check_request, analyse_responses, analyze

FILE_KINDS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def load_source(source: str | Path) -> tuple[pd.DataFrame, dict[str, list]]:
    """The runs as a table, and each factor's level order where the source records one ({} for a file: the
    order of first appearance, which `analyze` takes by default)."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{path} does not exist; give a study directory or a {', '.join(FILE_KINDS)} file")
    if path.is_dir():
        if not (path / "study.db").exists():
            raise UsageError(f"not a study directory: no study.db in {path}")
        from distcnn.study.store import load_runs_table

        rows, level_order = load_runs_table(path)
        table = pd.DataFrame(rows)
    else:
        table, level_order = _read_file(path), {}
    if table.empty:
        raise UsageError(f"no runs to analyse in {path}")
    return table, level_order


def _read_file(path: Path) -> pd.DataFrame:
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"cannot read {path}: allowed are a study directory or a {', '.join(FILE_KINDS)} file")
    try:
        return pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except ImportError:
        raise UsageError("reading Parquet needs pyarrow (pip install pyarrow); or give a CSV") from None
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"cannot read {path}: {first_line}") from None


def split_names(text: str, flag_name: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"{flag_name} needs at least one column name, e.g. {flag_name} A,B")
    return names


def _requested(args: argparse.Namespace, level_order: dict) -> tuple[list[str], list[str] | None]:
    """The factors and responses named on the command line; for a study directory what is left out is the
    study's own (responses None: every response the study declares, each analysed where it has numbers)."""
    require_names(Path(args.source).is_dir(), args.factors, args.responses)
    factors = split_names(args.factors, "--factors") if args.factors is not None else list(level_order)
    responses = split_names(args.responses, "--responses") if args.responses is not None else None
    return factors, responses


def require_names(study: bool, factors, responses, called=("--factors", "--responses")) -> None:
    """A table (CSV, Parquet, a DataFrame) names no factors or responses of its own: both must be given; a study
    directory supplies whatever is left out. `called`: what the door calls the two (flags, or arguments)."""
    if not study and (factors is None or responses is None):
        missing = " and ".join(name for name, value in zip(called, (factors, responses)) if value is None)
        raise UsageError(f"analyzing a table needs {missing} (only a study directory supplies them)")


def study_responses(study_dir: str | Path) -> list[str]:
    from distcnn.study.store import open_study

    store = open_study(study_dir)
    try:
        return list(store.spec().get("responses", []))
    finally:
        store.close()


def _study_analysis(table, factors, responses, level_order, alpha) -> tuple[dict, dict[str, str]]:
    """A study's own responses, as `analyze` reports them, leaving out (with the reason) those without numbers
    to analyse: a GPU figure on a CPU must not take the others with it."""
    present = [name for name in responses if name in table]
    if present:  # a mistyped --factors or --alpha is the user's one line, not a reason per response
        check_request(table, factors, present, alpha)
    analyses = analyse_responses(table, factors, responses, level_order, alpha)
    skipped = {name: f"{found} runs have a number; need at least 2" for name, found in analyses.missing.items()}
    skipped |= analyses.failed
    if not analyses.results:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped.items()) or "the study has no responses"
        raise UsageError(f"no response of the study can be analysed ({reasons})")
    first = next(iter(analyses.results.values()))  # the design is the table's, the same for every response
    result = {key: value for key, value in first.items() if key != "responses"}
    result["responses"] = {name: analyses.results[name]["responses"][name]
                           for name in responses if name in analyses.results}
    return result, skipped


def command_analyze(args: argparse.Namespace) -> int:
    table, level_order = load_source(args.source)
    factors, responses = _requested(args, level_order)
    skipped: dict[str, str] = {}
    if responses is None:
        result, skipped = _study_analysis(table, factors, study_responses(args.source), level_order, args.alpha)
    else:
        result = analyze(table, factors, responses, level_order, args.alpha)
    if args.json:
        print(json.dumps(result | ({"skipped": skipped} if skipped else {})))
        return 0
    print_result(result, args.alpha)
    for name, reason in skipped.items():
        print(f"no analysis of {name}: {reason}")
    return 0


def _fmt(value, spec: str = ".4g") -> str:
    """A number, an interval [low, high], or n/a for a figure that does not exist (no error term)."""
    if isinstance(value, list):
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return "n/a" if value is None else format(value, spec)


def _share_rows(entry: dict, design: str):
    """(term, %, F, p, effect, CI) rows: one per effect for 2^k r; for ANOVA one per term, then one per level,
    its effect (a deviation from the grand mean) with the interval of that same deviation."""
    effects, f, p = entry["effects"], entry.get("f") or {}, entry.get("p") or {}
    ci = (entry["ci"] or {}) if design == "2k" else (entry.get("effect_ci") or {})
    mean_ci_ = (entry["ci"] or {}).get("mean")
    yield "mean", "", "", "", _fmt(effects["mean"]), _fmt(mean_ci_) if mean_ci_ else ""
    for term, share in entry["variation_percent"].items():
        tested = ("", "") if term == "error" else (_fmt(f.get(term), ".4g"), _fmt(p.get(term), ".2g"))
        effect = effects.get(term)
        if design == "2k":
            yield term, _fmt(share, ".2f"), *tested, _fmt(effect) if term in effects else "", \
                _fmt(ci[term]) if term in ci else ""
            continue
        yield term, _fmt(share, ".2f"), *tested, "", ""
        for level, value in (effect or {}).items():
            yield f"  {term} = {level}", "", "", "", _fmt(value), _fmt(ci[term][level]) if term in ci else ""


def print_result(result: dict, alpha: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, emoji=False, highlight=False)  # levels and terms print as they are
    confidence, factors = f"{100 * (1 - alpha):g}%", result["factors"]
    for response, entry in result["responses"].items():
        design = entry.get("design", result["design"])
        replicates = entry.get("replicates", result["replicates"])
        note = entry.get("note", result.get("note"))
        means = Table(title=f"{response}: mean per configuration")
        for name in factors:
            means.add_column(name)
        means.add_column("n", justify="right")
        means.add_column(f"mean ± {confidence} CI half-width", justify="right")
        for row in entry["means"]:
            half = f" ± {_fmt((row['ci'][1] - row['ci'][0]) / 2)}" if row["ci"] else ""
            means.add_row(*(str(row["levels"][name]) for name in factors), str(row["n"]), _fmt(row["mean"]) + half)
        console.print(means)
        title = "2^k r" if design == "2k" else "ANOVA"
        captions = ([] if design == "2k" else ["effect: level mean - grand mean; CI: of that deviation"]) + \
            (["F, p: n/a without replicates (no residual degrees of freedom)"] if not entry.get("df_residual") else [])
        shares = Table(title=f"{response}: allocation of variation ({title}, replicates: {_fmt(replicates, 'd')})",
                       caption="\n".join(line for line in [*captions, note or ""] if line) or None)
        for column in ("term", "variation %", "F", "p", "effect", f"{confidence} CI of the effect"):
            shares.add_column(column, justify="left" if column == "term" else "right")
        for row in _share_rows(entry, design):
            shares.add_row(*row)
        console.print(shares)
