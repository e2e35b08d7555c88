"""The command line and the evidence, on top of the library: runs, models, tasks, evaluation, compare, suite,
report, inspect. Needs the ``cli`` extra."""
