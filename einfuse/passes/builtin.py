"""Importing this module registers every built-in pass with the pass manager."""

import einfuse.passes.chunk_collective
import einfuse.passes.dce
import einfuse.passes.defer
import einfuse.passes.fold_scale
import einfuse.passes.fuse
import einfuse.passes.partition
import einfuse.passes.prune_heads
import einfuse.passes.prune_tokens
import einfuse.passes.reorder_norm
import einfuse.passes.sink_casts
import einfuse.passes.split_tokens
import einfuse.passes.unify_ranks  # noqa: F401
