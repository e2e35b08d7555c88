"""Running a suite of experiments: every ``<root>/<name>/config.yaml``, each run in its own process, and each
finished run's results kept as ``<root>/<name>/results/<run>.json`` (the file that is committed; never edit it).

An experiment is one of two kinds:

- a **comparison** (``methods`` + ``lr_grid`` + ``seeds``): each method runs every learning rate of the grid at
  the first seed; the learning rate with the best validation score (the task's primary metric) is then run at the
  remaining seeds. A method may carry a rank multiplier: ``lora-2r`` is LoRA at twice the base ``r`` (and, when
  the base sets ``alpha``, twice the alpha, so that ``alpha / r`` stays the same).
- an **ablation** (``variants`` + ``seeds``): named overrides of the base run options, each run at every seed.

Either may set ``inspect: true``: each run at the first seed (full fine-tuning excepted: it has no adapter) then
also gets the rank analysis of :mod:`duallora.inspect`, stored in its results file.

A run whose results file exists is skipped, wherever it was made. A run's heavy outputs (adapter, checkpoints)
go to ``<runs_dir>/<name>/<run>/``; an interrupted run resumes from its last checkpoint there.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from .compare import run_in_child
from .train import METHODS, RunConfig, adapter_config, atomic_write_text

CONFIG_NAME = "config.yaml"
TOP_LEVEL_KEYS = ("description", "base", "methods", "lr_grid", "seeds", "variants", "inspect")
SET_PER_RUN = ("output_dir", "seed")  # the suite sets these for every run
SET_PER_COMPARISON_RUN = ("method", "lr")  # and, in a comparison, these
METHOD_VARIANT = re.compile(r"^(?P<method>[a-z0-9]+?)(?:-(?P<factor>\d+)r)?$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LOSS_CURVE_POINTS = 100
DEFAULT_RUNS_DIR = Path("runs/experiments")


class RunFailed(RuntimeError):
    """A run's child process failed; finished runs are kept."""


@dataclass(frozen=True)
class Experiment:
    """One ``config.yaml``: the base run options and either a comparison or an ablation."""

    name: str
    directory: Path
    base: dict
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = ()  # comparison: method variants such as "lora" or "lora-2r"
    lr_grid: tuple[float, ...] = ()
    variants: dict = field(default_factory=dict)  # ablation: variant name -> run option overrides
    inspect: bool = False
    description: str = ""

    @property
    def kind(self) -> str:
        return "comparison" if self.methods else "ablation"

    @property
    def results_dir(self) -> Path:
        return self.directory / "results"

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME

    def options(self, label: str, lr: Optional[float], seed: int) -> dict:
        """The run options of one run (without ``output_dir``)."""
        if self.kind == "ablation":
            return {**self.base, **self.variants[label], "seed": seed}
        method, factor = parse_method(label)
        r = self.base.get("r", RunConfig.r) * factor
        alpha = self.base.get("alpha")
        return {**self.base, "method": method, "r": r, "alpha": None if alpha is None else alpha * factor, "lr": lr,
                "seed": seed}


@dataclass(frozen=True)
class Run:
    """One planned run of an experiment. ``lr`` is a comparison's learning rate (None for its later seeds until the
    grid is done); an ablation's runs take theirs from the run options, and have None here."""

    experiment: Experiment
    label: str  # the method variant (comparison) or the variant name (ablation)
    lr: Optional[float]
    seed: int

    @property
    def name(self) -> str:
        if self.experiment.kind == "ablation":
            return f"{self.label}-seed{self.seed}"
        return f"{self.label}-lr{'?' if self.lr is None else format(self.lr, 'g')}-seed{self.seed}"

    @property
    def ready(self) -> bool:
        return self.experiment.kind == "ablation" or self.lr is not None

    @property
    def results_path(self) -> Path:
        return self.experiment.results_dir / f"{self.name}.json"

    def config(self, runs_dir: Path = DEFAULT_RUNS_DIR) -> RunConfig:
        output_dir = Path(runs_dir) / self.experiment.name / self.name
        return RunConfig.from_dict({**self.experiment.options(self.label, self.lr, self.seed),
                                    "output_dir": str(output_dir)})


# ----------------------------------------------------------------------------------------------- reading configs
def parse_method(label: str) -> tuple[str, int]:
    """``"lora-2r"`` -> ``("lora", 2)``; ``"dual"`` -> ``("dual", 1)``."""
    match = METHOD_VARIANT.match(label)
    if not match or match["method"] not in METHODS or (match["factor"] and match["method"] == "full"):
        raise ValueError(f"Unknown method {label!r}; valid: {list(METHODS)}, an adapter method may carry a rank "
                         "multiplier such as 'lora-2r' (LoRA at twice the base r).")
    return match["method"], int(match["factor"] or 1)


def _number_fields() -> dict[str, type]:
    """RunConfig fields that hold numbers, with their type."""
    kinds = {}
    for f in fields(RunConfig):
        annotation = str(f.type)
        if "float" in annotation or "int" in annotation:
            kinds[f.name] = float if "float" in annotation else int
    return kinds


def _typed(options: dict) -> dict:
    """Run options with numbers that YAML read as strings converted (YAML 1.1 reads ``1e-3`` as a string)."""
    kinds = _number_fields()
    return {k: _as_number(v, kinds[k]) if isinstance(v, str) and k in kinds else v for k, v in options.items()}


def _as_number(text: str, kind: type):
    """``"1e-3"`` -> 0.001; a string that is no number stays as it is (``init_std: fan_in``)."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if kind is int and value.is_integer() else value


def _learning_rates(values, where: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: lr_grid is empty or not a list; list at least one learning rate, e.g. "
                         "lr_grid: [1.0e-4, 3.0e-4, 1.0e-3].")
    try:
        grid = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: lr_grid must hold numbers; got {values}.") from None
    if any(lr <= 0 for lr in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"{where}: lr_grid must hold distinct positive numbers; got {values}.")
    return grid


def _seeds(values, where: str) -> tuple[int, ...]:
    if (not isinstance(values, list) or not values or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                   for s in values) or len(set(values)) != len(values)):
        raise ValueError(f"{where}: seeds must be a non-empty list of distinct integers, e.g. seeds: [0, 1, 2]; "
                         f"got {values!r}.")
    return tuple(values)


def _mapping(value, what: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {what} must be a mapping of run options; got {value!r}.")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _check_not_set(options: dict, names: tuple[str, ...], what: str, where: str) -> None:
    given = sorted(set(options) & set(names))
    if given:
        raise ValueError(f"{where}: {what} sets {given}, which the suite sets for every run; remove them.")


def load_experiment(directory: Path) -> Experiment:
    """Read and check one experiment; every run's options are validated here, before anything runs."""
    import yaml

    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: every folder of the experiments root is an "
                                "experiment and holds its config.")
    raw = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must hold a mapping with the keys {list(TOP_LEVEL_KEYS)}.")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {list(TOP_LEVEL_KEYS)}.")
    if ("methods" in raw) == ("variants" in raw):
        raise ValueError(f"{where}: give either `methods` and `lr_grid` (a comparison) or `variants` (an ablation).")
    base = _typed(_mapping(raw.get("base"), "base", where))
    _check_not_set(base, SET_PER_RUN, "base", where)
    if not isinstance(raw.get("inspect", False), bool):
        raise ValueError(f"{where}: inspect must be true or false; got {raw['inspect']!r}.")
    common = dict(name=directory.name, directory=directory, base=base, seeds=_seeds(raw.get("seeds"), where),
                  inspect=raw.get("inspect", False), description=str(raw.get("description", "")).strip())
    if "methods" in raw:
        _check_not_set(base, SET_PER_COMPARISON_RUN, "base", where)
        methods = raw["methods"]
        if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods):
            raise ValueError(f"{where}: methods must be a non-empty list of distinct names, e.g. "
                             f"methods: [lora, lora-2r, dual]; got {methods!r}.")
        experiment = Experiment(**common, methods=tuple(str(m) for m in methods),
                                lr_grid=_learning_rates(raw.get("lr_grid"), where))
    else:
        if "lr_grid" in raw:
            raise ValueError(f"{where}: lr_grid belongs to a comparison; an ablation sets `lr` in base.")
        variants = raw["variants"]
        if not isinstance(variants, dict) or not variants:
            raise ValueError(f"{where}: variants must be a non-empty mapping of names to run option overrides.")
        bad = [str(name) for name in variants if not SAFE_NAME.match(str(name))]
        if bad:
            raise ValueError(f"{where}: variant names {bad} must be letters, digits, '.', '_' or '-' (they name "
                             "files).")
        parsed = {str(name): _typed(_mapping(v, f"variant {name!r}", where)) for name, v in variants.items()}
        for name, overrides in parsed.items():
            _check_not_set(overrides, SET_PER_RUN, f"variant {name!r}", where)
        experiment = Experiment(**common, variants=parsed)
    _validate_runs(experiment)
    return experiment


def _validate_runs(experiment: Experiment) -> None:
    """Build each method's or variant's run configuration once, so that a bad option fails now, not hours into
    the suite."""
    for label in experiment.methods or tuple(experiment.variants):
        lr = experiment.lr_grid[0] if experiment.kind == "comparison" else None
        try:
            cfg = Run(experiment, label, lr, experiment.seeds[0]).config()
            cfg.validate()
            adapter_config(cfg, "classification")  # the adapter configs check their own options
        except (ValueError, TypeError) as err:
            raise ValueError(f"{experiment.config_path}: {label}: {err}") from None


def load_experiments(root: Path, names: Optional[list[str]] = None) -> list[Experiment]:
    """The experiments under ``root`` (every folder not starting with '.' or '_'), in name order, or those named."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"No experiments root {root}; pass --root with the folder that holds the experiments.")
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    unknown = [n for n in names or [] if n not in available]
    if unknown:
        raise ValueError(f"No experiment named {unknown} in {root}; available: {available}.")
    return [load_experiment(root / name) for name in (names or available)]


# ------------------------------------------------------------------------------------- results and the run plan
def read_results(experiment: Experiment) -> dict[str, dict]:
    """Finished runs of an experiment: run name -> its results file's content."""
    if not experiment.results_dir.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(experiment.results_dir.glob("*.json"))}


def config_differences(saved: dict, cfg: RunConfig) -> list[str]:
    """Options where a saved run config differs from ``cfg`` (the output directory aside; options the saved
    config does not know yet count as equal)."""
    return [f"{k}: {saved[k]!r} there, {v!r} now" for k, v in asdict(cfg).items()
            if k != "output_dir" and k in saved and saved[k] != v]


def chosen_lr(experiment: Experiment, label: str, finished: dict[str, dict]) -> Optional[float]:
    """The grid's learning rate with the best validation score at the first seed (a tie goes to the one listed
    first), or None while any of those grid runs is unfinished."""
    scores = []
    for lr in experiment.lr_grid:
        result = finished.get(Run(experiment, label, lr, experiment.seeds[0]).name)
        if result is None:
            return None
        scores.append(result["validation"][result["primary_metric"]])
    return experiment.lr_grid[scores.index(max(scores))]


def plan(experiment: Experiment, finished: dict[str, dict]) -> list[Run]:
    """Every run of the experiment, in the order they run (a comparison: all grids first, then the later seeds)."""
    if experiment.kind == "ablation":
        return [Run(experiment, v, None, s) for v in experiment.variants for s in experiment.seeds]
    first, later = experiment.seeds[0], experiment.seeds[1:]
    grid = [Run(experiment, m, lr, first) for m in experiment.methods for lr in experiment.lr_grid]
    return grid + [Run(experiment, m, chosen_lr(experiment, m, finished), s) for m in experiment.methods for s in later]


def finished_runs(experiment: Experiment) -> dict[str, dict]:
    """The experiment's results by run name, each planned run's checked against the config: a results file made
    with other run options than the config now gives is refused, naming the options."""
    finished = read_results(experiment)
    for run in plan(experiment, finished):
        differences = config_differences(finished[run.name]["config"], run.config()) if run.name in finished else []
        if differences:
            raise ValueError(f"{run.results_path} was made with other options than {experiment.config_path} now "
                             f"gives ({'; '.join(differences)}). Restore the config, or delete the results file to "
                             "run it again.")
    return finished


# ------------------------------------------------------------------------------------------------- running runs
def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> dict:
    """The training loss as at most ``points`` window means, each labelled with its window's last step."""
    window = max(1, -(-len(losses) // points))
    steps, means = [], []
    for start in range(0, len(losses), window):
        chunk = losses[start:start + window]
        steps.append(start + len(chunk))
        means.append(sum(chunk) / len(chunk))
    return {"step": steps, "loss": means}


def results_record(run: Run, cfg: RunConfig, metrics: dict, wall_seconds: Optional[float],
                   inspect_rows: Optional[list]) -> dict:
    """The committed results of a run: ``metrics.json`` with the loss curve subsampled, plus the suite's facts
    (``wall_seconds`` is None for a run resumed or made earlier: only a run made in one go has its whole time)."""
    record = {k: v for k, v in metrics.items() if k != "losses"}
    record["loss_curve"] = loss_curve(metrics["losses"])
    record["suite"] = {"experiment": run.experiment.name, "run": run.name, "label": run.label,
                       "lr": cfg.learning_rate, "seed": run.seed, "wall_seconds": wall_seconds}
    if inspect_rows is not None:
        record["inspect"] = inspect_rows
    return record


def wants_inspect(run: Run, cfg: RunConfig) -> bool:
    """The rank analysis is made for an inspecting experiment's first-seed runs that have an adapter."""
    return run.experiment.inspect and run.seed == run.experiment.seeds[0] and cfg.method != "full"


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def train_in_child(run: Run, cfg: RunConfig, progress: bool) -> Optional[float]:
    """Train the run in a child process unless its output directory holds it finished with these options.
    Resumes an interrupted run with the same options; replaces one with other options. Returns the wall time of
    a run made in one go, else None."""
    run_dir = Path(cfg.output_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if metrics is not None and not config_differences(metrics["config"], cfg):
        return None  # finished earlier, its results file not written yet
    started_config = _read_json(run_dir / "run_config.json")
    resume = started_config is not None and not config_differences(started_config, cfg)
    if progress:
        print(f"{run.experiment.name}/{run.name}: {'resuming' if resume else 'running'}", flush=True)
    started = time.perf_counter()
    try:
        run_in_child(cfg, resume=resume)
    except RuntimeError as err:  # compare's message names the run and its exit code
        raise RunFailed(f"{run.experiment.name}/{run.name} failed ({err}). Finished runs are kept: run `duallora "
                        "suite` again to go on (this run resumes from its last checkpoint).") from err
    return None if resume else time.perf_counter() - started


def execute(run: Run, runs_dir: Path, progress: bool = True) -> dict:
    """Train the run, inspect it if the experiment asks, and write its results file atomically. Then delete the
    run's checkpoint: it serves resume only, and a full fine-tuning's (weights and optimizer state) is large; the
    final adapter or model stays in the run directory."""
    cfg = run.config(runs_dir)
    wall = train_in_child(run, cfg, progress)
    run_dir = Path(cfg.output_dir)
    rows = None
    if wants_inspect(run, cfg):
        from .inspect import inspect_run

        rows = inspect_run(run_dir, run_dir / "inspect")
    record = results_record(run, cfg, json.loads((run_dir / "metrics.json").read_text()), wall, rows)
    run.experiment.results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.results_path, json.dumps(record, indent=1) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return record


def run_experiment(experiment: Experiment, runs_dir: Path, progress: bool = True) -> int:
    """Run every unfinished run of the experiment, planning again after each pass (a comparison's later seeds
    wait for its grid). Returns the number of runs made."""
    made = 0
    while True:
        finished = finished_runs(experiment)
        todo = [run for run in plan(experiment, finished) if run.ready and run.name not in finished]
        if not todo:
            return made
        for run in todo:
            execute(run, runs_dir, progress)
        made += len(todo)


def run_suite(root: Path, runs_dir: Path, names: Optional[list[str]] = None, progress: bool = True) -> int:
    """Run the named experiments (default: all); every config is checked before the first run starts.
    Returns the number of runs made."""
    made = 0
    for experiment in load_experiments(root, names):
        made += run_experiment(experiment, runs_dir, progress)
        if progress:
            print(f"{experiment.name}: all runs finished", flush=True)
    return made


# -------------------------------------------------------------------------------------- listing and estimates
@dataclass(frozen=True)
class Cost:
    """Measured seconds of one LoRA run's parts: process start and model load, one training example, one
    evaluated example; ``eval_split`` caps the evaluated examples (the size of the validation and test splits)."""

    startup: float
    train_example: float
    eval_example: float
    eval_split: int


# Measured here (2 cores, bf16 autocast, batch 16, r 16; see experiments/README.md): (model, task, bf16) -> the
# costs of a LoRA run. Other methods scale the training part by METHOD_COST (their step time over LoRA's, from
# these measurements and the README's training-step benchmarks).
MEASURED: dict[tuple[str, str, bool], Cost] = {
    ("minilm", "sentiment", True): Cost(startup=4, train_example=0.0131, eval_example=0.0116, eval_split=5746),
    ("minilm", "fact-verification", True): Cost(startup=4, train_example=0.0211, eval_example=0.016, eval_split=5466),
    ("smollm2", "social-iqa", True): Cost(startup=5, train_example=0.0824, eval_example=0.28, eval_split=195),
    ("smollm2", "strategyqa", True): Cost(startup=5, train_example=0.0504, eval_example=0.149, eval_split=229),
    ("smollm2", "e2e-nlg", True): Cost(startup=5, train_example=0.134, eval_example=0.20, eval_split=21),
}
METHOD_COST = {"lora": 1.0, "dora": 1.3, "dual": 1.5, "d2": 1.45, "full": 1.25}


def estimate_seconds(cfg: RunConfig, observed: list[float]) -> Optional[float]:
    """Wall time of a run: the mean of the same kind of run already made in this experiment, else the measured
    costs above; None when neither knows the model and task."""
    if observed:
        return statistics.mean(observed)
    cost = MEASURED.get((cfg.model, cfg.task, cfg.bf16))
    if cost is None:
        return None
    examples = (cfg.max_steps or 0) * cfg.batch_size * cfg.grad_accum
    evaluated = 2 * min(cfg.max_eval_examples or cost.eval_split, cost.eval_split)
    return cost.startup + examples * cost.train_example * METHOD_COST[cfg.method] + evaluated * cost.eval_example


@dataclass(frozen=True)
class Status:
    run: Run
    finished: bool
    seconds: Optional[float]  # estimated wall time, for a run not finished


def statuses(experiment: Experiment, runs_dir: Path) -> list[Status]:
    """Every planned run of the experiment: finished, or its estimated time."""
    finished = finished_runs(experiment)
    observed: dict[str, list[float]] = {}
    for result in finished.values():
        if result["suite"]["wall_seconds"] is not None:
            observed.setdefault(result["suite"]["label"], []).append(result["suite"]["wall_seconds"])
    out = []
    for run in plan(experiment, finished):
        if run.name in finished:
            out.append(Status(run, True, None))
            continue
        lr = run.lr if run.ready else experiment.lr_grid[0]  # the time does not depend on the lr
        cfg = Run(experiment, run.label, lr, run.seed).config(runs_dir)
        out.append(Status(run, False, estimate_seconds(cfg, observed.get(run.label, []))))
    return out


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _left(items: list[Status]) -> str:
    todo = [s for s in items if not s.finished]
    unknown = sum(s.seconds is None for s in todo)
    known = sum(s.seconds for s in todo if s.seconds is not None)
    return f"~{_duration(known)}" + (f" plus {unknown} run(s) with no estimate (model/task not measured)"
                                     if unknown else "")


def dry_run(root: Path, runs_dir: Path, names: Optional[list[str]] = None) -> str:
    """What ``duallora suite`` would run, with estimated times; runs nothing."""
    lines, everything = [], []
    for experiment in load_experiments(root, names):
        items = statuses(experiment, runs_dir)
        everything += items
        done = sum(s.finished for s in items)
        lines.append(f"{experiment.name} ({summary(experiment)}): {done} of {len(items)} runs finished, "
                     f"{_left(items)} left")
        for s in items:
            state = ("finished" if s.finished else
                     "to run" if s.run.ready else "after its grid (lr chosen on validation)")
            estimate = "" if s.finished or s.seconds is None else f"~{s.seconds / 60:.1f} min"
            lines.append(f"  {s.run.name:36s} {state:42s} {estimate}".rstrip())
    lines.append(f"total left: {_left(everything)}")
    return "\n".join(lines)


def summary(experiment: Experiment) -> str:
    """``comparison, minilm / sentiment, 200 steps x 16, 6 methods x 3 lr, seeds [0, 1, 2]`` and the like."""
    base = experiment.base
    steps = (f"{base['max_steps']} steps x {base.get('batch_size', RunConfig.batch_size)}" if base.get("max_steps")
             else f"{base.get('epochs', RunConfig.epochs)} epochs")
    what = (f"{len(experiment.methods)} methods x {len(experiment.lr_grid)} lr" if experiment.kind == "comparison"
            else f"{len(experiment.variants)} variants")
    return (f"{experiment.kind}, {base.get('model', RunConfig.model)} / {base.get('task', RunConfig.task)}, {steps}, "
            f"{what}, seeds {list(experiment.seeds)}" + (", rank analysis" if experiment.inspect else ""))


def listing(root: Path, names: Optional[list[str]] = None) -> str:
    """One line per experiment: how many of its runs are finished, its kind, model, task and budget."""
    lines = []
    for experiment in load_experiments(root, names):
        finished = finished_runs(experiment)
        runs = plan(experiment, finished)
        done = sum(run.name in finished for run in runs)
        lines.append(f"{experiment.name:28s} {done:3d}/{len(runs):<3d} finished  {summary(experiment)}")
    return "\n".join(lines)
