"""`python -m node`: the expertmesh command."""

import sys

from node.cli import main

sys.exit(main())
