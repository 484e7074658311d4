"""`python -m apertis_proxy ...` runs the operator command line."""
import sys

from .cli import main

sys.exit(main())
