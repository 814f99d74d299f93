#!/usr/bin/env bash
# The test command: installs what the tests need, then checks formatting, lints, and runs every
# test against real PostgreSQL, Redis and S3 (moto) servers that the harness starts on random ports.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# A clean CI clone builds once: incremental state would only add gigabytes to target/.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
export MOTO_SERVER="$PWD/${MOTO_VENV:-target/moto-venv}/bin/moto_server"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run the real binaries.
cargo build --workspace --bins
cargo test --workspace
for f in policies/*.toml; do
  target/debug/lifeboat policy check --allow-missing-env "$f"
done
# The example policies also satisfy the JSON Schema editors get from `lifeboat policy schema`.
target/debug/lifeboat policy schema > target/policy.schema.json
"${MOTO_VENV:-target/moto-venv}/bin/check-jsonschema" --schemafile target/policy.schema.json policies/*.toml
# Alert rules are well-formed and every runbook link resolves (moto's venv has PyYAML).
"${MOTO_VENV:-target/moto-venv}/bin/python" scripts/check-deploy.py
