"""The docs check's fast set inside the suite, so CI runs it: the data guide's walkthrough
(``docs_check.CI_PAGES``) runs as written in a fresh copy of the
repository, and every command prints exactly the output its page shows (figures included;
``≈`` marks a measured one). The other pages need the demo's runs and take about 20 minutes:
``make docs-check`` runs them before each release."""

import json

import pytest

from tests.test_docs import docs_check


@pytest.mark.timeout(900)  # about a minute on an idle 2-core machine; margin for a loaded one
def test_the_fast_pages_run_as_written_and_print_what_they_show(tmp_path):
    assert docs_check.CI_PAGES == docs_check.SETS["ci"]
    blocks = docs_check.page_blocks(docs_check.CI_PAGES)
    data = [c.text.split()[1] for b in blocks if b.page == "docs/data.md" for c in b.commands
            if c.text.startswith("megasmol")]
    assert data == ["demo-corpus", "prepare-data", "prepare-data", "data-audit", "train"]
    shown = [c for b in blocks if b.check_output for c in b.commands if c.shown]
    assert len(shown) >= 2  # the data-audit table and the training result
    workspace = docs_check.prepare_workspace(tmp_path)
    assert docs_check.run_blocks(blocks, workspace, timeout_s=600, echo=lambda _: None) == []
    result = json.loads((workspace / "runs" / "mydata" / "run" / "result.json").read_text())
    assert result["last_step"] == 20
    for name in ("prose", "code"):
        assert (workspace / "runs" / "mydata" / f"{name}.idx").is_file()
