"""``python -m ckptreg ...``: the same command line as the ``ckptreg`` script."""
from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="ckptreg")
