"""``python -m engm_opacus`` runs the ``engm-opacus`` command line."""

import sys

from engm_opacus.cli import main

sys.exit(main())
