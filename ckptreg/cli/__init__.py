"""The ``ckptreg`` command line: a thin layer that parses, calls the library and formats.

Subcommands live in sibling modules (registry_cmds, merge_cmds, demo_cmd); none of them imports
torch at module level, so ``ckptreg add`` stays fast.
"""
from __future__ import annotations

import functools
import sys

import click

from ..errors import CkptregError


class CkptregGroup(click.Group):
    """A click group whose commands turn CkptregError into 'error: ...' and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CkptregError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=CkptregGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExample:\n  ckptreg add out/checkpoint-500 --run sft --metric train_loss=0.91\n  ckptreg merge --run sft --last 5 --method mwa --metric train_loss --penalty 0.7")
@click.option("--db", "db", envvar="CKPTREG_DB", default=None, metavar="PATH|URL",
              help="Registry: a DuckDB file (default ./ckptreg.duckdb) or a PostgreSQL database "
                   "postgresql://USER@HOST:PORT/DBNAME (password in ~/.pgpass or PGPASSWORD; "
                   "needs ckptreg[postgres]); env CKPTREG_DB.")
@click.option("--force-local-locks", "force_local_locks", is_flag=True, envvar="CKPTREG_FORCE_LOCAL_LOCKS",
              help="Open a .duckdb registry on a network filesystem (NFS, SMB, sshfs, ...) anyway, "
                   "where file locks do not keep two machines apart: only if one process on one "
                   "machine ever opens it (env CKPTREG_FORCE_LOCAL_LOCKS=1).")
@click.version_option(package_name="ckptreg")
@click.pass_context
def main(ctx, db, force_local_locks):
    """ckptreg: register checkpoints from any training loop; merge them (MWA, TIES, DARE, SLERP, CART,
    TSV-M, Iso-C, STAR, KnOTS, ...: `ckptreg methods` lists all)."""
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    ctx.obj["force_local_locks"] = bool(force_local_locks)


def pass_db(f):
    """Decorator: pass the --db value (or None for the default) as the first argument."""

    @click.pass_context
    @functools.wraps(f)
    def wrapper(ctx, *args, **kwargs):
        root = ctx.find_root()
        db = (root.obj or {}).get("db")
        return f(db, *args, **kwargs)

    return wrapper


def force_local_locks() -> bool:
    """The ``--force-local-locks`` flag of the running command (False outside one): every
    ``Registry`` the CLI builds gets it (``Registry(db, force_local_locks=...)``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    return bool((ctx.find_root().obj or {}).get("force_local_locks"))


def _register_subcommands():
    import importlib

    for mod in ("registry_cmds", "merge_cmds", "demo_cmd"):
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a module not written yet must not break the others
            if e.name == f"{__name__}.{mod}":
                continue
            raise
        for cmd in getattr(m, "COMMANDS", []):
            main.add_command(cmd)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
