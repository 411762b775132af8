"""`python -m kdflow.cli`: the same as the `kdflow` command."""

import sys

from kdflow.cli.commands import main

sys.exit(main())
