"""Walkthroughs of docs/ run as written inside the suite (``make docs-check`` runs every page;
this keeps the self-contained data walkthrough from rotting between those runs): documents to
tokens, a recipe, the audit and a short training run, in an empty directory."""

import json

from tests.test_docs import docs_check


def test_the_data_walkthrough_runs_as_written(tmp_path):
    blocks = docs_check.page_blocks(["docs/data.md"])
    commands = [c.text.split()[1] for b in blocks for c in b.commands if c.text.startswith("megasmol")]
    assert commands == ["demo-corpus", "prepare-data", "prepare-data", "data-audit", "train"]
    assert docs_check.run_blocks(blocks, tmp_path, timeout_s=600, echo=lambda _: None) == []
    result = json.loads((tmp_path / "runs" / "mydata" / "run" / "result.json").read_text())
    assert result["last_step"] == 20
    for name in ("prose", "code"):
        assert (tmp_path / "runs" / "mydata" / f"{name}.idx").is_file()
