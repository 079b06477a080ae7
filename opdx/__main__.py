"""python -m opdx <command> ...  (same as the `opdx` console command)."""

from opdx.cli import main

raise SystemExit(main())
