"""`python -m portal.cli`: the pilotfish command."""
from . import main

main(prog_name="pilotfish")
