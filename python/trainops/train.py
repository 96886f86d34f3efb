"""``python -m trainops.train [--config file.yaml] [--key value ...]``: same as ``trainops train``."""
import sys

from trainops.runtime.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
