"""Host buffers that Python-driven loops reuse between device calls.

A decode or search loop keeps small NumPy buffers (tokens, positions, page tables, which rows
are live) and writes them in place between steps. `to_device` is how such a buffer reaches the
device: search.tree and kvcache.paged use it; a buffer built fresh for one call and never written
again may go through jnp.asarray as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_device(x: np.ndarray) -> jax.Array:
  """A device array of x's value now, for a host buffer that is written again afterwards.

  jnp.asarray and jnp.array alike (jnp.array(ndarray) does not copy on the host), and a jitted
  function called with the ndarray, hand the NumPy buffer itself to the transfer, which on CPU
  may read it after the call returned, while an asynchronously dispatched step still runs: a
  later in-place write then reaches the device (seen in search.tree: `live` cleared for rows that
  had just ended their step, so they kept stale logits and the next step sampled its first token
  from them). The transfer gets a private copy that nobody writes."""
  return jnp.asarray(np.array(x, copy=True))
