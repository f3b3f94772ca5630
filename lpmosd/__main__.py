"""``python -m lpmosd``."""

import sys

from lpmosd.cli import main

sys.exit(main())
