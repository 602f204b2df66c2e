"""``python -m luna.evaluate``: LUNA16 FROC / CPM and malignancy ROC (see `luna.evaluation`)."""

import sys

from luna.cli import run_cli
from luna.evaluation import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
