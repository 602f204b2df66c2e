from luna.cli import run_cli
from luna.training.app import main

raise SystemExit(run_cli(main))
