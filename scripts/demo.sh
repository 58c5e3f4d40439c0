#!/usr/bin/env bash
# Set up (first time only) and run the demo on the embedded defaults: SQLite state under
# $FACTORY_HOME (default ~/.factory), a local Ray, no server to install.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" ""
factory run examples/doc_report/workflow.yaml --input out=report.md "$@"
echo "the report is in $ROOT/report.md; see the run with: .venv/bin/factory runs" >&2
