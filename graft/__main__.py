"""``python -m graft`` (and ``torchrun -m graft``): the same entry point as the ``graft`` command."""

from graft.cli import main

__all__: list[str] = []  # a script: nothing to import from it

main()
