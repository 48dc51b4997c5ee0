#!/bin/sh
# Random secrets for compose.yaml, made once in ./secrets (existing files are kept).
# SECURITY: the files are bind-mounted into non-root containers, so they must be readable by
# other users (0644); the directory itself is 0700 so that no other host user can traverse it.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
chmod 0700 secrets
for name in jwt_secret session_secret metrics_token grafana_admin_password; do
  if [ ! -s "secrets/$name" ]; then
    python3 -c 'import secrets; print(secrets.token_hex(32))' > "secrets/$name"
  fi
  chmod 0644 "secrets/$name"
done
echo "secrets in $(pwd)/secrets"
