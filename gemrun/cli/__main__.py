"""`python -m gemrun.cli`."""

from . import main

main()
