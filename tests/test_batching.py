import numpy as np
import pytest

from cifarjax.data import eval_indices, per_device, train_indices
from cifarjax.errors import UserError


@pytest.mark.parametrize("n_devices", [1, 2])
@pytest.mark.parametrize("n,batch", [(10, 4), (7, 8), (1, 4), (100, 32), (33, 2)])
def test_eval_batches_cover_every_example_exactly_once(n, batch, n_devices):
    idx, mask = eval_indices(n, batch, n_devices)
    assert idx.shape == mask.shape and idx.shape[1] == n_devices
    np.testing.assert_array_equal(np.sort(idx[mask]), np.arange(n))


def test_train_batches_shape_order_and_drop_last():
    idx = train_indices(70, 16, 2, seed=0, epoch=0)
    assert idx.shape == (4, 2, 8)
    assert len(set(idx.ravel())) == 64
    np.testing.assert_array_equal(idx, train_indices(70, 16, 2, seed=0, epoch=0))
    assert not np.array_equal(idx, train_indices(70, 16, 2, seed=0, epoch=1))
    # the same global order whatever the device count
    np.testing.assert_array_equal(idx.reshape(4, 16), train_indices(70, 16, 1, 0, 0).reshape(4, 16))


def test_batch_must_split_over_devices():
    with pytest.raises(UserError, match="multiple of 2"):
        per_device(7, 2)
    with pytest.raises(UserError, match="larger than the 10 training images"):
        train_indices(10, 16, 1, 0, 0)
