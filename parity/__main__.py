"""`python -m sd_parity` is the `parity` command."""
import sys

from .cli import main

sys.exit(main())
