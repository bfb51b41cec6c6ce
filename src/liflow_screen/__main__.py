"""``python -m liflow_screen <stage>``: the same CLI as the ``liflow-screen`` script."""

import sys

from .cli import main

sys.exit(main())
