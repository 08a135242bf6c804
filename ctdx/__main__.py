"""``python -m ctdx``: the ``ctdx`` command."""

from ctdx.cli import main

main()
