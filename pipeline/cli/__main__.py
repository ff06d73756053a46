"""``python -m pipeline.cli``: the ``dreamshard`` command."""

import sys

from pipeline.cli.main import main

sys.exit(main())
