"""``python -m longgen`` (and ``torchrun --nproc-per-node N -m longgen generate ...``): the ``longgen`` command."""

import sys

from longgen.cli import main

if __name__ == "__main__":
    sys.exit(main())
