"""``fastconv export`` and ``fastconv.torch.twin``: a checkpoint's state_dict as a .pt or
.safetensors file, loaded back by PyTorch's twin of the network (plain and converted to
fastconv's convolutions), which must predict what fastconv does."""

import sys

import numpy as np
import pytest
from test_inference import cli, needs_fashion, no_temp_files, untrained

from fastconv import inference, models, nn

try:
    import torch

    import fastconv.torch as fct
except ImportError:
    torch = fct = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch (the torch extra)")


def _logits(net, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images.astype(np.float32)[:, None] / np.float32(255))
    with torch.no_grad():
        return net.eval()(x).numpy()


@needs_torch
@needs_fashion
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_export_pt_loads_into_the_torch_twins_and_predicts_the_same(
        capsys, tmp_path, fashion_ck, fashion_test, suffix):
    out = tmp_path / f"model{suffix}"
    code, stdout, err = cli(capsys, "export", "--checkpoint", fashion_ck, "--to", out)
    assert code == 0 and err == ""
    assert stdout.splitlines() == [
        f"wrote {out}: the two-conv network's state_dict (8 tensors, 454,922 parameters)",
        "load it in PyTorch: net = fastconv.torch.twin('two-conv'); "
        f"net.load_state_dict(torch.load({str(out)!r}))"]
    assert no_temp_files(tmp_path)
    state = torch.load(out, weights_only=True)
    model, _ = inference.load_model(fashion_ck)
    ours = model.state_dict()
    assert list(state) == list(ours)
    for key, value in ours.items():
        assert state[key].dtype == torch.float32
        np.testing.assert_array_equal(state[key].numpy(), value)

    images = fashion_test[0][:300]
    expected = np.asarray(model(inference.train.normalise(images)))
    for net in (fct.twin("two-conv"), fct.convert(fct.twin("two-conv"))):
        net.load_state_dict(state)
        logits = _logits(net, images)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        assert (logits.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.99


@needs_fashion
def test_export_safetensors_holds_the_same_arrays(capsys, tmp_path, fashion_ck, fashion_test):
    pytest.importorskip("safetensors", reason="needs safetensors (the safetensors extra)")
    from safetensors import safe_open
    from safetensors.numpy import load_file

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an older file, replaced whole")
    code, stdout, err = cli(capsys, "export", "--checkpoint", fashion_ck, "--to", out)
    assert code == 0 and err == "" and "safetensors.torch.load_file(" in stdout
    model, ck = inference.load_model(fashion_ck)
    arrays = load_file(out)
    ours = model.state_dict()
    assert set(arrays) == set(ours)
    for key, value in ours.items():
        assert arrays[key].dtype == value.dtype
        np.testing.assert_array_equal(arrays[key], value)
    with safe_open(out, "np") as f:
        assert f.metadata() == {"format": "pt", "fastconv_model": "two-conv",
                                "dataset": "fashion-mnist", "epoch": "1"}
    assert no_temp_files(tmp_path)
    if torch is not None:  # and PyTorch's loader, into the twin
        from safetensors.torch import load_file as load_torch

        net = fct.twin("two-conv")
        net.load_state_dict(load_torch(out))
        images = fashion_test[0][:100]
        np.testing.assert_allclose(_logits(net, images),
                                   model(inference.train.normalise(images)), rtol=1e-4,
                                   atol=1e-4)


def test_export_errors(capsys, tmp_path, monkeypatch):
    ck = untrained(tmp_path / "ck.npz")
    code, _, err = cli(capsys, "export", "--checkpoint", ck, "--to", tmp_path / "m.onnx")
    assert code == 2 and ("argument --to: expected a file name ending in .pt, .pth, "
                          f".safetensors (the format), got '{tmp_path / 'm.onnx'}'") in err
    code, _, err = cli(capsys, "export", "--checkpoint", ck)
    assert code == 2 and "the following arguments are required: --to" in err
    code, _, err = cli(capsys, "export", "--checkpoint", tmp_path / "none.npz", "--to",
                       tmp_path / "m.pt")
    assert code == 1 and "not a readable fastconv checkpoint" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    code, _, err = cli(capsys, "export", "--checkpoint", ck, "--to", tmp_path / "m.pt")
    assert (code, err) == (1, f"fastconv: error: {tmp_path / 'm.pt'}: writing a .pt file "
                              "needs PyTorch: pip install 'fastconv[torch]'\n")
    for name in ("safetensors", "safetensors.numpy"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "m.safetensors"
    code, _, err = cli(capsys, "export", "--checkpoint", ck, "--to", out)
    assert (code, err) == (1, f"fastconv: error: {out}: writing a .safetensors file needs "
                              "safetensors: pip install 'fastconv[safetensors]'\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


# ---- the twin ------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("name", ["two-conv", "tiny", "seed"])
def test_twin_of_a_preset_is_plain_torch_with_fastconvs_keys(name):
    net = fct.twin(name)
    ours = models.MODELS[models.model_name(name)](seed=0).state_dict()
    assert isinstance(net, torch.nn.Sequential)
    assert {type(m).__module__ for m in net}.issubset({"torch.nn.modules.conv",
                                                       "torch.nn.modules.activation",
                                                       "torch.nn.modules.pooling",
                                                       "torch.nn.modules.flatten",
                                                       "torch.nn.modules.linear"})
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in ours.items()}


@needs_torch
def test_twin_follows_torchs_random_state():
    torch.manual_seed(3)
    a = fct.twin("two-conv").state_dict()
    torch.manual_seed(3)
    b = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(3136, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_twin_of_a_model_copies_its_weights_and_computes_the_same(dtype):
    """Every layer twin knows, with non-default arguments."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1, groups=1, rng=1, dtype=dtype),
        nn.BatchNorm2d(8, eps=1e-3, momentum=0.2, dtype=dtype), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, (3, 1), padding="same", groups=4, bias=False, rng=2,
                                dtype=dtype), nn.MaxPool2d(3, stride=2, padding=1)),
        nn.AvgPool2d(2), nn.Dropout(0.3, rng=3), nn.Flatten(),
        nn.Linear(32, 5, bias=False, rng=4, dtype=dtype))
    model(rng.random((4, 3, 16, 16)).astype(dtype))  # moves BatchNorm's running statistics
    model.eval()
    net = fct.twin(model)
    assert not net.training and net[5].p == 0.3
    for key, value in model.state_dict().items():
        t = net.state_dict()[key]
        assert t.numpy().dtype == value.dtype
        np.testing.assert_array_equal(t.numpy(), value)
    x = rng.random((2, 3, 16, 16)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), model(x), rtol=tol,
                                   atol=tol)


@needs_torch
def test_twin_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; choose one of \['tiny', "
                                         r"'two-conv'\]"):
        fct.twin("resnet")
    with pytest.raises(TypeError, match="a preset's name or a fastconv.nn.Module, got "
                                        "Sequential"):
        fct.twin(torch.nn.Sequential())

    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    with pytest.raises(TypeError, match=r"model\[1\] is a Scale, which has no torch twin"):
        fct.twin(nn.Sequential(nn.ReLU(), Scale()))
