#!/usr/bin/env bash
# Sourced by the launch scripts: `run CMD...` runs CMD, or with DRY_RUN=1 prints it
# (shell-quoted, one line) so a test or a careful user can see exactly what would run.
DRY_RUN="${DRY_RUN:-0}"

run() {
    if [[ "${DRY_RUN}" == "1" ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}
