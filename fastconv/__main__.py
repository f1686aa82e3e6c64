"""``python -m fastconv`` is the ``fastconv`` command."""

from .cli import main

raise SystemExit(main())
