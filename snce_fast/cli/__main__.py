"""`python -m snce_fast.cli`: same as the `snce-fast` command."""
import sys

from . import main

sys.exit(main())
