"""The registry's schema: DDL and migrations, and the column lists every checkpoint query uses.

Backend-neutral SQL where the engines agree; the DDL is written in DuckDB's dialect (a driver for
another engine maps the few types that differ: see the package docstring).
"""
from __future__ import annotations

SCHEMA_VERSION = 4

#: Migration steps: (version, [statements]). Applied in order, all pending ones in one transaction.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE SEQUENCE IF NOT EXISTS checkpoint_id_seq START 1",
        "CREATE SEQUENCE IF NOT EXISTS metric_seq START 1",
        "CREATE SEQUENCE IF NOT EXISTS merge_id_seq START 1",
        """CREATE TABLE runs (
            name VARCHAR PRIMARY KEY,
            created TIMESTAMP NOT NULL,
            tags JSON,
            meta JSON)""",
        """CREATE TABLE checkpoints (
            id BIGINT PRIMARY KEY,
            run VARCHAR NOT NULL,
            step BIGINT,                -- NULL for merged checkpoints
            name VARCHAR,               -- NULL for plain checkpoints
            path VARCHAR NOT NULL,
            format VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,      -- lora | full
            base_model VARCHAR,
            n_tensors BIGINT NOT NULL,
            n_params BIGINT NOT NULL,
            nbytes BIGINT NOT NULL,
            fingerprint VARCHAR NOT NULL,
            created TIMESTAMP NOT NULL,
            tags JSON,
            lora JSON,
            merged BOOLEAN NOT NULL,
            files JSON,                 -- [{"path", "size", "mtime_ns"}] in inspect order
            config_files JSON)""",
        "CREATE UNIQUE INDEX checkpoints_run_step ON checkpoints(run, step)",
        "CREATE UNIQUE INDEX checkpoints_run_name ON checkpoints(run, name)",
        """CREATE TABLE metrics (
            seq BIGINT NOT NULL,
            checkpoint_id BIGINT NOT NULL,
            name VARCHAR NOT NULL,
            value DOUBLE,               -- NaN and +-inf are facts and are kept
            step BIGINT,
            logged TIMESTAMP NOT NULL)""",
        "CREATE INDEX metrics_checkpoint ON metrics(checkpoint_id)",
        """CREATE TABLE tensors (
            checkpoint_id BIGINT NOT NULL,
            name VARCHAR NOT NULL,
            shape BIGINT[] NOT NULL,
            dtype VARCHAR NOT NULL,
            file VARCHAR NOT NULL,
            "offset" BIGINT NOT NULL,
            nbytes BIGINT NOT NULL)""",
        """CREATE TABLE merges (
            id BIGINT PRIMARY KEY,
            checkpoint_id BIGINT NOT NULL UNIQUE,
            method VARCHAR NOT NULL,
            params JSON,
            base_id BIGINT,
            created TIMESTAMP NOT NULL)""",
        """CREATE TABLE merge_inputs (
            merge_id BIGINT NOT NULL,
            input_id BIGINT NOT NULL,
            position INTEGER NOT NULL,
            weight DOUBLE)""",
        "CREATE INDEX merge_inputs_merge ON merge_inputs(merge_id)",
    ]),
    # 2: a `latest` flag per (checkpoint, metric name) so "best by metric" and metric loading are
    # plain filtered scans instead of an arg_max aggregation over the whole history.
    (2, [
        "DROP INDEX metrics_checkpoint",  # DuckDB cannot ALTER a table that has indexes
        "ALTER TABLE metrics ADD COLUMN latest BOOLEAN DEFAULT true",
        """UPDATE metrics SET latest = (seq = (SELECT max(m2.seq) FROM metrics m2
            WHERE m2.checkpoint_id = metrics.checkpoint_id AND m2.name = metrics.name))""",
        "CREATE INDEX metrics_checkpoint ON metrics(checkpoint_id)",
    ]),
    # 3: per-file hashes of every byte ({path: hash}, formats.fingerprint([f], full=True)),
    # recorded at `add --full-hash` or by the first `verify --full`; NULL until then.
    (3, [
        "DROP INDEX checkpoints_run_step",  # (older DuckDBs cannot ALTER a table with indexes)
        "DROP INDEX checkpoints_run_name",
        "ALTER TABLE checkpoints ADD COLUMN full_hash JSON",
        "CREATE UNIQUE INDEX checkpoints_run_step ON checkpoints(run, step)",
        "CREATE UNIQUE INDEX checkpoints_run_name ON checkpoints(run, name)",
    ]),
    # 4: the system of record. Merged names are versioned (RUN@NAME is the newest version,
    # RUN@NAME:vK a given one), user aliases point RUN@ALIAS at a checkpoint, and every change of
    # the registry is an append-only event (who, where, when, what). `runs.params` holds a run's
    # hyperparameters (TrainingArguments, Lightning hparams, git commit) once per run.
    (4, [
        "DROP INDEX checkpoints_run_step",
        "DROP INDEX checkpoints_run_name",
        "ALTER TABLE checkpoints ADD COLUMN version INTEGER DEFAULT 1",
        "UPDATE checkpoints SET version = 1",
        "CREATE UNIQUE INDEX checkpoints_run_step ON checkpoints(run, step)",
        "CREATE UNIQUE INDEX checkpoints_run_name ON checkpoints(run, name, version)",
        "ALTER TABLE runs ADD COLUMN params JSON",
        "CREATE SEQUENCE IF NOT EXISTS event_seq START 1",
        """CREATE TABLE aliases (
            run VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            checkpoint_id BIGINT NOT NULL,
            created TIMESTAMP NOT NULL,
            PRIMARY KEY (run, name))""",
        """CREATE TABLE events (
            seq BIGINT PRIMARY KEY,
            time TIMESTAMP NOT NULL,
            op VARCHAR NOT NULL,        -- add | log | replace | rm | alias | tag | gc | merge | ...
            run VARCHAR,
            checkpoint_id BIGINT,
            ref VARCHAR,                -- the checkpoint's ref when the event happened
            detail JSON,
            host VARCHAR,
            "user" VARCHAR,
            pid INTEGER)""",
    ]),
]


#: Every table a usable registry has (``Registry.check`` looks for each).
TABLES = ("schema_version", "runs", "checkpoints", "metrics", "tensors", "merges", "merge_inputs",
          "aliases", "events")

_CK_COLS = ("id, run, step, name, path, format, kind, base_model, n_tensors, n_params, nbytes, "
            "fingerprint, created, tags, lora, merged, files, config_files")

#: What checkpoint queries select: the inserted columns plus the version of a merged name
#: (a separate constant: _CK_COLS is also the INSERT column list).
_CK_SEL = _CK_COLS + ", version"


class SchemaChecks:
    """What both drivers say about a database's schema (``self.location``: the path or masked URL
    the messages name; ``self.table_names(con)``: the driver's catalogue query)."""

    def check_tables(self, con) -> None:
        """FormatError naming the first table of :data:`TABLES` the database lacks (checked with
        the schema version, i.e. once per change of the database by someone else)."""
        from ..errors import FormatError

        present = self.table_names(con)
        for t in TABLES:
            if t not in present:
                raise FormatError(f"{self.location}: not a usable ckptreg registry: table {t} missing")

    def too_new(self, have: int):
        from ..errors import FormatError

        return FormatError(f"registry {self.location} has schema version {have}, newer than this "
                           f"ckptreg understands ({SCHEMA_VERSION}); upgrade ckptreg")
