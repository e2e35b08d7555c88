"""``docs/RESULTS.md`` from the suite's committed results only (``<root>/*/results/*.json``, read against each
experiment's config), with plots in ``docs/results/``. A run not made yet shows as "not run yet", so the report
can be built at any point of the suite.

Scores are in points: accuracy x 100, BLEU and ROUGE-L as they come (0-100). "mean ± std" is over seeds (sample
standard deviation); a difference between two methods is given with its standard error,
``sqrt(s1^2 / n1 + s2^2 / n2)``, averaged over tasks as ``sqrt(sum se_t^2) / T``.

The hand-written prose (the introduction and the caveats) lives in ``<root>/report_template.md``; its
``{{section}}`` placeholders receive the generated sections.
"""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Optional

from .claims import claims_table
from .experiments import Experiment, Run, load_experiments, plan, summary
from .results import (
    NOT_RUN,
    ExperimentResults,
    Group,
    best_mean,
    collect,
    fmt_score,
    markdown_table,
    mean_std,
    points,
    test_examples,
)
from .run_config import command_line
from .run_files import atomic_write_text
from .tasks import registry

TEMPLATE_NAME = "report_template.md"


# The README beside the experiments folder gets the headline and the claims between these markers (if it has them).
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


METRIC_NAMES = {"accuracy": "accuracy", "bleu": "BLEU", "rougeL": "ROUGE-L"}
ZERO_SHOT_LABEL = "zero-shot (base model)"
SMALL_TEST_SPLIT = 100  # fewer test examples than this: the caption says the task can barely separate methods


KIND_ORDER = ("classification", "multiple_choice", "generation")  # NLU, commonsense, NLG: the papers' order


def _cost_cells(group: Group) -> list[str]:
    if not group.results:
        return ["", ""]
    seconds = statistics.mean(r["train_seconds"] for r in group.results)
    memory = max(r["peak_memory_mib"] for r in group.results)
    cpu = [r["train_cpu_seconds"] for r in group.results if "train_cpu_seconds" in r]
    cpu_cell = f" ({statistics.mean(cpu):.0f} s)" if len(cpu) == len(group.results) else ""  # runs before 0.2: wall
    return [f"{seconds:.0f} s{cpu_cell}", f"{memory:.0f} MiB"]


def matching_rule(experiment: Experiment) -> str:
    """The one rule by which methods are matched on parameters, as the tables state it."""
    r = experiment.base.get("r", 8)
    return (f"Every method at r = {r} (a label such as lora-2r: that multiple of r); at the same r, Dual LoRA holds "
            "LoRA's trainable parameters and D2-LoRA (two branches) LoRA at 2r's: each row names its count.")


def _caption(results: ExperimentResults) -> str:
    exp = results.experiment
    text = f"{summary(exp)}; test scores in points, mean ± std over seeds."
    if exp.kind == "comparison":
        text += " " + matching_rule(exp)
    if results.majority:
        majority, margin = results.majority
        examples = test_examples(results.any_result)
        text += (f" Majority class (test): {majority:.1f}; a method shows learning beyond it above "
                 f"{majority + margin:.1f} (2 standard errors of an accuracy on {examples} test examples).")
        if examples < SMALL_TEST_SPLIT:
            text += (f" **Only {examples} test examples**: one example is {100 / examples:.1f} points, so this task "
                     "can separate methods only by large differences; it is reported, with this caveat, not dropped.")
    return text


def _name(metric: Optional[str]) -> str:
    return METRIC_NAMES.get(metric, metric) if metric else "score"


def _rank_cell(group: Group) -> str:
    if not group.results:
        return ""
    return "–" if group.results[0]["method"] == "full" else str(group.results[0]["config"]["r"])


def group_table(results: ExperimentResults) -> str:
    """A comparison's (method, r, params, chosen lr, scores, n, costs) or an ablation's (variant, overrides, ...)
    table; the best mean of each metric in bold."""
    exp = results.experiment
    metrics = results.metrics or ["score"]
    best = {m: best_mean(results, m) for m in results.metrics}
    lr_column = "lr (chosen)" if exp.lr_grid else "lr"
    first_col = (["method", "r", "trainable params", lr_column] if exp.kind == "comparison"
                 else ["variant", "overrides", "trainable params"])
    header = first_col + [f"test {_name(m)}" for m in metrics] + ["n", "train time: wall (CPU)", "peak memory"]
    rows = []
    for g in results.groups:
        if exp.kind == "comparison":
            lead = [g.label, _rank_cell(g),
                    f"{g.first('trainable_params'):,}" if g.results else "", f"{g.lr:g}" if g.lr else g.note]
        else:
            overrides = ", ".join(f"{k}={v}" for k, v in exp.variants[g.label].items()) or "(base)"
            lead = [g.label, overrides, f"{g.first('trainable_params'):,}" if g.results else ""]
        ranked = bool(g.results) and not g.same_as
        scores = [fmt_score(g.scores(m), bold=ranked and statistics.mean(g.scores(m)) == best.get(m))
                  + (f" (= {g.same_as}: identical runs)" if g.same_as else "") for m in metrics]
        rows.append(lead + scores + [str(len(g.results)) if g.results else "0"] + _cost_cells(g))
    if results.zero_shot is not None and exp.kind == "comparison":
        rows.append([ZERO_SHOT_LABEL, "–", "0", "–"] + [fmt_score([points(results.zero_shot["test"][m], m)])
                                                        for m in metrics] + ["–", "", ""])
    identical = [g for g in results.groups if g.same_as]
    note = ""
    if identical:
        pairs = ", ".join(f"{g.label} = {g.same_as}" for g in identical)
        note = (f"\n\nIdentical runs ({pairs}): loss curve, validation and test scores equal at every seed, bit for "
                "bit. The options these variants change had no effect at all in this setting, so they are not "
                "separate findings and are not ranked.")
    return _caption(results) + note + "\n\n" + markdown_table(header, rows)


def lr_table(results: ExperimentResults) -> str:
    """Validation score of every method at every lr of the grid (first seed); the chosen one in bold."""
    exp = results.experiment
    header = ["method"] + [f"lr {lr:g}" for lr in exp.lr_grid]
    rows = []
    for g in results.groups:
        cells = []
        for lr in exp.lr_grid:
            result = results.finished.get(Run(exp, g.label, lr, exp.seeds[0]).name)
            if result is None:
                cells.append(NOT_RUN)
                continue
            metric = result["primary_metric"]
            text = f"{points(result['validation'][metric], metric):.1f}"
            cells.append(f"**{text}**" if lr == g.lr else text)
        rows.append([g.label] + cells)
    return (f"Validation {_name(results.metric)} at seed {exp.seeds[0]} for each learning rate of the grid; "
            "the chosen one (best, ties to the first listed) in bold.\n\n" + markdown_table(header, rows))


def headline_table(comparisons: list[ExperimentResults]) -> str:
    """Every method on every comparison's task: primary metric, mean ± std over seeds."""
    methods = list(dict.fromkeys(m for c in comparisons for m in c.experiment.methods))
    header = ["method"] + [f"{c.task} ({_name(c.metric)})" for c in comparisons]
    rows = []
    for method in methods:
        cells = []
        for c in comparisons:
            group = c.group(method)
            if method not in c.experiment.methods:
                cells.append("–")
            elif group is None:
                cells.append(next((g.note for g in c.groups if g.label == method), NOT_RUN))
            else:
                scores, seeds = group.scores(c.metric), len(c.experiment.seeds)
                partial = f" ({len(scores)} of {seeds} seeds)" if len(scores) < seeds else ""
                cells.append(fmt_score(scores, bold=statistics.mean(scores) == best_mean(c, c.metric)) + partial)
        rows.append([method] + cells)
    if any(c.zero_shot for c in comparisons):
        rows.append([ZERO_SHOT_LABEL] + [fmt_score([points(c.zero_shot["test"][c.metric], c.metric)])
                                         if c.zero_shot else "–" for c in comparisons])
    return markdown_table(header, rows)


def headline_by_data(comparisons: list[ExperimentResults]) -> str:
    """One headline table per kind of data (the papers' tasks first, then the BIG-bench stand-ins)."""
    from .claims import PAPERS_TASKS, STAND_INS, data_family

    parts = []
    for family in (PAPERS_TASKS, STAND_INS):
        members = [c for c in comparisons if data_family(c) == family]
        if members:
            parts.append(f"**On {family}**\n\n{headline_table(members)}")
    return "\n\n".join(parts)


def per_task_table(results: ExperimentResults) -> str:
    """A mix's test accuracy on each of its tasks and their mean (mean ± std over seeds), with the base model
    unadapted, chance (a uniform guess) and the majority answer of each task below; the best method in bold."""
    tasks = results.per_task
    columns = [f"accuracy/{t}" for t in tasks] + ["accuracy"]
    methods = [g for g in results.groups if g.results and not g.same_as]
    best = {c: max(statistics.mean(g.scores(c)) for g in methods) for c in columns} if methods else {}
    rows = [[g.label] + [fmt_score(g.scores(c), bold=statistics.mean(g.scores(c)) == best[c]) for c in columns]
            for g in methods]
    if results.zero_shot is not None:
        rows.append([ZERO_SHOT_LABEL] + [f"{points(results.zero_shot['test'][c], 'accuracy'):.1f}" for c in columns])
    for name, rates in (results.any_result or {}).get("baselines", {}).items():
        values = [100 * rates[t] for t in tasks]
        rows.append([f"{name} (no model)"] + [f"{v:.1f}" for v in values] + [f"{statistics.mean(values):.1f}"])
    examples = test_examples(results.any_result)
    return (f"Test accuracy per task ({examples} test examples in all, interleaved task by task: about "
            f"{examples // len(tasks)} per task, fewer where a task's test portion is smaller), and the mean over the "
            "tasks, each counted once (the papers' Avg. column). Chance: a uniform guess among each example's "
            "answers; majority: always the most frequent position of the right answer.\n\n"
            + markdown_table(["method"] + tasks + ["mean"], rows))


def budget_table(all_results: list[ExperimentResults]) -> str:
    """What each experiment runs, how far it is, and the time its finished runs took."""
    header = ["experiment", "kind", "model / task", "steps x batch", "training examples seen", "max length",
              "eval examples (cap per split)", "lr", "seeds", "runs finished", "train time (sum)", "wall time (sum)"]
    rows = []
    for res in all_results:
        exp = res.experiment
        runs = plan(exp, res.finished)
        done = [res.finished[run.name] for run in runs if run.name in res.finished]  # the planned ones
        cfg = runs[0].config()
        batch = cfg.batch_size * cfg.grad_accum
        steps = ((f"{cfg.max_steps} x {batch}", f"{cfg.max_steps * batch:,}") if cfg.max_steps else
                 (f"{cfg.epochs} epochs x {batch}", ""))
        lr = ", ".join(f"{g:g}" for g in exp.lr_grid) if exp.kind == "comparison" else f"{cfg.learning_rate:g}"
        walls = [r["suite"]["wall_seconds"] for r in done if r["suite"]["wall_seconds"] is not None]
        wall = f"{sum(walls) / 60:.0f} min" + (f" ({len(walls)} of the runs)" if len(walls) < len(done) else "")
        if res.zero_shot is not None:  # scoring the base model is part of the experiment's time
            wall += f" + {res.zero_shot['suite']['wall_seconds'] / 60:.0f} min zero-shot"
        rows.append([exp.name, exp.kind, res.task, *steps, str(cfg.max_length), str(cfg.max_eval_examples or "all"),
                     lr, ", ".join(map(str, exp.seeds)), f"{len(done)} of {len(runs)}",
                     f"{sum(r['train_seconds'] for r in done) / 60:.0f} min", wall])
    return markdown_table(header, rows)


def _module(layer: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return layer.rsplit(".", 1)[-1]


def _median_range(values: list[int]) -> str:
    return f"{statistics.median(values):.0f} ({min(values)}–{max(values)})" if values else "–"


def rank_table(inspected: list[dict]) -> str:
    """Per run and module type: the numerical rank of dW (and of Dual LoRA's magnitude and direction parts)
    against LoRA's bound and the full rank; median (min–max) over layers."""
    rows = []
    for result in inspected:
        by_module: dict[str, list[dict]] = {}
        for row in result["inspect"]:
            by_module.setdefault(_module(row["layer"]), []).append(row)
        for module, items in by_module.items():
            rows.append([result["suite"]["label"], module, str(len(items)),
                         _median_range([r["rank_dW"] for r in items]),
                         _median_range([r["rank_magnitude"] for r in items if "rank_magnitude" in r]),
                         _median_range([r["rank_direction"] for r in items if "rank_direction" in r]),
                         str(items[0]["lora_bound"]), _median_range([min(r["shape"]) for r in items]),
                         f"{statistics.median(r['relative_norm'] for r in items):.4f}"])
    return markdown_table(["run", "module", "layers", "rank dW", "rank magnitude part", "rank direction part",
                   "LoRA bound r", "full rank", "median norm dW / norm W0"], rows)


def rank_sentence(inspected: list[dict]) -> str:
    """How many layers' dW is full rank, per run, in one line each."""
    lines = []
    for result in inspected:
        rows = result["inspect"]
        full = sum(r["rank_dW"] == min(r["shape"]) for r in rows)
        above = sum(r["rank_dW"] > r["lora_bound"] for r in rows)
        lines.append(f"- {result['suite']['label']} (r={result['config']['r']}): dW is full rank in {full} of "
                     f"{len(rows)} adapted layers and above LoRA's bound r in {above}; median rank "
                     f"{statistics.median(r['rank_dW'] for r in rows):.0f}.")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_values(results: ExperimentResults):
    """The groups with results, the metric, and each group's mean and std over seeds (0 for one seed)."""
    groups = [g for g in results.groups if g.results]
    metric = results.metric
    return (groups, metric, [mean_std(g.scores(metric))[0] for g in groups],
            [mean_std(g.scores(metric))[1] or 0.0 for g in groups])


def plot_comparison(results: ExperimentResults, path: Path) -> bool:
    """Bars of the mean test score per method with the standard deviation over seeds as error bars, the majority
    class as a line and each bar's parameter count; False when nothing is there to plot."""
    groups, metric, means, stds = _bar_values(results)
    if not groups:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.4 * len(groups) + 2, 3.8))
    ax.bar([g.label for g in groups], means, yerr=stds, capsize=6,
           color=["tab:orange" if g.label.startswith(("dual", "d2")) else "tab:gray" for g in groups])
    majority = results.majority[0] if results.majority else None
    zero = points(results.zero_shot["test"][metric], metric) if results.zero_shot else None
    if majority is not None:
        ax.axhline(majority, color="black", linestyle=":", label="majority class")
    if zero is not None:
        ax.axhline(zero, color="tab:blue", linestyle="--", label="zero-shot (base model)")
    if majority is not None or zero is not None:
        ax.legend(loc="lower right")
    low = min([m - s for m, s in zip(means, stds)] + [v for v in (majority, zero) if v is not None])
    ax.set_ylim(max(0.0, low - 0.1 * abs(low)), None)  # zoomed to the scores, the majority line kept in view
    ax.set_ylabel(f"test {_name(metric)} (points)")
    ax.set_title(f"{results.task} ({len(results.experiment.seeds)} seed(s))")
    for i, (g, m) in enumerate(zip(groups, means)):
        ax.annotate(f"{g.first('trainable_params') / 1e3:.0f}k params", (i, m), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 8), textcoords="offset points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ablation(results: ExperimentResults, path: Path) -> bool:
    """Horizontal bars per variant (mean ± std over seeds), with the first variant as a reference line."""
    groups, metric, means, stds = _bar_values(results)
    if not groups:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(groups) + 1.5))
    y = range(len(groups))
    ax.barh(y, means, xerr=stds, capsize=4, color=["lightgray" if g.same_as else "tab:orange" for g in groups],
            alpha=0.8)
    ax.set_yticks(list(y), [f"{g.label} (= {g.same_as})" if g.same_as else g.label for g in groups])
    ax.invert_yaxis()
    ax.axvline(means[0], color="black", linestyle=":", label=f"{groups[0].label}")
    low = min(m - s for m, s in zip(means, stds))
    ax.set_xlim(max(0.0, low - 0.1 * abs(low)), None)
    ax.set_xlabel(f"test {_name(metric)} (points)")
    ax.set_title(f"{results.experiment.name}: {results.task}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _by_module(rows: list[dict]) -> list[dict]:
    """The rows grouped by module type (in order of first appearance), model order kept within a group."""
    order = list(dict.fromkeys(_module(r["layer"]) for r in rows))
    return sorted(rows, key=lambda r: order.index(_module(r["layer"])))


def plot_ranks(inspected: list[dict], path: Path, title: str) -> None:
    """The papers' rank figure: per adapted layer, grouped by module type (so that each group has one shape), the
    rank of dW of each run, Dual LoRA's magnitude and direction parts, LoRA's bound r and the full rank."""
    plt = _pyplot()
    reference = _by_module(inspected[0]["inspect"])
    x = range(len(reference))
    fig, ax = plt.subplots(figsize=(max(7, 0.04 * len(reference) + 5), 4.2))
    for result in inspected:
        rows, label = _by_module(result["inspect"]), result["suite"]["label"]
        ax.plot(x, [r["rank_dW"] for r in rows], "-", linewidth=1.5, label=f"{label}: rank of dW")
        if "rank_magnitude" in rows[0]:
            ax.plot(x, [r["rank_magnitude"] for r in rows], "--", linewidth=1, label=f"{label}: magnitude part")
            ax.plot(x, [r["rank_direction"] for r in rows], ":", linewidth=1, label=f"{label}: direction part")
        else:
            ax.plot(x, [r["lora_bound"] for r in rows], "k-.", linewidth=1, label=f"{label}: its bound r")
    ax.plot(x, [min(r["shape"]) for r in reference], color="gray", linewidth=0.8, label="full rank min(out, in)")
    modules = [_module(r["layer"]) for r in reference]
    starts = [i for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="lightgray", linewidth=0.8)
    ax.set_xticks([s + (e - s - 1) / 2 for s, e in zip(starts, starts[1:] + [len(modules)])],
                  [modules[s] for s in starts], fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("adapted layer: grouped by module, model order within a group")
    ax.set_ylabel("numerical rank")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reproduce_line(res: ExperimentResults) -> str:
    """The command of one of the comparison's runs, to make a row again from a fresh clone: Dual LoRA at its chosen
    learning rate and first seed where it has one, else the first run of the plan."""
    exp = res.experiment
    dual = res.group("dual")
    run = (Run(exp, "dual", dual.lr, exp.seeds[0]) if dual is not None and dual.lr is not None
           else plan(exp, res.finished)[0])
    what = f"{run.label} at lr {run.config().learning_rate:g}, seed {run.seed}"
    return (f"One run from a fresh clone ({what}; every row the same way with its method, lr and seed, or all of them "
            f"with `duallora suite {exp.name}`):\n\n```bash\n{command_line(run.config())}\n```")


def comparison_section(res: ExperimentResults, figures: Path) -> str:
    """A comparison's results table, learning-rate table, bar plot and the command of one of its runs."""
    exp = res.experiment
    parts = [f"### {exp.name}: {res.task}", exp.description, group_table(res),
             per_task_table(res) if res.per_task else "", lr_table(res), reproduce_line(res)]
    if plot_comparison(res, figures / f"{exp.name}.png"):
        parts.append(f"![{exp.name}](results/{exp.name}.png)")
    return "\n\n".join(p for p in parts if p)


def ablation_section(res: ExperimentResults, figures: Path) -> str:
    """An ablation's table and plot."""
    exp = res.experiment
    parts = [f"### {exp.name}: {res.task}", exp.description, group_table(res)]
    if plot_ablation(res, figures / f"{exp.name}.png"):
        parts.append(f"![{exp.name}](results/{exp.name}.png)")
    return "\n\n".join(p for p in parts if p)


def rank_section(res: ExperimentResults, figures: Path) -> str:
    """An inspected experiment's rank summary, table per module type, and rank figure."""
    exp = res.experiment
    inspected = [r for r in res.finished.values() if "inspect" in r]
    head = f"### {exp.name}: {res.task}"
    if not inspected:
        return f"{head}\n\n{NOT_RUN}."
    plot_ranks(inspected, figures / f"{exp.name}-rank.png", f"{exp.name}: {res.task}")
    return "\n\n".join(p for p in [head, exp.description, rank_sentence(inspected), rank_table(inspected),
                                   f"![{exp.name} rank analysis](results/{exp.name}-rank.png)"] if p)


def data_note(all_results: list[ExperimentResults]) -> str:
    """The data each experiment was measured on, where its source can no longer be fetched (BIG-bench's archive is
    gone from the package index): those rows keep their label, and the sentence says how to rerun them."""
    from .catalog import fetchable

    tasks = registry()
    gone: dict[str, list[str]] = {}
    for res in all_results:
        info = tasks.get(res.experiment.base.get("task"))
        if info is not None and info.source is not None and not fetchable(info):
            gone.setdefault(info.source.requirement, []).append(res.experiment.name)
    return "".join(f" Measured on data from `{requirement}` ({', '.join(names)}), which the package index no longer "
                   "serves: the rows keep that label, and rerun with a copy of its archive (docs/data.md)."
                   for requirement, names in gone.items())


def comparisons_of(all_results: list[ExperimentResults]) -> list[ExperimentResults]:
    """The comparisons, in the papers' order of task kinds (NLU, commonsense, NLG)."""
    return sorted((r for r in all_results if r.experiment.kind == "comparison"),
                  key=lambda r: KIND_ORDER.index(r.kind) if r.kind in KIND_ORDER else len(KIND_ORDER))


def sections(all_results: list[ExperimentResults], figures: Path) -> dict[str, str]:
    """The generated text of every template placeholder."""
    comparisons = comparisons_of(all_results)
    ablations = [r for r in all_results if r.experiment.kind == "ablation" and not r.experiment.inspect]
    inspected = [r for r in all_results if r.experiment.inspect]
    done = sum(r.done for r in all_results)
    planned = sum(len(plan(r.experiment, r.finished)) for r in all_results)
    return {
        "status": f"{done} of {planned} runs finished in {len(all_results)} experiments "
                  f"({', '.join(r.experiment.name for r in all_results)})." + data_note(all_results),
        "budget": budget_table(all_results),
        "headline": headline_by_data(comparisons) if comparisons else NOT_RUN,
        "claims": claims_table(comparisons),
        "comparisons": "\n\n".join(comparison_section(r, figures) for r in comparisons) or NOT_RUN,
        "ablations": "\n\n".join(ablation_section(r, figures) for r in ablations) or NOT_RUN,
        "rank_analysis": "\n\n".join(rank_section(r, figures) for r in inspected) or NOT_RUN,
    }


def fill(template: str, values: dict[str, str], where: Path) -> str:
    """Replace every ``{{name}}``; a placeholder without a value, or a value without a placeholder, is an error."""
    used = set(re.findall(r"\{\{(\w+)\}\}", template))
    if used != set(values):
        raise ValueError(f"{where}: its placeholders do not match the generated sections {sorted(values)}: missing "
                         f"{sorted(set(values) - used)}, unknown {sorted(used - set(values))}.")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def readme_summary(status: str, comparisons: list[ExperimentResults], report: str) -> str:
    """The README's short form of the report: status, the headline on the papers' tasks (where there are any) and
    the claims' differences with their verdicts in brief, with a link to the rest."""
    from .claims import PAPERS_TASKS, data_family

    pointer = (f"Status: {status} Built by `duallora suite --report` from the committed results; the stand-ins' "
               f"headline, per-task tables, learning rates, costs, ablations, rank analysis, the verdicts in full and "
               f"caveats: [{report}]({report}).")
    papers = [c for c in comparisons if data_family(c) == PAPERS_TASKS] or comparisons
    parts = [pointer]
    if papers:
        parts.append(headline_by_data(papers))
    return "\n\n".join(parts + [claims_table(comparisons, brief_cells=True)])


def update_readme(readme: Path, summary: str) -> bool:
    """Put ``summary`` between the README's results markers; False (nothing written) if it lacks them."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    atomic_write_text(readme, f"{head}{README_START}\n{summary}\n{README_END}{tail}")
    return True


def build_report(root: Path, docs_dir: Path) -> list[Path]:
    """Write ``docs_dir/RESULTS.md`` and its figures in ``docs_dir/results/`` from ``root``'s experiments, and the
    summary into the README beside ``root`` if it has the results markers. Returns the text files written."""
    root, docs_dir = Path(root), Path(docs_dir)
    template_path = root / TEMPLATE_NAME
    if not template_path.is_file():
        raise FileNotFoundError(f"No report template {template_path}: the report's prose (introduction, caveats) "
                                "lives there, with {{section}} placeholders for the generated parts.")
    figures = docs_dir / "results"
    figures.mkdir(parents=True, exist_ok=True)
    all_results = [collect(e) for e in load_experiments(root)]
    values = sections(all_results, figures)
    text = fill(template_path.read_text(), values, template_path)
    out = docs_dir / "RESULTS.md"
    atomic_write_text(out, text)
    readme = root.resolve().parent / "README.md"
    report_link = Path(os.path.relpath(out.resolve(), readme.parent)).as_posix()
    summary = readme_summary(values["status"], comparisons_of(all_results), report_link)
    return [out] + ([readme] if update_readme(readme, summary) else [])
