"""``megasmol preflight``: is this node (and this job) fit to train? One command, one exit code."""
