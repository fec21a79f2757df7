"""`python -m tune ...` is `tune ...`."""
import sys

from tune.cli import main

sys.exit(main())
