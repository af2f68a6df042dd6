import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax.errors import UserError
from cifarjax.models import ResNet18, _jitted_init, formulations_for
from cifarjax.pretrained import (IMAGENET_FILE, _expected_shapes, _torch_key, imagenet_resnet18,
                                 resnet18_from_torchvision)
from tests.helpers import randomized_torchvision_resnet18


def max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def torch_model():
    return randomized_torchvision_resnet18().eval()


@pytest.fixture(scope="module")
def ported(torch_model, tmp_path_factory):
    import torch
    path = tmp_path_factory.mktemp("w") / "random.pth"
    torch.save(torch_model.state_dict(), path)
    return resnet18_from_torchvision(path)


def torch_stages(model, x):
    import torch
    out = {}
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out["stem"] = x
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        out[name] = x
    return out, model.fc(torch.flatten(model.avgpool(x), 1))


# XLA's convolution is the next test's (train mode), so eval mode's BatchNorm needs no XLA case of its own here.
@pytest.mark.parametrize("size,impl", [(32, "im2col"), (32, "winograd"), (224, "winograd")])
def test_eval_logits_and_stages_match_torchvision(torch_model, ported, size, impl):
    import torch
    x = np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        stages, logits = torch_stages(torch_model, torch.from_numpy(x))
    model = ResNet18(1000, formulations=formulations_for(impl))
    ours, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
        ported, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert max_rel_err(ours, logits.numpy()) <= 1e-5
    for name, ref in stages.items():
        got = state["intermediates"]["backbone"][name][0]
        assert max_rel_err(got, ref.numpy().transpose(0, 2, 3, 1)) <= 1e-5, name


def test_train_mode_outputs_and_running_stats_match_pytorch():
    import torch
    torch_model = randomized_torchvision_resnet18(seed=1)
    variables = resnet18_from_torchvision(torch_model.state_dict())
    x = np.random.default_rng(1).normal(size=(16, 3, 32, 32)).astype(np.float32)
    torch_model.train()
    logits = torch_model(torch.from_numpy(x)).detach().numpy()
    ours, updates = jax.jit(lambda v, x: ResNet18(1000).apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert max_rel_err(ours, logits) <= 1e-5
    after = resnet18_from_torchvision(torch_model.state_dict())["batch_stats"]
    for ref, got in zip(jax.tree.leaves(after), jax.tree.leaves(updates["batch_stats"])):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_new_head_is_seeded_and_sized(torch_model):
    a = resnet18_from_torchvision(torch_model.state_dict(), num_classes=10, seed=0)
    b = resnet18_from_torchvision(torch_model.state_dict(), num_classes=10, seed=0)
    c = resnet18_from_torchvision(torch_model.state_dict(), num_classes=10, seed=1)
    assert a["params"]["head"]["kernel"].shape == (512, 10)
    np.testing.assert_array_equal(a["params"]["head"]["kernel"], b["params"]["head"]["kernel"])
    assert not np.array_equal(a["params"]["head"]["kernel"], c["params"]["head"]["kernel"])
    # The head initialised alone holds the whole model's values: `initialize`'s program, its head's outputs only
    # (XLA leaves out the rest of the initialisation, the same values compiled in 1.2 s of CPU time against 7.5 s).
    whole = jax.jit(lambda key: _jitted_init(ResNet18(10), 32)(key)["params"]["head"])(jax.random.PRNGKey(0))
    for x, y in zip(jax.tree.leaves(a["params"]["head"]), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(x, y)
    ported_conv = a["params"]["backbone"]["conv1"]["kernel"]
    np.testing.assert_array_equal(ported_conv, torch_model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_converted_weights_are_cached_for_a_local_file(torch_model, tmp_path, monkeypatch):
    import torch
    path = tmp_path / "r.pth"
    torch.save(torch_model.state_dict(), path)
    variables = imagenet_resnet18(num_classes=10, weights=path, cache_dir=tmp_path / "cache")
    assert variables["params"]["head"]["kernel"].shape == (512, 10)
    import cifarjax.pretrained as pretrained
    monkeypatch.setattr(pretrained, "_load_state_dict", lambda p: pytest.fail("converted again, needed torch"))
    again = imagenet_resnet18(num_classes=10, weights=path, cache_dir=tmp_path / "cache")
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again["params"]["backbone"]["conv1"]["kernel"],
                                  torch_model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resnet18_from_torchvision(tmp_path / "nope.pth")


def test_not_a_state_dict(tmp_path):
    import torch
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(UserError, match="not a PyTorch state_dict"):
        resnet18_from_torchvision(path)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a state_dict"):
        resnet18_from_torchvision(tmp_path / "list.pth")


def test_other_network_lists_missing_and_unexpected_keys():
    import torchvision
    sd = torchvision.models.resnet34().state_dict()
    sd18 = torchvision.models.resnet18().state_dict()
    assert sorted(_torch_key(k) for k in _expected_shapes(1000)) == sorted(
        k for k in sd18 if "num_batches_tracked" not in k)
    with pytest.raises(UserError, match=r"unexpected keys \(layer1\.2\.bn1\.bias"):
        resnet18_from_torchvision(sd)
    sd18 = torchvision.models.resnet18().state_dict()
    del sd18["layer2.0.conv1.weight"]
    with pytest.raises(UserError, match=r"1 missing keys \(layer2\.0\.conv1\.weight\), 0 unexpected"):
        resnet18_from_torchvision(sd18)


def test_shape_mismatch_names_the_tensor():
    import torch
    import torchvision
    sd = torchvision.models.resnet18().state_dict()
    sd["layer3.1.conv2.weight"] = torch.zeros(256, 256, 5, 5)
    with pytest.raises(UserError, match=r"layer3\.1\.conv2\.weight has shape \(256, 256, 5, 5\)"):
        resnet18_from_torchvision(sd)


def test_corrupt_named_checkpoint_fails_hash(tmp_path):
    path = tmp_path / IMAGENET_FILE
    path.write_bytes(b"truncated download")
    with pytest.raises(UserError, match="corrupt"):
        resnet18_from_torchvision(path)


def test_no_network_and_no_cache_says_which_file_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(UserError, match=rf"{IMAGENET_FILE}.*--weights PATH"):
        imagenet_resnet18(num_classes=10, cache_dir=tmp_path / "cache")


def test_a_damaged_converted_weights_file_is_rebuilt(torch_model, tmp_path, capsys):
    import torch
    path = tmp_path / "r.pth"
    torch.save(torch_model.state_dict(), path)
    first = imagenet_resnet18(num_classes=10, weights=path, cache_dir=tmp_path / "cache")
    cached = next((tmp_path / "cache" / "weights").glob("*.npz"))
    cached.write_bytes(cached.read_bytes()[:1000])
    again = imagenet_resnet18(num_classes=10, weights=path, cache_dir=tmp_path / "cache")
    assert "are damaged; converting the weights again" in capsys.readouterr().err
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in (tmp_path / "cache" / "weights").iterdir()] == [cached.name]


def test_two_conversions_at_once_both_succeed(torch_model, tmp_path):
    import torch
    from concurrent.futures import ThreadPoolExecutor
    path = tmp_path / "r.pth"
    torch.save(torch_model.state_dict(), path)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: imagenet_resnet18(10, weights=path, cache_dir=tmp_path / "cache"), range(2)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(a, b)
    assert len(list((tmp_path / "cache" / "weights").iterdir())) == 1  # no temporary files left


@pytest.mark.parametrize("impl", ["xla", "winograd"])
def test_train_mode_gradients_match_pytorch(impl):
    """Every parameter's gradient through the train-mode network (hand-written BatchNorm and max-pool
    gradients, and each convolution formulation) equals torch autograd's up to float32 rounding. Train-mode
    BatchNorm over 16 values at layer4 amplifies rounding: the largest error measured is 1.2e-5 of the largest
    gradient (both formulations), hence 1e-4."""
    import torch
    torch_model = randomized_torchvision_resnet18(seed=2).train()
    variables = resnet18_from_torchvision(torch_model.state_dict())
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 3, 32, 32)).astype(np.float32)
    w = rng.normal(size=(16, 1000)).astype(np.float32)
    (torch_model(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
    grads = {k: (p.grad if p.grad is not None else p) for k, p in torch_model.state_dict(keep_vars=True).items()}
    expected = resnet18_from_torchvision({k: v.detach() for k, v in grads.items()})["params"]

    def loss(params):
        model = ResNet18(1000, formulations=formulations_for(impl))
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                jnp.asarray(x.transpose(0, 2, 3, 1)), train=True, mutable=["batch_stats"])
        return jnp.sum(logits * w)

    got = jax.jit(jax.grad(loss))(variables["params"])
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        assert max_rel_err(g, flat_expected[path]) <= 1e-4, jax.tree_util.keystr(path)
