"""``python -m sdsopt.ablate``: the former name of ``python -m sdsopt.lab`` (:mod:`sdsopt.lab.cli`), kept as an
alias.  The library never imports this module."""

from .lab.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
