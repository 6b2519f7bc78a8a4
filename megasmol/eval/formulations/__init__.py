"""How an example becomes requests and the model's answers become metrics: one object per kind
(``choice``: cf, mcf, bpb, partial, requests; ``generation``: fg; ``code``), found by a task
YAML's ``formulation:`` name in ``registry``. The runner calls their methods and names none."""
