"""``python -m experiments.sweep`` (``experiments.sweep.command``)."""
import sys

from experiments.sweep.command import main

sys.exit(main())
