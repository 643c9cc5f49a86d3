"""``python -m spade_faiss`` runs the command line (same as ``spade-faiss``)."""

import sys

from .apps.cli import main

sys.exit(main())
