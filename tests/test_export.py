"""The torchvision export: the inverse of the port, loaded strictly by torchvision, giving the run's probabilities."""
import numpy as np
import pytest

from cifarjax import torchlib
from cifarjax.augment import with_normalization
from cifarjax.config import Config
from cifarjax.errors import UserError
from cifarjax.export import export_torchvision, torchvision_state_dict
from cifarjax.predictor import Run
from cifarjax.pretrained import convert_state_dict
from tests.helpers import randomized_torchvision_resnet18

try:
    torch, torchvision = torchlib.load("torch"), torchlib.load("torchvision")
except UserError as broken:  # a missing or mismatched pair: skipped with the fix
    pytest.skip(f"needs torch and torchvision: {broken}", allow_module_level=True)


def test_port_then_export_gives_back_torchvisions_state_dict_bit_for_bit():
    reference = randomized_torchvision_resnet18(num_classes=3, seed=1).state_dict()
    ported = convert_state_dict(reference)
    exported = torchvision_state_dict(ported)
    assert set(exported) == set(reference)
    for key, value in reference.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    again = convert_state_dict(exported)  # export -> port is exact too
    for collection in ("params", "batch_stats"):
        np.testing.assert_equal(again[collection], ported[collection])


def test_an_exported_run_loads_strictly_and_gives_the_runs_probabilities(tmp_path, rng):
    variables = convert_state_dict(randomized_torchvision_resnet18(num_classes=3, seed=2).state_dict())
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    config = with_normalization(Config(model="resnet18", unfreeze="head", classes=("a", "b", "c"),
                                       normalize="imagenet", conv_impl="xla"), images)
    run = Run(tmp_path, config, variables, average=False)
    path = export_torchvision(run, tmp_path / "exported.pth")
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    model.eval()
    x = (images / np.float32(255) - np.array(config.norm_mean, np.float32)) / np.array(config.norm_std, np.float32)
    with torch.no_grad():
        theirs = torch.softmax(model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))), -1).numpy()
    # Both sides are float32 through 20 convolutions summed in different orders (oneDNN; XLA's here, which the CPU's
    # own formulations equal to rounding: tests/test_models.py): logits agree to a few 1e-6 relative, so
    # probabilities, which are at most 1, to 1e-5.
    np.testing.assert_allclose(run.predict(images), theirs, atol=1e-5)


def test_export_refuses_a_simplecnn_run_and_never_replaces_a_file(tmp_path):
    with pytest.raises(UserError, match="is a simple_cnn run; export writes torchvision ResNet-18"):
        export_torchvision(Run(tmp_path, Config(), {}, average=False), tmp_path / "cnn.pth")
    taken = tmp_path / "mine.pth"
    taken.write_text("the user's")
    variables = convert_state_dict(randomized_torchvision_resnet18(num_classes=3).state_dict())
    with pytest.raises(UserError, match="already exists; export never replaces a file"):
        export_torchvision(Run(tmp_path, Config(model="resnet18", num_classes=3), variables, False), taken)
    assert taken.read_text() == "the user's"
