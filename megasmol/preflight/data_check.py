"""The run's data, checked before the job starts: the same audit as ``megasmol data-audit``
(every dataset the recipe names exists and is complete, its token ids fit the model's vocabulary,
its documents end with the model's EOS, and how many epochs each stage draws). An audit error is
a FAIL: a job whose inputs are missing or wrong must not get GO."""

from __future__ import annotations

from megasmol.preflight.report import CheckResult, skipped


def data_audit(config, planning_another_job: bool) -> list[CheckResult]:
    if config is None:
        return [skipped("data_audit", "no --config given", "data")]
    if planning_another_job:
        return [skipped("data_audit", "--world-size dry-runs another job's config; run "
                        "`megasmol data-audit --config ...` where its data is", "data")]
    from megasmol.data.audit import audit_run

    try:
        report = audit_run(config)
    except (OSError, ValueError) as exc:  # an unreadable recipe or index is the finding
        return [CheckResult("data_audit", "fail", str(exc), "data")]
    rows = [CheckResult("data_audit", "fail", error, "data") for error in report.errors]
    rows += [CheckResult("data_audit", "warn", warning, "data") for warning in report.warnings]
    if not rows:
        tokens = sum(row.tokens_available for row in report.rows)
        prefixes = len({row.prefix for row in report.rows})
        rows.append(CheckResult("data_audit", "pass",
                                f"{prefixes} dataset(s), {tokens:,} tokens: all present, ids within "
                                "the vocabulary, EOS as the model's", "data",
                                {"datasets": prefixes, "tokens": tokens}))
    return rows
