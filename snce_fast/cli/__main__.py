"""`python -m snce_fast.cli`: same as the `snce-fast` command."""
import sys

from snce_fast.cli import main

sys.exit(main())
