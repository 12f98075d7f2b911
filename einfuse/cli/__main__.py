"""`python -m einfuse.cli`."""

from einfuse.cli import main

raise SystemExit(main())
