"""`python -m hf_longattn.eval ...` is the `hf-longattn` command."""

import sys

from .cli import main

sys.exit(main())
