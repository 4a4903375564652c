#!/bin/sh
# Run once by the postgres image's entrypoint (/docker-entrypoint-initdb.d), on an empty
# data directory, as the superuser POSTGRES_USER (argus). Creates the owner role that
# runs the migrations (argus_owner: LOGIN, CREATEROLE for the service roles migration
# 0007 creates, no superuser), hands it database argus, and lets clients in over TLS
# only (hostssl, scram-sha-256). The services' roles and their passwords come later, from
# `argus-schema migrate` and `argus-schema passwords` (the migrate service).
set -eu
: "${POSTGRES_OWNER_PASSWORD:?set POSTGRES_OWNER_PASSWORD}"
psql -v ON_ERROR_STOP=1 -v pw="$POSTGRES_OWNER_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE argus_owner LOGIN CREATEROLE NOSUPERUSER NOCREATEDB PASSWORD :'pw';
ALTER DATABASE argus OWNER TO argus_owner;
SQL
# Network logins: TLS only. The image's catch-all "host all all all" line becomes hostssl.
sed -i 's/^host[[:space:]]\+all[[:space:]]\+all[[:space:]]\+all/hostssl all all all/' "$PGDATA/pg_hba.conf"
