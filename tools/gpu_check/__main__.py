"""``python -m tools.gpu_check``: the GPU check (see :mod:`tools.gpu_check.check`)."""

import sys

from tools.gpu_check.check import main, probe  # noqa: F401  (probe: the versions stage)

if __name__ == "__main__":
    sys.exit(main())
