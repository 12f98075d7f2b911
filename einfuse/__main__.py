"""`python -m einfuse`: the same as the `einfuse` command."""

from einfuse.cli import main

raise SystemExit(main())
