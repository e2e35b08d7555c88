"""The experiment suite and its report, end to end on tiny local checkpoints in temporary directories.

Most tests train in-process (``run_in_child`` replaced by a direct ``train`` call: the same training, without a
process start per run); ``test_a_run_trains_in_its_own_process`` covers the child process.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from duallora.app import experiments, suite
from duallora.app.cli import main
from duallora.app.train import train


def base_options(tiny_checkpoints, tiny_csv, **extra):
    return {"model": str(tiny_checkpoints["bert"]), "task": str(tiny_csv), "text_column": "text",
            "label_column": "label", "max_steps": 4, "save_every": 2, "batch_size": 8, "max_length": 16,
            "max_eval_examples": 24, **extra}


def write_experiment(root, name, config):
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def comparison(tiny_checkpoints, tiny_csv):
    return {"base": base_options(tiny_checkpoints, tiny_csv), "methods": ["lora", "dual"],
            "lr_grid": ["1e-5", 0.02], "seeds": [0, 1]}  # "1e-5": YAML 1.1 reads it as a string


class InProcess:
    """Stands in for ``run_in_child``: trains in this process and records (run, resume, first step taken)."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, resume):
        steps = []
        train(cfg, resume=resume, overwrite=not resume, progress=False, on_step=lambda step, *_: steps.append(step))
        self.calls.append((cfg.output_dir.rsplit("/", 1)[-1], resume, steps[0] if steps else None))


@pytest.fixture
def in_process(monkeypatch):
    runner = InProcess()
    monkeypatch.setattr(suite, "run_in_child", runner)
    return runner


@pytest.fixture
def no_child(monkeypatch):
    def refuse(cfg, resume):
        raise AssertionError(f"no run should start; {cfg.output_dir} did")

    monkeypatch.setattr(suite, "run_in_child", refuse)


@pytest.fixture(scope="module")
def comparison_made_once(tiny_checkpoints, tiny_csv, tmp_path_factory):
    """A 2-lr grid x 2 methods x 2 seeds comparison, run to the end through the command line (once per module)."""
    where = tmp_path_factory.mktemp("suite")
    root, runs = where / "experiments", where / "runs"
    write_experiment(root, "cmp", comparison(tiny_checkpoints, tiny_csv))
    shutil.copy(suite_template(), root / "report_template.md")
    return where, suite_in_process(["--root", str(root), "--runs-dir", str(runs)])


def suite_in_process(argv):
    """``duallora suite ARGV`` with every run trained in this process; returns the runner's calls."""
    runner = InProcess()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(suite, "run_in_child", runner)
        assert main(["suite", *argv]) == 0
    return runner.calls


@pytest.fixture
def finished_comparison(comparison_made_once, tmp_path, in_process):
    """A copy of the finished comparison for one test to change: (experiments root, runs dir, runner)."""
    made, calls = comparison_made_once
    shutil.copytree(made, tmp_path / "copy")
    in_process.calls[:] = calls
    return tmp_path / "copy" / "experiments", tmp_path / "copy" / "runs", in_process


def suite_template():
    return Path(__file__).parents[1] / "experiments" / "report_template.md"


def results(root, name="cmp"):
    return {p.stem: json.loads(p.read_text()) for p in (root / name / "results").glob("*.json")}


def test_comparison_picks_the_lr_with_the_best_validation_score(finished_comparison):
    root, runs, runner = finished_comparison
    found = results(root)
    grid = [f"{m}-lr{lr}-seed0" for m in ("lora", "dual") for lr in ("1e-05", "0.02")]
    later = [f"{m}-lr{_best(found, m)}-seed1" for m in ("lora", "dual")]
    assert sorted(found) == sorted(grid + later)
    for method in ("lora", "dual"):
        later = found[f"{method}-lr{_best(found, method)}-seed1"]
        assert later["config"]["lr"] == float(_best(found, method)) and later["config"]["seed"] == 1
    record = found["dual-lr0.02-seed0"]
    assert "losses" not in record and record["loss_curve"]["step"][-1] == 4
    assert record["suite"] == {"experiment": "cmp", "run": "dual-lr0.02-seed0", "label": "dual", "lr": 0.02,
                               "seed": 0, "wall_seconds": record["suite"]["wall_seconds"]}
    assert record["config"]["method"] == "dual" and record["environment"]["torch"]
    assert [call[1] for call in runner.calls] == [False] * 6  # six fresh runs, none resumed


def _best(found, method):
    """The grid lr with the best validation accuracy at seed 0, ties to the first listed (as the suite picks)."""
    scores = [(found[f"{method}-lr{lr}-seed0"]["validation"]["accuracy"], -i, lr)
              for i, lr in enumerate(("1e-05", "0.02"))]
    return max(scores)[2]


def test_second_invocation_starts_no_run(finished_comparison, no_child, capsys):
    root, runs, _ = finished_comparison
    capsys.readouterr()
    assert main(["suite", "--root", str(root), "--runs-dir", str(runs)]) == 0
    assert "0 run(s) made" in capsys.readouterr().out
    assert main(["suite", "--root", str(root), "--runs-dir", str(runs), "--list"]) == 0
    assert "6/6   finished" in capsys.readouterr().out


def test_missing_results_are_rewritten_without_training(finished_comparison):
    root, runs, runner = finished_comparison
    before = results(root)
    runner.calls.clear()
    (root / "cmp" / "results" / "lora-lr0.02-seed0.json").unlink()  # lost; the run directory is intact
    assert main(["suite", "--root", str(root), "--runs-dir", str(runs)]) == 0
    assert runner.calls == []
    after = results(root)
    assert after["lora-lr0.02-seed0"]["test"] == before["lora-lr0.02-seed0"]["test"]
    assert not (runs / "cmp" / "lora-lr0.02-seed0" / "checkpoints").exists()  # deleted once the results are kept
    assert (runs / "cmp" / "lora-lr0.02-seed0" / "adapter_model.safetensors").exists()


class Interrupting(InProcess):
    """Trains like InProcess, but the run ``name`` is interrupted (Ctrl-C) after step 3, once."""

    def __init__(self, name):
        super().__init__()
        self.name, self.interrupted = name, False

    def __call__(self, cfg, resume):
        if self.interrupted or not cfg.output_dir.endswith(self.name):
            return super().__call__(cfg, resume)
        self.interrupted = True

        def interrupt(step, *_):
            if step == 3:
                raise KeyboardInterrupt

        train(cfg, resume=resume, overwrite=not resume, progress=False, on_step=interrupt)


def test_an_interrupted_run_resumes_from_its_checkpoint(finished_comparison, monkeypatch):
    root, runs, runner = finished_comparison
    before = results(root)
    (root / "cmp" / "results" / "dual-lr0.02-seed0.json").unlink()
    shutil.rmtree(runs / "cmp" / "dual-lr0.02-seed0")
    monkeypatch.setattr(suite, "run_in_child", Interrupting("dual-lr0.02-seed0"))
    assert main(["suite", "--root", str(root), "--runs-dir", str(runs)]) == 130  # Ctrl-C during the run
    assert (runs / "cmp" / "dual-lr0.02-seed0" / "checkpoints" / "step-0000002").exists()
    assert not (root / "cmp" / "results" / "dual-lr0.02-seed0.json").exists()
    runner.calls.clear()
    monkeypatch.setattr(suite, "run_in_child", runner)
    assert main(["suite", "--root", str(root), "--runs-dir", str(runs)]) == 0
    assert runner.calls == [("dual-lr0.02-seed0", True, 3)]  # resumed at step 3, from the step-2 checkpoint
    after = results(root)
    assert after["dual-lr0.02-seed0"]["test"] == before["dual-lr0.02-seed0"]["test"]
    assert after["dual-lr0.02-seed0"]["loss_curve"] == before["dual-lr0.02-seed0"]["loss_curve"]
    assert after["dual-lr0.02-seed0"]["suite"]["wall_seconds"] is None  # a resumed run's time is not whole


def test_dry_run_lists_runs_and_later_seeds_wait_for_the_grid(tiny_checkpoints, tiny_csv, tmp_path, no_child,
                                                              capsys):
    root = tmp_path / "experiments"
    write_experiment(root, "cmp", comparison(tiny_checkpoints, tiny_csv))
    assert main(["suite", "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cmp (comparison" in out and "0 of 6 runs finished" in out
    assert out.count(" to run") == 4 and out.count("after its grid (lr chosen on validation)") == 2
    assert "lora-lr?-seed1" in out and "no estimate" in out
    assert not (root / "cmp" / "results").exists()


@pytest.mark.parametrize("native", [False, True])
def test_dry_run_warns_when_bf16_runs_would_be_emulated(tiny_checkpoints, tiny_csv, tmp_path, no_child,
                                                        monkeypatch, capsys, native):
    from duallora.app import process

    monkeypatch.setattr(process, "bf16_is_native", lambda device: native)
    options = comparison(tiny_checkpoints, tiny_csv)
    root = tmp_path / "experiments"
    write_experiment(root, "fp32", options)
    assert main(["suite", "--root", str(root), "--dry-run"]) == 0
    assert "no bfloat16 kernels" not in capsys.readouterr().out  # no run asks for bf16
    write_experiment(root, "bf16", {**options, "base": {**options["base"], "bf16": True}})
    assert main(["suite", "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("no bfloat16 kernels" in out and "estimates above were measured with bfloat16 kernels" in out) == (
        not native)


def test_dry_run_estimates_from_runs_already_made(finished_comparison, capsys):
    root, runs, _ = finished_comparison
    later = next((root / "cmp" / "results").glob("dual-*-seed1.json"))
    later.unlink()
    capsys.readouterr()
    assert main(["suite", "--root", str(root), "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 of 6 runs finished" in out and "no estimate" not in out
    assert [line.split()[:3] for line in out.splitlines() if later.stem in line] == [[later.stem, "to", "run"]]


def test_report_with_partial_results_says_not_run_yet(finished_comparison, tiny_checkpoints, tiny_csv, tmp_path):
    root, runs, _ = finished_comparison
    # mid-suite: dual's grid half done, its later seed missing; an ablation not started
    # and lora's lr chosen but its later seed missing
    later_seeds = [p.stem for p in (root / "cmp" / "results").glob("*-seed1.json")]
    for name in ("dual-lr0.02-seed0", *later_seeds):
        (root / "cmp" / "results" / f"{name}.json").unlink()
    write_experiment(root, "abl", {"base": base_options(tiny_checkpoints, tiny_csv, method="dual", lr=0.01),
                                   "variants": {"default": {}, "relu-off": {"magnitude_activation": "identity"}},
                                   "seeds": [0, 1, 2]})
    docs = tmp_path / "docs"
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(docs)]) == 0
    text = (docs / "RESULTS.md").read_text()
    assert "choosing lr: 1 of 2 grid runs finished" in text
    assert "| relu-off | magnitude_activation=identity |" in text and "not run yet" in text
    assert "3 of 6" in text and "0 of 6" in text  # the budget table's progress per experiment
    lora_headline = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert lora_headline.endswith(" (1 of 2 seeds) |") and " ± " not in lora_headline
    assert "| Dual LoRA | GLUE, RoBERTa-base: +1.6 points over LoRA | dual - lora | not run yet |" in text
    assert (docs / "results" / "cmp.png").exists() and not (docs / "results" / "abl.png").exists()
    assert "{{" not in text and "**Caveats.**" in text


def test_report_fills_the_readme_between_its_markers_only(finished_comparison, tmp_path, capsys):
    root, _, _ = finished_comparison
    readme = root.parent / "README.md"
    readme.write_text("# project\n\nbefore\n\n<!-- results:start -->\nstale\n<!-- results:end -->\n\nafter\n")
    docs = tmp_path / "docs"
    for _ in range(2):  # a second build replaces the first summary instead of adding to it
        assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(docs)]) == 0
    assert str(readme) in capsys.readouterr().out
    text = readme.read_text()
    assert text.startswith("# project\n\nbefore\n\n<!-- results:start -->\nStatus: 6 of 6 runs finished")
    assert text.endswith("<!-- results:end -->\n\nafter\n") and "stale" not in text
    assert text.count("| method |") == 1 and text.count("| paper | claim |") == 1
    # the claims in brief: one cell per kind of data, the difference and the verdict's first words
    assert "| paper | claim | ours | the papers' tasks: difference, verdict |" in text
    assert "| Dual LoRA | E2E NLG, GPT-2: BLEU 70.6 | dual - lora | – (no experiment of this kind) |" in text
    assert "| the papers' tasks: verdict |" in (docs / "RESULTS.md").read_text()  # the report keeps them whole
    report = (docs / "RESULTS.md").read_text()
    headline = next(line for line in text.splitlines() if line.startswith("| dual |"))
    assert headline in report  # the same row as the report's headline table
    assert f"({os.path.relpath(docs / 'RESULTS.md', readme.parent)})" in text  # a link that resolves from the README

    readme.write_text("no markers here\n")  # a README without the markers is left alone
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(docs)]) == 0
    assert readme.read_text() == "no markers here\n" and str(readme) not in capsys.readouterr().out


@pytest.fixture(scope="module")
def rank_analysis(tiny_checkpoints, tiny_csv, tmp_path_factory):
    """A finished rank-analysis experiment (Dual LoRA at r=8, LoRA at r=4, one seed, inspected): its root."""
    where = tmp_path_factory.mktemp("ranks")
    root = where / "experiments"
    write_experiment(root, "ranks", {"base": base_options(tiny_checkpoints, tiny_csv, lr=0.01, warmup_steps=2),
                                     "variants": {"dual": {"method": "dual"}, "lora": {"method": "lora", "r": 4}},
                                     "seeds": [0], "inspect": True})
    suite_in_process(["ranks", "--root", str(root), "--runs-dir", str(where / "runs")])
    return root


def test_rank_analysis_is_kept_in_the_results_and_reported(rank_analysis, tmp_path):
    found = results(rank_analysis, "ranks")
    dual = found["dual-seed0"]["inspect"]
    assert all(row["rank_dW"] > row["lora_bound"] for row in dual)  # Dual LoRA's update is not bounded by r
    assert "rank_magnitude" in dual[0] and "rank_magnitude" not in found["lora-seed0"]["inspect"][0]
    shutil.copy(suite_template(), rank_analysis / "report_template.md")
    docs = tmp_path / "docs"
    assert main(["suite", "--root", str(rank_analysis), "--report", "--docs-dir", str(docs)]) == 0
    text = (docs / "RESULTS.md").read_text()
    assert "- dual (r=8): dW is full rank in" in text and "| lora | query |" in text
    assert (docs / "results" / "ranks-rank.png").exists()


def test_lora_rank_stays_within_its_bound(rank_analysis):
    lora = results(rank_analysis, "ranks")["lora-seed0"]["inspect"]
    assert all(row["rank_dW"] <= row["lora_bound"] == 4 for row in lora)


def test_a_run_trains_in_its_own_process(tiny_checkpoints, tiny_csv, tmp_path):
    root = tmp_path / "experiments"
    write_experiment(root, "one", {"base": base_options(tiny_checkpoints, tiny_csv, method="lora", max_steps=2),
                                   "variants": {"default": {}}, "seeds": [0]})
    assert main(["suite", "--root", str(root), "--runs-dir", str(tmp_path / "runs")]) == 0
    record = results(root, "one")["default-seed0"]
    assert record["steps"] == 2 and record["suite"]["wall_seconds"] > 0
    assert (tmp_path / "runs" / "one" / "default-seed0" / "adapter_model.safetensors").exists()


def test_results_made_with_other_options_are_refused(finished_comparison, no_child, capsys):
    root, runs, _ = finished_comparison
    config = yaml.safe_load((root / "cmp" / "config.yaml").read_text())
    config["base"]["max_steps"] = 5
    (root / "cmp" / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["suite", "--root", str(root), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "was made with other options than" in err and "max_steps: 4 there, 5 now" in err
    assert "delete the results file to run it again" in err


@pytest.mark.parametrize("change, message", [
    ({"methods": ["lora", "qlora"]}, "qlora: Unknown method 'qlora'; valid: "
                                     "['dual', 'd2', 'lora', 'loraplus', 'dora', 'hira', 'full']"),
    ({"methods": ["full-2r"]}, "Unknown method 'full-2r'"),
    ({"lr_grid": []}, "lr_grid is empty or not a list; list at least one learning rate"),
    ({"lr_grid": [0.01, "fast"]}, "lr_grid must hold numbers"),
    ({"seeds": []}, "seeds must be a non-empty list of distinct integers"),
    ({"base": {"learning_rate": 0.1}}, "Unknown run option(s) ['learning_rate']"),
    ({"base": {"seed": 3}}, "base sets ['seed'], which the suite sets for every run"),
    ({"base": {"lr": 0.1}}, "base sets ['lr'], which the suite sets for every run"),
    ({"base": {"ste": "round"}}, "`ste` must be one of ['clip', 'identity', 'hardtanh']; got 'round'"),
    ({"lrs": [0.1]}, "unknown key(s) ['lrs']"),
    ({"variants": {"a": {}}}, "give either `methods` and `lr_grid` (a comparison) or `variants` (an ablation)"),
])
def test_bad_config_names_the_problem(tiny_checkpoints, tiny_csv, tmp_path, no_child, capsys, change, message):
    config = comparison(tiny_checkpoints, tiny_csv)
    if "base" in change:
        config["base"].update(change.pop("base"))
    config.update(change)
    root = tmp_path / "experiments"
    write_experiment(root, "bad", config)
    assert main(["suite", "--root", str(root), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "bad/config.yaml" in err and message in err, err


def test_bad_suite_layout_names_the_problem(tmp_path, no_child, capsys):
    root = tmp_path / "experiments"
    (root / "empty").mkdir(parents=True)
    cases = [(["suite", "--root", str(tmp_path / "nowhere")], "No experiments root"),
             (["suite", "--root", str(root)], "empty has no config.yaml"),
             (["suite", "missing", "--root", str(root)], "No experiment named ['missing']"),
             (["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "d")], "No report template")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, (argv, message)


def test_rank_multiplier_scales_r_and_alpha(tiny_checkpoints, tiny_csv, tmp_path):
    config = comparison(tiny_checkpoints, tiny_csv)
    config["base"].update(r=4, alpha=12)
    config["methods"] = ["lora-2r", "d2"]
    experiment = experiments.load_experiment(write_experiment(tmp_path, "x", config))
    lora2r, d2 = (experiments.Run(experiment, m, 0.01, 0).config() for m in ("lora-2r", "d2"))
    assert (lora2r.method, lora2r.r, lora2r.alpha) == ("lora", 8, 24)
    assert (d2.method, d2.r, d2.alpha) == ("d2", 4, 12)  # D2-LoRA at r, as the papers run it
    assert experiment.lr_grid == (1e-5, 0.02)


def fabricate(experiment, label, lr, seed, test_accuracy, kind="classification"):
    """A results file for one planned run with a given test accuracy, written as the suite writes it (no training)."""
    run = experiments.Run(experiment, label, lr, seed)
    cfg = run.config()
    metrics = {"method": cfg.method, "model": cfg.model, "task": "reviews.csv", "task_kind": kind,
               "primary_metric": "accuracy", "test": {"accuracy": test_accuracy}, "validation": {"accuracy": 0.5},
               "evaluations": [], "losses": [1.0, 0.5], "steps": 2, "train_seconds": 1.0, "peak_memory_mib": 100.0,
               "trainable_params": 10, "total_params": 100, "test_examples": 100, "majority_baseline": 0.5,
               "config": asdict(cfg)}
    experiment.results_dir.mkdir(parents=True, exist_ok=True)
    run.results_path.write_text(json.dumps(suite.results_record(run, cfg, metrics, 1.0, None)))


def test_claims_are_computed_from_the_numbers(tiny_checkpoints, tiny_csv, tmp_path):
    config = comparison(tiny_checkpoints, tiny_csv)
    config.update(lr_grid=[0.01], seeds=[0, 1, 2])
    root = tmp_path / "experiments"
    experiment = experiments.load_experiment(write_experiment(root, "cmp", config))
    for seed, (dual, lora) in enumerate([(0.60, 0.50), (0.62, 0.52), (0.64, 0.54)]):
        fabricate(experiment, "dual", 0.01, seed, dual)
        fabricate(experiment, "lora", 0.01, seed, lora)
    shutil.copy(suite_template(), root / "report_template.md")
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    # dual 62.0 ± 2.0 and lora 52.0 ± 2.0 over 3 seeds: +10.0 with a standard error of sqrt(2 * 4 / 3) = 1.6
    assert ("| dual | 8 | 10 | 0.01 | **62.0 ± 2.0** | 3 |" in text
            and "| lora | 8 | 10 | 0.01 | 52.0 ± 2.0 | 3 |" in text)
    claim = next(line for line in text.splitlines() if "+1.6 points over LoRA | dual - lora" in line)
    assert "| +10.0 ± 1.6 (" in claim
    assert "agrees in direction: a gain beyond 2 standard errors; the paper's figure is outside" in claim
    assert "| D2-LoRA | matches DoRA | d2 - dora | not run yet |" in text


def test_claims_are_judged_on_the_stand_ins_and_the_papers_tasks_side_by_side(tiny_checkpoints, tiny_csv, tmp_path):
    """Never averaged together: each kind of data has its own difference and verdict, in its own columns."""
    root = tmp_path / "experiments"
    for name, task, (dual, lora) in (("stand-in", "sentiment", (0.75, 0.65)), ("papers", str(tiny_csv), (0.65, 0.75))):
        config = comparison(tiny_checkpoints, tiny_csv)
        config["base"]["task"] = task  # "sentiment": BIG-bench's multiemo (the suite never loads it here)
        config.update(lr_grid=[0.01], seeds=[0, 1, 2])
        experiment = experiments.load_experiment(write_experiment(root, name, config))
        for seed, shift in enumerate((-0.01, 0.0, 0.01)):
            fabricate(experiment, "dual", 0.01, seed, dual + shift)
            fabricate(experiment, "lora", 0.01, seed, lora + shift)
    shutil.copy(suite_template(), root / "report_template.md")
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert ("| paper | claim | ours | BIG-bench stand-ins: difference (tasks) | BIG-bench stand-ins: verdict | the "
            "papers' tasks: difference (tasks) | the papers' tasks: verdict |") in text
    claim = next(line for line in text.splitlines() if "+1.6 points over LoRA | dual - lora" in line)
    # each +-10.0 with a standard error of sqrt(2 / 3) = 0.8 (scores 1 point apart over 3 seeds)
    assert "| +10.0 ± 0.8 (bert / sentiment) | agrees in direction" in claim.replace(str(tiny_checkpoints["bert"]),
                                                                                    "bert")
    assert "| -10.0 ± 0.8 (" in claim and claim.endswith("| disagrees: dual behind by more than 2 standard errors; "
                                                         "the paper's figure is outside ours ± 2 standard errors |")
    # no generation task on either kind of data: nothing is pending, so the row says so rather than "not run yet"
    nlg = next(line for line in text.splitlines() if "E2E NLG, GPT-2: BLEU 70.6" in line)
    assert nlg.endswith("| – | no task of this kind among these experiments | – | no task of this kind among these "
                        "experiments |")


def test_best_baseline_is_among_the_methods_with_dual_loras_parameters(tiny_checkpoints, tiny_csv, tmp_path):
    config = comparison(tiny_checkpoints, tiny_csv)
    config.update(methods=["full", "lora", "lora-2r", "dora", "dual"], lr_grid=[0.01], seeds=[0, 1, 2])
    root = tmp_path / "experiments"
    experiment = experiments.load_experiment(write_experiment(root, "cmp", config))
    # full and lora-2r lead, but hold more trainable parameters than dual; dora is the best of lora and dora
    scores = {"full": 0.90, "lora-2r": 0.85, "dora": 0.70, "lora": 0.65, "dual": 0.75}
    for label, score in scores.items():
        for seed, shift in enumerate((-0.01, 0.0, 0.01)):
            fabricate(experiment, label, 0.01, seed, score + shift, kind="multiple_choice")
    shutil.copy(suite_template(), root / "report_template.md")
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    claim = next(line for line in text.splitlines() if "over the best baseline at its parameter count" in line)
    # 75.0 - 70.0, each ± 1.0 over 3 seeds: a standard error of sqrt(2 / 3) = 0.8
    assert "| +5.0 ± 0.8 (" in claim and "reviews.csv (vs dora)) | agrees in direction" in claim


def test_a_task_where_no_method_beats_the_majority_class_is_left_out_of_the_claims(tiny_checkpoints, tiny_csv,
                                                                                  tmp_path):
    config = comparison(tiny_checkpoints, tiny_csv)
    config.update(lr_grid=[0.01], seeds=[0, 1, 2])
    root = tmp_path / "experiments"
    experiment = experiments.load_experiment(write_experiment(root, "cmp", config))
    # majority 0.5 on 100 test examples: 2 standard errors = 200 sqrt(0.25 / 100) = 10 points, so up to 60.0 is noise
    for seed, (dual, lora) in enumerate([(0.56, 0.50), (0.58, 0.52), (0.60, 0.54)]):
        fabricate(experiment, "dual", 0.01, seed, dual)
        fabricate(experiment, "lora", 0.01, seed, lora)
    shutil.copy(suite_template(), root / "report_template.md")
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "Majority class (test): 50.0; a method shows learning beyond it above 60.0 (2 standard errors" in text
    assert "reviews.csv (best 58.0, majority class 50.0 + 10.0), where no method's test mean beats" in text
    claim = next(line for line in text.splitlines() if "+1.6 points over LoRA | dual - lora" in line)
    assert "| – | no task of this kind taught the methods anything measurable" in claim
    fabricate(experiment, "dual", 0.01, 2, 0.69)  # dual's mean is now 61.0: beyond the margin, the task counts
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "Left out: " not in text
    claim = next(line for line in text.splitlines() if "+1.6 points over LoRA | dual - lora" in line)
    assert "| +9.0 ± " in claim


def test_committed_results_match_their_configs_and_the_committed_report(tmp_path):
    """The repository's own experiments: every results file belongs to a planned run made with its config's options,
    and docs/RESULTS.md and the README's summary are what `duallora suite --report` builds from them now."""
    repo = Path(__file__).parents[1]
    for experiment in experiments.load_experiments(repo / "experiments"):
        planned = {run.name for run in experiments.plan(experiment, experiments.finished_runs(experiment))}
        assert set(experiments.read_results(experiment)) <= planned, experiment.name
    shutil.copytree(repo / "experiments", tmp_path / "experiments")
    shutil.copy(repo / "README.md", tmp_path / "README.md")
    assert main(["suite", "--root", str(tmp_path / "experiments"), "--report", "--docs-dir",
                 str(tmp_path / "docs")]) == 0
    stale = "is stale: rebuild it with `duallora suite --report` and commit it with the results"
    assert (tmp_path / "docs" / "RESULTS.md").read_text() == (repo / "docs" / "RESULTS.md").read_text(), \
        f"docs/RESULTS.md {stale}"
    assert (tmp_path / "README.md").read_text() == (repo / "README.md").read_text(), f"README.md's summary {stale}"


def zero_shot_experiment(tiny_checkpoints, **extra):
    return {"base": {"model": str(tiny_checkpoints["llama"]), "task": "social-iqa", "max_steps": 2, "batch_size": 4,
                     "max_length": 32, "max_eval_examples": 6, **extra},
            "methods": ["lora"], "lr_grid": [0.01], "seeds": [0], "zero_shot": True}


def test_zero_shot_scores_the_base_model_once_and_the_report_shows_it(tiny_checkpoints, bigbench_env, tmp_path,
                                                                     capsys):
    from duallora.app.evaluate import evaluate
    from duallora.app.run_config import RunConfig
    from duallora.app.train import base_parts

    root = tmp_path / "experiments"
    write_experiment(root, "mc", zero_shot_experiment(tiny_checkpoints))
    assert main(["suite", "--root", str(root), "--dry-run"]) == 0
    assert "zero-shot                            to run first (the base model, no training)" in capsys.readouterr().out
    calls = suite_in_process(["--root", str(root), "--runs-dir", str(tmp_path / "runs")])
    record = json.loads((root / "mc" / "results" / "zero-shot.json").read_text())
    model, tokenizer, task = base_parts(RunConfig(model=str(tiny_checkpoints["llama"]), task="social-iqa"))
    for split in ("validation", "test"):  # the same examples as the runs, scored by the untouched base model
        assert record[split] == evaluate(model, tokenizer, task, task.split(split)[:6], max_length=32)
    assert record["test_examples"] == 6 and set(record["baselines"]) == {"majority", "chance"}
    assert record["baselines"]["chance"] == {"social-iqa": pytest.approx(1 / 3)}
    assert [c[0] for c in calls] == ["lora-lr0.01-seed0"]  # the zero-shot row trains nothing
    shutil.copy(suite_template(), root / "report_template.md")
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    zero = f"{100 * record['test']['accuracy']:.1f}"
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert f"| zero-shot (base model) | – | 0 | – | {zero} | – |  |  |" in text  # the method's table
    assert f"| zero-shot (base model) | {zero} |" in text  # the headline
    assert "**Only 6 test examples**: one example is 16.7 points, so this task can separate methods only" in text
    assert " min zero-shot |" in text  # the budget table counts the scoring of the base model in the wall time
    # made once: a second suite run scores nothing again; a config that changes what it scored refuses it
    mtime = (root / "mc" / "results" / "zero-shot.json").stat().st_mtime_ns
    assert suite_in_process(["--root", str(root), "--runs-dir", str(tmp_path / "runs")]) == []
    assert (root / "mc" / "results" / "zero-shot.json").stat().st_mtime_ns == mtime
    (root / "mc" / "results" / "lora-lr0.01-seed0.json").unlink()  # the run's own file would be refused first
    write_experiment(root, "mc", zero_shot_experiment(tiny_checkpoints, max_eval_examples=8))
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err
    assert "zero-shot.json was made with other options" in err and "max_eval_examples: 6 there, 8 now" in err


def test_zero_shot_is_refused_for_a_classification_task(tiny_checkpoints, tmp_path, no_child, capsys):
    root = tmp_path / "experiments"
    config = zero_shot_experiment(tiny_checkpoints, task="rated-sentiment", model=str(tiny_checkpoints["bert"]))
    write_experiment(root, "cls", config)
    assert main(["suite", "--root", str(root), "--dry-run"]) == 2
    assert "zero_shot scores the base model untrained, but 'rated-sentiment' is a classification task" in \
        capsys.readouterr().err


def test_a_runs_command_line_makes_the_same_run(tiny_checkpoints, tiny_csv, tmp_path):
    """The report's "one run from a fresh clone" command, read back by the command line, gives the run's options."""
    import shlex

    from duallora.app.cli import build_parser, run_config
    from duallora.app.run_config import RunConfig, command_line

    config = comparison(tiny_checkpoints, tiny_csv)
    config["base"].update(bf16=True, gradient_checkpointing=False, max_eval_examples=1000,
                          r=4, alpha=12.5)
    experiment = experiments.load_experiment(write_experiment(tmp_path / "experiments", "cmp", config))
    cfg = experiments.Run(experiment, "dual", 0.02, 1).config()
    words = shlex.split(command_line(cfg))
    assert words[:2] == ["duallora", "train"] and "--bf16" in words and "--max-eval-examples" not in words  # default
    assert run_config(build_parser().parse_args(words[1:]), drop=("resume", "overwrite")) == cfg
    assert "--target-parameters experts.w,experts.v" in command_line(RunConfig(target_parameters=["experts.w",
                                                                                               "experts.v"]))
    uncapped = RunConfig(max_eval_examples=None)  # every example scored: the flag reads "none"
    assert command_line(uncapped) == "duallora train --max-eval-examples none"
    assert run_config(build_parser().parse_args(["train", "--max-eval-examples", "none"]),
                      drop=("resume", "overwrite")) == uncapped


def test_a_mix_gets_a_table_per_task_with_its_zero_shot_chance_and_majority_rows(tiny_checkpoints, tiny_csv,
                                                                                 tmp_path):
    config = comparison(tiny_checkpoints, tiny_csv)
    config.update(lr_grid=[0.01], seeds=[0, 1])
    root = tmp_path / "experiments"
    experiment = experiments.load_experiment(write_experiment(root, "mix", config))
    for label, per_task in (("dual", {"a": 0.8, "b": 0.4}), ("lora", {"a": 0.6, "b": 0.5})):
        for seed in (0, 1):
            fabricate(experiment, label, 0.01, seed, sum(per_task.values()) / 2, kind="multiple_choice")
            path = experiments.Run(experiment, label, 0.01, seed).results_path
            record = json.loads(path.read_text())
            record["test"].update({f"accuracy/{t}": v for t, v in per_task.items()})
            record["baselines"] = {"majority": {"a": 0.5, "b": 0.3}, "chance": {"a": 0.5, "b": 0.25}}
            path.write_text(json.dumps(record))
    shutil.copy(suite_template(), root / "report_template.md")
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| method | a | b | mean |" in text
    assert "| dual | **80.0 ± 0.0** | 40.0 ± 0.0 | **60.0 ± 0.0** |" in text  # the best of each column in bold
    assert "| lora | 60.0 ± 0.0 | **50.0 ± 0.0** | 55.0 ± 0.0 |" in text
    assert "| majority (no model) | 50.0 | 30.0 | 40.0 |" in text
    assert "| chance (no model) | 50.0 | 25.0 | 37.5 |" in text
    assert "| accuracy/a" not in text  # the per-task scores are not columns of the method table


def test_every_run_on_the_papers_tasks_is_one_command_on_data_the_index_serves():
    """A fresh clone without the BIG-bench archive can make any row of these experiments: each run's command
    parses back to its options, and its task's source is one the package index serves (test_real_sources.py checks
    that the index still serves it)."""
    import shlex

    from duallora.app.catalog import fetchable
    from duallora.app.claims import PAPERS_TASKS, data_family
    from duallora.app.cli import build_parser, run_config
    from duallora.app.results import collect
    from duallora.app.run_config import command_line
    from duallora.app.tasks import registry

    repo = Path(__file__).parents[1]
    papers = [e for e in experiments.load_experiments(repo / "experiments")
              if data_family(collect(e)) == PAPERS_TASKS]
    assert {e.name for e in papers} == {"commonsense-eight", "nlu-sst2", "nlu-mrpc", "nlu-rte", "nlu-rated-sentiment"}
    for experiment in papers:
        assert fetchable(registry()[experiment.base["task"]]), experiment.name
        for run in experiments.plan(experiment, {}):
            cfg = experiments.Run(experiment, run.label, run.lr or experiment.lr_grid[0], run.seed).config()
            argv = shlex.split(command_line(cfg))[1:]
            assert run_config(build_parser().parse_args(argv), drop=("resume", "overwrite")) == cfg, run.name
