"""``python -m hf_lowrank.cli``: the ``hf-lowrank`` command."""

import sys

from . import main

sys.exit(main())
