"""`python -m service ...` is the `staticmoe` console script."""

import sys

from service.cli import main

sys.exit(main())
