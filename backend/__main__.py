"""`python -m backend`: see backend.cli."""

from backend.cli import main

main(prog_name="python -m backend")
