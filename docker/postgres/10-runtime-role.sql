-- The database role the control process connects as: LOGIN and nothing else.
--
-- The postgres image runs this file once, when it initialises an empty data directory
-- (it is mounted into /docker-entrypoint-initdb.d), as POSTGRES_USER: the owner, as whom
-- `toolplane migrate` runs the migrations. This only creates the role, with the password
-- in the file that RUNTIME_PASSWORD_FILE names; migrate names the role in
-- TOOLPLANE_RUNTIME_DATABASE_URL and grants it what the control may do after every
-- upgrade (ledger/roles.py), and refuses it if it can do more. The name is the one
-- toolplane derives from the database's, `<POSTGRES_DB>_runtime`.
--
-- A data directory initialised before this file existed never runs it: run it by hand,
-- docker compose -f docker/compose.yaml exec postgres \
--     psql -U toolplane -d toolplane -f /docker-entrypoint-initdb.d/10-runtime-role.sql
\set ON_ERROR_STOP on
\set runtime_password `cat "$RUNTIME_PASSWORD_FILE"`
CREATE ROLE toolplane_runtime WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    NOBYPASSRLS PASSWORD :'runtime_password';
