"""``python -m trainops.rl [--config file.yaml] [--key value ...]``: same as ``trainops rl``."""
import sys

from trainops.runtime.cli import rl_main

if __name__ == "__main__":
    sys.exit(rl_main())
