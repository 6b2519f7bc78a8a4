"""Ablations as a workflow: grids of runs, comparison against seed noise and evaluation-task
quality, checkpoint averaging and merging. It drives runs and reads their logs; annealing
branches are a run-config feature (``checkpoint.branch_from``)."""
