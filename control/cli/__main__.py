"""``python -m control.cli``: the same as ``toolplane``."""

from control.cli.app import main

main()
