"""Importing this module registers every built-in pass with the pass manager."""

import einfuse.passes.dce
import einfuse.passes.defer
import einfuse.passes.fuse  # noqa: F401
from einfuse.passes import partition  # noqa: F401
