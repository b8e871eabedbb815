-- reldl's catalog: plain DuckDB tables in the `reldl` schema, so models persist with the database file
-- and are visible to any SQL client.
CREATE SCHEMA IF NOT EXISTS reldl;

CREATE TABLE IF NOT EXISTS reldl.models (
    name        VARCHAR PRIMARY KEY,
    model_type  VARCHAR NOT NULL,
    path        VARCHAR,
    options     JSON NOT NULL,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);
