"""``python -m sdsopt.lab``: the harness's command line (:func:`sdsopt.lab.cli.main`)."""

from .cli import main

main()
