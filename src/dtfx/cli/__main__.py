"""``python -m dtfx.cli``: the same as the ``dtfx`` command."""

from dtfx.cli import main

main()
