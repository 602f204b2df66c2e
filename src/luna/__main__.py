"""``python -m luna <command>``: the same as the ``luna`` command (`luna.cli.main`)."""

from luna.cli import main

raise SystemExit(main())
