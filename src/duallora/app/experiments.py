"""Experiments: what ``<root>/<name>/config.yaml`` asks for, the runs it plans, and the results it has.

An experiment is one of two kinds:

- a **comparison** (``methods`` + ``lr_grid`` + ``seeds``): each method runs every learning rate of the grid at
  the first seed; the learning rate with the best validation score (the task's primary metric) is then run at the
  remaining seeds. Every method runs at the base ``r``; a method may carry a rank multiplier, ``lora-2r`` being LoRA
  at twice the base ``r`` (and, when the base sets ``alpha``, twice the alpha, so that ``alpha / r`` stays the
  same). That is the one rule by which methods are matched: at the same ``r``, Dual LoRA holds LoRA's parameters
  and D2-LoRA (two branches) LoRA at 2r's; every results table names each row's parameter count.
- an **ablation** (``variants`` + ``seeds``): named overrides of the base run options, each run at every seed.

Either may set ``inspect: true``: each run at the first seed (full fine-tuning excepted: it has no adapter) then
also gets the rank analysis of :mod:`duallora.app.inspect`, stored in its results file. Either may set
``zero_shot: true`` (a causal LM's multiple-choice or generation task): the base model, unadapted, is scored once
on the same validation and test examples (:mod:`duallora.app.zero_shot`), so the report shows what training
added. ``duallora compare`` builds a comparison in memory from its flags (:func:`comparison`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from .run_config import METHODS, RunConfig, adapter_config

CONFIG_NAME = "config.yaml"
TOP_LEVEL_KEYS = ("description", "base", "methods", "lr_grid", "seeds", "variants", "inspect", "zero_shot")
SET_PER_RUN = ("output_dir", "seed")  # the suite sets these for every run
SET_PER_COMPARISON_RUN = ("method", "lr")  # and, in a comparison, these
METHOD_VARIANT = re.compile(r"^(?P<method>[a-z0-9]+?)(?:-(?P<factor>\d+)r)?$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_RUNS_DIR = Path("runs/experiments")
ZERO_SHOT_RUN = "zero-shot"  # the results file of the base model's scores (not a run of the plan)


@dataclass(frozen=True)
class Experiment:
    """One ``config.yaml``: the base run options and either a comparison or an ablation."""

    name: str
    directory: Path
    base: dict
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = ()  # comparison: method variants such as "lora" or "lora-2r"
    lr_grid: tuple[float, ...] = ()  # comparison: the learning rates to choose from; () (compare): no grid, every
    # run at the base's lr or, where it has none, the method's default
    variants: dict = field(default_factory=dict)  # ablation: variant name -> run option overrides
    inspect: bool = False
    zero_shot: bool = False  # the base model, unadapted, scored once on the same examples
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
        return {**self.base, "method": method, "r": r, "alpha": None if alpha is None else alpha * factor,
                "lr": lr if self.lr_grid else self.base.get("lr"), "seed": seed}


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
        if self.experiment.kind == "ablation" or not self.experiment.lr_grid:
            return f"{self.label}-seed{self.seed}"
        return f"{self.label}-lr{'?' if self.lr is None else format(self.lr, 'g')}-seed{self.seed}"

    @property
    def ready(self) -> bool:
        return self.experiment.kind == "ablation" or not self.experiment.lr_grid or self.lr is not None

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
    if (not isinstance(values, list) or not values
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in values)
            or len(set(values)) != len(values)):
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


def _check_zero_shot(zero_shot: bool, base: dict, where: str) -> None:
    """A zero-shot score needs a task the base model answers as it is: a classification head starts untrained."""
    from .tasks import registry

    info = registry().get(base.get("task", RunConfig.task))
    if zero_shot and info is not None and info.kind == "classification":
        raise ValueError(f"{where}: zero_shot scores the base model untrained, but {info.name!r} is a classification "
                         "task, whose head starts random (its zero-shot score is chance by construction); the report "
                         "gives the majority class instead. Remove zero_shot.")


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
    for flag in ("inspect", "zero_shot"):
        if not isinstance(raw.get(flag, False), bool):
            raise ValueError(f"{where}: {flag} must be true or false; got {raw[flag]!r}.")
    _check_zero_shot(raw.get("zero_shot", False), base, where)
    common = dict(name=directory.name, directory=directory, base=base, seeds=_seeds(raw.get("seeds"), where),
                  inspect=raw.get("inspect", False), zero_shot=raw.get("zero_shot", False),
                  description=str(raw.get("description", "")).strip())
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
        lr = experiment.lr_grid[0] if experiment.lr_grid else None
        try:
            cfg = Run(experiment, label, lr, experiment.seeds[0]).config()
            cfg.validate()
            adapter_config(cfg, "classification")  # the adapter configs check their own options
        except (ValueError, TypeError) as err:
            where = experiment.config_path if experiment.config_path.exists() else experiment.name
            raise ValueError(f"{where}: {label}: {err}") from None


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
    return {p.stem: json.loads(p.read_text()) for p in sorted(experiment.results_dir.glob("*.json"))
            if p.stem != ZERO_SHOT_RUN}


def config_differences(saved: dict, cfg: RunConfig) -> list[str]:
    """Options where a saved run config differs from ``cfg`` (the output directory aside; options the saved
    config does not know yet count as equal)."""
    return [f"{k}: {saved[k]!r} there, {v!r} now" for k, v in asdict(cfg).items()
            if k != "output_dir" and k in saved and saved[k] != v]


def chosen_lr(experiment: Experiment, label: str, finished: dict[str, dict]) -> Optional[float]:
    """The grid's learning rate with the best validation score at the first seed (a tie goes to the one listed
    first), or None while any of those grid runs is unfinished, or when there is no grid."""
    if not experiment.lr_grid:
        return None
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
    if not experiment.lr_grid:
        return [Run(experiment, m, None, s) for m in experiment.methods for s in experiment.seeds]
    first, later = experiment.seeds[0], experiment.seeds[1:]
    grid = [Run(experiment, m, lr, first) for m in experiment.methods for lr in experiment.lr_grid]
    return grid + [Run(experiment, m, chosen_lr(experiment, m, finished), s)
                   for m in experiment.methods for s in later]


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


def summary(experiment: Experiment) -> str:
    """``comparison, minilm / sentiment, 200 steps x 16, 6 methods x 3 lr, seeds [0, 1, 2]`` and the like."""
    base = experiment.base
    steps = (f"{base['max_steps']} steps x {base.get('batch_size', RunConfig.batch_size)}" if base.get("max_steps")
             else f"{base.get('epochs', RunConfig.epochs)} epochs")
    what = (f"{len(experiment.variants)} variants" if experiment.kind == "ablation"
            else f"{len(experiment.methods)} methods x {len(experiment.lr_grid)} lr" if experiment.lr_grid
            else f"{len(experiment.methods)} methods")
    return (f"{experiment.kind}, {base.get('model', RunConfig.model)} / {base.get('task', RunConfig.task)}, {steps}, "
            f"{what}, seeds {list(experiment.seeds)}" + (", rank analysis" if experiment.inspect else "")
            + (", zero-shot" if experiment.zero_shot else ""))


def comparison(directory: Path, base: RunConfig, methods: list[str], seeds: list[int]) -> Experiment:
    """The comparison ``duallora compare`` runs: ``methods`` x ``seeds`` on ``base``'s options, with no learning
    rate grid; its runs and results files go under ``directory``. Every option is checked before anything runs."""
    directory = Path(directory)
    options = {k: v for k, v in asdict(base).items() if k not in SET_PER_RUN + ("method",)}
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods must name distinct methods, e.g. dual,lora,lora-2r; got {methods}.")
    experiment = Experiment(name=directory.name, directory=directory, base=options, seeds=tuple(seeds),
                            methods=tuple(methods))
    _validate_runs(experiment)
    return experiment
