"""`python -m apertis_proxy.cli ...` runs the operator command line."""
import sys

from . import main

sys.exit(main())
