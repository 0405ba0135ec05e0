"""The report's tables of the analysis, laid out as the cost study published them: responses as rows, so a
study with many configurations or terms grows sideways only as far as a page holds (document.pieces splits the
rest). Means per configuration (its Table 3), the allocation of variation (its Table 4), each term's F and p,
and the effects; every figure in its response's one unit, a response that barely varies marked grey."""

from __future__ import annotations

import math

from distcnn.study.document import Heading, Table, Text
from distcnn.units import decimals_for
from distcnn.study.report.common import (ALPHA, CONSTANT_CV, Study, configuration_label, constant_marker,
                                         practically_constant, response_label, response_scale)


def _row_name(study: Study, response: str) -> str:
    return response_label(study.table, response) + constant_marker(study.table, response)


def _muted(study: Study, responses: list[str]) -> set[int]:
    return {i for i, response in enumerate(responses) if practically_constant(study.table, response)}


def _constant_note(study: Study, responses: list[str]) -> list:
    constant = [response for response in responses if practically_constant(study.table, response)]
    if not constant:
        return []
    return [Text(f"Grey rows ({', '.join(constant)}): practically constant — their runs vary by less than "
                 f"{100 * CONSTANT_CV:g} % of their mean (coefficient of variation), so their shares and effects "
                 f"describe noise-sized differences; no share of theirs is set in bold.")]


def means_section(study: Study, analysed: dict) -> list:
    """Table 3: the mean of each response (rows) per configuration (columns) ± its CI half-width."""
    runs = study.labels.value_counts()
    responses = list(analysed)
    rows = [["runs", *(str(runs[label]) for label in study.configurations)]]
    for response, entry in analysed.items():
        scale = response_scale(study.table, response)
        by_label = {configuration_label(mean["levels"], study.factors): mean for mean in entry["means"]}
        cells = []
        for label in study.configurations:
            mean = by_label.get(label)
            if mean is None:
                cells.append("n/a")
                continue
            text = scale.text(mean["mean"])
            if mean["ci"]:
                text += f" ± {scale.text((mean['ci'][1] - mean['ci'][0]) / 2)}"
            cells.append(text + (f" (n={mean['n']})" if mean["n"] != runs[label] else ""))
        rows.append([_row_name(study, response), *cells])
    return [Heading("Means per configuration"), Text(
        f"Mean of each response (rows, in the unit after its name) per configuration (columns) ± the half-width "
        f"of its {100 * (1 - ALPHA):g}% confidence interval from its replicates; n when fewer runs than the "
        f"configuration's have a value."), Table(["response (unit)", *study.configurations], rows,
                                                 muted={i + 1 for i in _muted(study, responses)})]


def _terms(analysed: dict) -> list[str]:
    return list(next(iter(analysed.values()))["variation_percent"])


def variation_table(study: Study, analysed: dict) -> list:
    """Table 4: each term's share (%) of each response's variation; the largest in bold unless constant."""
    terms, responses = _terms(analysed), list(analysed)
    rows, bold = [], set()
    for i, (response, entry) in enumerate(analysed.items()):
        shares = entry["variation_percent"]
        rows.append([_row_name(study, response), *(_share(shares.get(term)) for term in terms)])
        present = [value for value in shares.values() if value is not None]
        if present and not practically_constant(study.table, response):
            bold |= {(i, j) for j, term in enumerate(terms, start=1) if shares.get(term) == max(present)}
    return [Table(["response", *(f"{term} (%)" for term in terms)], rows, bold, _muted(study, responses))]


def _share(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _p(value) -> str:
    return "< 0.001" if value < 0.001 else f"= {value:.2g}"


def tests_table(study: Study, analysed: dict) -> list:
    """Each term's F statistic and p-value (statsmodels' ANOVA of the same model), or why there are none."""
    terms = [term for term in _terms(analysed) if term != "error"]
    rows, untested = [], []
    for response, entry in analysed.items():
        f, p = entry.get("f") or {}, entry.get("p") or {}
        if not entry.get("df_residual"):
            untested.append(response)
        rows.append([_row_name(study, response), *(
            f"{f[term]:.3g} (p {_p(p[term])})" if f.get(term) is not None and p.get(term) is not None
            else "n/a" for term in terms)])
    blocks = [Heading("F statistics and p-values", 3), Text(
        "Each term's F statistic (its mean square over the error's) and p-value (the chance of an F at least "
        "this large if the term had no effect), from statsmodels' ANOVA of the model whose sums of squares "
        "give the shares above. Read with the share: with many replicates a tiny effect can be significant."),
        Table(["response", *(f"{term}: F (p)" for term in terms)], rows, muted=_muted(study, list(analysed)))]
    if untested:
        blocks.append(Text(f"F and p unavailable for {', '.join(untested)}: without replicates there are no "
                           f"residual degrees of freedom to test against (n/a, never 0)."))
    return blocks


def _effect_cells(entry: dict, scale) -> dict[str, str]:
    """term -> 'effect [CI]' (2^k r), or 'factor = level' -> 'deviation [CI of the deviation]' (ANOVA)."""
    cells, ci = {}, entry["ci"] or {}
    deviation_ci = entry.get("effect_ci") or {}
    sizes = sorted(abs(v) for effect in entry["effects"].values()
                   for v in (effect.values() if isinstance(effect, dict) else [effect]) if v)
    typical = sizes[len(sizes) // 2] / scale.divisor if sizes else 0.0
    # as many places as the means, more (at most 2) for effects much smaller than them
    decimals = min(max(scale.decimals, decimals_for(typical, 2)), scale.decimals + 2)

    def interval(pair) -> str:
        return f" [{scale.text(pair[0], decimals)}, {scale.text(pair[1], decimals)}]" if pair else ""

    for term, effect in entry["effects"].items():
        if isinstance(effect, dict):
            cells |= {f"{term} = {level}": f"{value / scale.divisor:+,.{decimals}f}" +
                      interval((deviation_ci.get(term) or {}).get(level)) for level, value in effect.items()}
        else:
            cells[term] = scale.text(effect, decimals) + interval(ci.get(term))
    return cells


def effects_table(study: Study, analysed: dict) -> list:
    cells = {response: _effect_cells(entry, response_scale(study.table, response))
             for response, entry in analysed.items()}
    names = list(dict.fromkeys(name for column in cells.values() for name in column))
    two_level = all(entry["design"] == "2k" for entry in analysed.values())
    return [Heading("Effects", 3), Text(
        f"2^k r effects q (in each response's unit): half the change of the response from the first level to "
        f"the second, with the {100 * (1 - ALPHA):g}% confidence interval; an interval that contains 0 is no "
        f"evidence of an effect." if two_level else
        f"Effects (in each response's unit): each level's mean minus the grand mean (ANOVA, sum-to-zero), with "
        f"the {100 * (1 - ALPHA):g}% confidence interval of that same deviation."),
        Table(["response", *names], [[_row_name(study, r), *(cells[r].get(name, "") for name in names)]
                                     for r in analysed], muted=_muted(study, list(analysed)))]


def variation_section(study: Study, analysed: dict, skipped: list[str]) -> list:
    blocks = [Heading("Allocation of variation"), Text(
        "Share of the total variation (sum of squares) of each response (rows) that each factor and interaction "
        "(columns) explains, in %; error is the variation between replicates that no factor explains. The "
        "largest share of each response is in bold.")]
    blocks += [Text(line) for line in skipped]
    if not analysed:
        return blocks + [Text("No response could be analysed.")]
    blocks += variation_table(study, analysed)
    blocks += _constant_note(study, list(analysed))
    if any(entry["variation_percent"].get("error") is None for entry in analysed.values()):
        blocks.append(Text("Without replicates there is no error term: the highest interaction also holds the "
                           "noise, and there are no confidence intervals."))
    notes = {entry["note"] for entry in analysed.values() if entry.get("note")}
    blocks += [Text(f"Note: {note}") for note in sorted(notes)]
    blocks += [Text(f"{response}: every run measured the same value; there is no variation to allocate.")
               for response, entry in analysed.items() if all(v is None for v in entry["variation_percent"].values())]
    return blocks + tests_table(study, analysed) + effects_table(study, analysed)
