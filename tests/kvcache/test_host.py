"""kvcache.host.to_device: the device array keeps the host buffer's value at the call, whatever
is written into the buffer afterwards."""

import jax
import numpy as np

from kvcache.host import to_device


def test_to_device_keeps_the_value_at_the_call():
  seed = 3
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  for x in (rng.integers(-9, 9, (4, 8)).astype(np.int32), rng.random(16) < 0.5,
            rng.standard_normal((3, 5)).astype(np.float32)):
    then = x.copy()
    dev = to_device(x)
    assert isinstance(dev, jax.Array) and dev.dtype == x.dtype and dev.shape == x.shape
    x[...] = np.roll(x, 1)  # written while a step could still read the transfer
    x.fill(x.flat[0])
    np.testing.assert_array_equal(np.asarray(dev), then)
    assert not np.shares_memory(np.asarray(dev), x)
