"""``python -m factory.cli``: the ``factory`` command."""

from factory.cli.app import main

main()
