"""``python -m hpcfl`` entry point."""

from hpcfl.cli import main

raise SystemExit(main())
