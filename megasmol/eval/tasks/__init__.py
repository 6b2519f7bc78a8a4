"""What is scored: task definitions (``spec``), the examples they yield (``task``, ``shipped``,
``embedded``), the names ``--tasks`` accepts (``registry``), suites and ``megasmol eval list``
(``catalog``). The layer below the formulations, the scorers and the runner."""
