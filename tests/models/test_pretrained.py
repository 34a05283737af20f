"""Tests of jaxembed.models.pretrained: PyTorch state dicts -> Flax variables.

With torch and torchvision installed (`pip install -e '.[torch]'`), randomly
initialised torchvision models, and a torch reference of the BN-Inception port
(experiments/torch_reference.py), are saved to files with randomised BatchNorm
statistics and affine parameters, imported, and must give the same logits in
eval mode. Those tests skip without torch. The others need NumPy only: names
and shapes of the port, the layout of grouped convs against a NumPy version of
torch's conv2d, error messages, .safetensors files, and merge_backbone. The
converter (`python -m jaxembed.convert_weights`) writes .safetensors files that
load without torch.

torchvision runs in a fresh interpreter (this file run as a script), started in the
background when this file's first test runs: it imports triton, which segfaults in a
process that already loaded TensorFlow, as the test session has (jaxembed.data).
torch alone is fine there.

Images are 64 px, batch 2; classifiers have 10 classes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxembed.cli import convert_weights as convert_weights_cli
from jaxembed import models
from jaxembed.models import pretrained

try:
    import torch
except ImportError:
    torch = None
HAVE_TORCHVISION = torch is not None and importlib.util.find_spec("torchvision") is not None

requires_torch = pytest.mark.skipif(torch is None, reason="needs torch (pip install -e '.[torch]')")
requires_torchvision = pytest.mark.skipif(
    not HAVE_TORCHVISION, reason="needs torch and torchvision (pip install -e '.[torch]')"
)

RESNET_ARCHS = tuple(arch for arch in models.ARCHS if arch != "inception_bn")
NUM_CLASSES = 10
IMAGE_SIZE = 64
# Compared on logits; the others (resnet101/152, resnext101_64x4d) on names and shapes only, to keep
# this file quick on CPU. resnext101_32x8d is the resnext template's default backbone.
LOGITS_ARCHS = ("resnet50", "resnext50_32x4d", "resnext101_32x8d")
# The Flax side runs the CPU forms of the convolutions (conv_impl="auto" on CPU), but resnext101_32x8d runs
# XLA's: its CPU form has 33 x 32 per-group convolutions, which take ten times as long to compile. The
# weights are the same either way, resnext50_32x4d checks the CPU forms against torchvision, and
# test_conv_forms.py checks that both implementations compute the same function.
LOGITS_CONV_IMPL = {"resnext101_32x8d": "native"}
# The torch BN-Inception port (imports torch, not torchvision).
TORCH_REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "torch_reference.py"


@functools.lru_cache(maxsize=None)
def _cached_state_dict_shapes(arch: str, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    return pretrained.state_dict_shapes(arch, num_classes=num_classes)


def _state_dict_shapes(arch: str, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """`pretrained.state_dict_shapes`, computed once per (arch, num_classes) for all tests (each call
    traces the model's init). Read-only."""
    return _cached_state_dict_shapes(arch, num_classes)


def _random_state_dict(arch: str, num_classes: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A torch-layout state dict of random float32 values with the names and shapes `arch` expects."""
    rng = np.random.default_rng(seed)
    shapes = _state_dict_shapes(arch, num_classes=num_classes)
    return {key: rng.standard_normal(shape, dtype=np.float32) for key, shape in shapes.items()}


def _flat(variables) -> dict[str, np.ndarray]:
    return {"/".join(path): np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(variables).items()}


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| over max |expected|: the error relative to the size of the outputs."""
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# ---------------------------------------------------------------- names, layouts, errors (NumPy only)


def test_bn_inception_names_and_shapes_follow_the_port():
    shapes = _state_dict_shapes("inception_bn", num_classes=1000)
    # 69 conv+BN units (conv weight and bias, BN weight, bias, running_mean, running_var) + last_linear.
    assert len(shapes) == 69 * 6 + 2
    assert shapes["conv1_7x7_s2.weight"] == (64, 3, 7, 7)
    assert shapes["conv1_7x7_s2.bias"] == (64,)
    assert shapes["conv1_7x7_s2_bn.running_mean"] == (64,)
    assert shapes["conv2_3x3_reduce_bn.weight"] == (64,)
    assert shapes["inception_3a_1x1.weight"] == (64, 192, 1, 1)
    assert shapes["inception_3a_1x1_bn.running_var"] == (64,)
    assert shapes["inception_3c_double_3x3_2.weight"] == (96, 96, 3, 3)
    assert shapes["inception_4e_3x3_reduce.bias"] == (128,)
    assert shapes["inception_5b_pool_proj_bn.bias"] == (128,)
    assert shapes["last_linear.weight"] == (1000, 1024)
    assert "inception_3c_1x1.weight" not in shapes  # the reduction blocks have no 1x1 branch
    assert not any(key.startswith("last_linear") for key in _state_dict_shapes("inception_bn"))


def test_resnet_names_and_shapes_follow_torchvision():
    shapes = _state_dict_shapes("resnext101_32x8d", num_classes=1000)
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["bn1.running_var"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer1.0.downsample.1.weight"] == (256,)
    assert shapes["layer2.0.conv2.weight"] == (512, 16, 3, 3)  # grouped: (out, in / 32 groups, kh, kw)
    assert shapes["layer3.22.bn3.running_mean"] == (1024,)
    assert shapes["fc.weight"] == (1000, 2048)
    assert "layer3.23.conv1.weight" not in shapes


def test_values_land_in_the_flax_layout():
    state = _random_state_dict("inception_bn", NUM_CLASSES)
    variables = pretrained.variables_from_state_dict("inception_bn", state, num_classes=NUM_CLASSES)
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        params["inception_3a"]["3x3"]["conv"]["kernel"], state["inception_3a_3x3.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params["inception_3a"]["3x3"]["conv"]["bias"], state["inception_3a_3x3.bias"])
    bn = "inception_4e_double_3x3_1_bn"
    np.testing.assert_array_equal(params["inception_4e"]["double_3x3_1"]["bn"]["scale"], state[f"{bn}.weight"])
    np.testing.assert_array_equal(params["inception_4e"]["double_3x3_1"]["bn"]["bias"], state[f"{bn}.bias"])
    np.testing.assert_array_equal(stats["inception_4e"]["double_3x3_1"]["bn"]["mean"], state[f"{bn}.running_mean"])
    np.testing.assert_array_equal(stats["inception_4e"]["double_3x3_1"]["bn"]["var"], state[f"{bn}.running_var"])
    np.testing.assert_array_equal(params["last_linear"]["kernel"], state["last_linear.weight"].T)
    # Every leaf is float32 and shaped exactly as the model's own init would make it.
    module = models.create("inception_bn", num_classes=NUM_CLASSES)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), variables) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract)


def _torch_conv2d_numpy(x: np.ndarray, weight: np.ndarray, groups: int, padding: int) -> np.ndarray:
    """torch.nn.functional.conv2d (stride 1) in NumPy: x (B, C, H, W), weight (O, C / groups, kh, kw)."""
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))  # (B, C, H, W, kh, kw)
    windows = windows.reshape(batch, groups, group_channels, height, width, kh, kw)
    weight = weight.reshape(groups, out_channels // groups, group_channels, kh, kw)
    out = np.einsum("bgchwij,gocij->bgohw", windows, weight)  # cross-correlation, like torch
    return out.reshape(batch, out_channels, height, width)


def test_grouped_conv_kernel_computes_torch_grouped_conv():
    # resnext50_32x4d layer1.0.conv2: 128 -> 128 channels in 32 groups of 4, 3x3, padding 1.
    shapes = _state_dict_shapes("resnext50_32x4d")
    state = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    rng = np.random.default_rng(1)
    torch_weight = rng.standard_normal(shapes["layer1.0.conv2.weight"], dtype=np.float32)
    state["layer1.0.conv2.weight"] = torch_weight
    params = pretrained.variables_from_state_dict("resnext50_32x4d", state)["params"]
    kernel = params["stage1_block0"]["conv2"]["kernel"]

    x = rng.standard_normal((2, 128, 6, 6), dtype=np.float32)
    conv = nn.Conv(128, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=32, use_bias=False)
    flax_out = conv.apply({"params": {"kernel": kernel}}, x.transpose(0, 2, 3, 1))
    expected = _torch_conv2d_numpy(x, torch_weight, groups=32, padding=1)
    np.testing.assert_allclose(np.asarray(flax_out).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-4)


def test_batch_counters_and_row_vectors_are_accepted():
    state = _random_state_dict("inception_bn")
    state["conv1_7x7_s2_bn.num_batches_tracked"] = np.array(7, np.int64)
    # Cadene's bn_inception-52deb4733.pth stores some vectors as (1, C) rows.
    state["conv2_3x3_bn.running_var"] = state["conv2_3x3_bn.running_var"][None, :]
    variables = pretrained.variables_from_state_dict("inception_bn", state)
    np.testing.assert_array_equal(
        variables["batch_stats"]["conv2_3x3"]["bn"]["var"], state["conv2_3x3_bn.running_var"][0]
    )


def test_classifier_is_dropped_silently_without_num_classes():
    state = _random_state_dict("resnet50", num_classes=1000)
    variables = pretrained.variables_from_state_dict("resnet50", state)
    assert "classifier" not in variables["params"]
    with_classifier = pretrained.variables_from_state_dict("resnet50", state, num_classes=1000)
    np.testing.assert_array_equal(with_classifier["params"]["classifier"]["kernel"], state["fc.weight"].T)


def test_mismatch_error_lists_missing_unexpected_and_mis_shaped_keys():
    state = _random_state_dict("inception_bn", num_classes=1000)
    del state["conv1_7x7_s2.weight"]
    state["extra_conv.weight"] = np.zeros((8, 3, 1, 1), np.float32)
    state["inception_3a_1x1_bn.running_var"] = np.ones(65, np.float32)
    with pytest.raises(ValueError) as excinfo:
        pretrained.variables_from_state_dict("inception_bn", state)
    message = str(excinfo.value)
    assert "inception_bn" in message
    assert "missing (1):\n    conv1_7x7_s2.weight (64, 3, 7, 7)" in message
    assert "unexpected (1):\n    extra_conv.weight (8, 3, 1, 1)" in message
    assert "mis-shaped (1):\n    inception_3a_1x1_bn.running_var: got (65,), expected (64,)" in message
    assert "last_linear" not in message  # without num_classes the classifier is dropped, not reported


def test_mismatch_error_for_the_wrong_classifier_or_architecture():
    state = _random_state_dict("resnet50", num_classes=1000)
    with pytest.raises(ValueError, match=r"fc\.weight: got \(1000, 2048\), expected \(10, 2048\)"):
        pretrained.variables_from_state_dict("resnet50", state, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"missing \(255\):[\s\S]*\.\.\. and 235 more") as excinfo:
        pretrained.variables_from_state_dict("resnet101", state)
    assert "mis-shaped" not in str(excinfo.value) and "unexpected" not in str(excinfo.value)


def test_load_pretrained_reads_safetensors_without_torch(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = _random_state_dict("inception_bn", NUM_CLASSES)
    path = tmp_path / "weights.safetensors"
    safetensors_numpy.save_file(state, str(path))
    loaded = models.load_pretrained("inception_bn", path, num_classes=NUM_CLASSES)
    expected = pretrained.variables_from_state_dict("inception_bn", state, num_classes=NUM_CLASSES)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, expected))


# ---------------------------------------------------------------- merge_backbone


def _template(kernel_shape=(3, 3, 3, 8)):
    """Variables shaped like a template model's: a backbone and a head, params and batch_stats."""
    return {
        "params": {
            "backbone": {
                "conv": {"kernel": np.zeros(kernel_shape, np.float32)},
                "bn": {"scale": np.ones(8, np.float32)},
            },
            "classifier": {"kernel": np.full((8, 4), 2.0, np.float32)},
        },
        "batch_stats": {"backbone": {"bn": {"mean": np.zeros(8, np.float32), "var": np.ones(8, np.float32)}}},
    }


def _backbone(seed=0, kernel_shape=(3, 3, 3, 8)):
    rng = np.random.default_rng(seed)
    return {
        "params": {"conv": {"kernel": rng.standard_normal(kernel_shape)}, "bn": {"scale": rng.standard_normal(8)}},
        "batch_stats": {"bn": {"mean": rng.standard_normal(8), "var": rng.uniform(1, 2, 8)}},
    }


def test_merge_backbone_replaces_the_backbone_and_keeps_the_head():
    template, backbone = _template(), _backbone()
    merged = models.merge_backbone(template, backbone)
    for collection in ("params", "batch_stats"):
        assert jax.tree.all(jax.tree.map(np.allclose, merged[collection]["backbone"], backbone[collection]))
    assert merged["params"]["backbone"]["conv"]["kernel"].dtype == jnp.float32  # the template's dtype
    np.testing.assert_array_equal(merged["params"]["classifier"]["kernel"], template["params"]["classifier"]["kernel"])
    np.testing.assert_array_equal(template["params"]["backbone"]["conv"]["kernel"], 0.0)  # input untouched


def test_merge_backbone_keeps_the_template_sharding():
    devices = np.array(jax.devices())
    replicated = NamedSharding(Mesh(devices, ("data",)), PartitionSpec())
    template = jax.device_put(_template(), replicated)
    merged = models.merge_backbone(template, _backbone())
    for leaf in jax.tree.leaves(merged):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)


def test_merge_backbone_rejects_a_different_tree():
    backbone = _backbone(kernel_shape=(3, 3, 3, 16))
    backbone["params"]["classifier"] = {"kernel": np.zeros((8, 1000))}
    del backbone["batch_stats"]["bn"]["var"]
    with pytest.raises(ValueError) as excinfo:
        models.merge_backbone(_template(), backbone)
    message = str(excinfo.value)
    assert "missing (1):\n    batch_stats/bn/var (8,)" in message
    assert "unexpected (1):\n    params/classifier/kernel (8, 1000)" in message
    assert "mis-shaped (1):\n    params/conv/kernel: got (3, 3, 3, 16), expected (3, 3, 3, 8)" in message
    with pytest.raises(ValueError, match="no 'backbone' subtree"):
        models.merge_backbone({"params": {"encoder": {}}}, _backbone())


# ---------------------------------------------------------------- against torch (skipped without it)


def _randomise_batch_norms(model, seed: int) -> None:
    """Random BN affine parameters and running statistics, so the BN mapping is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 1.0)


def _random_images(seed: int = 0) -> np.ndarray:
    """(2, 3, 64, 64) float32, NCHW as torch takes them."""
    return np.random.default_rng(seed).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


def _flax_outputs(
    arch: str, path, images_nchw: np.ndarray, num_classes: int | None, conv_impl: str = "auto"
) -> np.ndarray:
    """Outputs of the Flax model loaded from `path` (eval mode) on NCHW images."""
    # Imported here: this file is also the torchvision reference script (`__main__`), and tiny loads
    # TensorFlow, which crashes beside torch in one process.
    import tiny

    variables = models.load_pretrained(arch, path, num_classes=num_classes)
    module = models.create(arch, num_classes=num_classes, conv_impl=conv_impl)
    images = images_nchw.transpose(0, 2, 3, 1)
    return np.asarray(tiny.compile_quickly(module.apply, variables, images)(variables, images))


def _bn_inception_port(num_classes: int):
    """The torch BN-Inception port (experiments/torch_reference.py, shared with the benchmark)."""
    spec = importlib.util.spec_from_file_location("torch_reference", TORCH_REFERENCE)
    torch_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_reference)
    return torch_reference.BNInceptionPort(num_classes)


@requires_torch
def test_logits_match_the_bn_inception_port(tmp_path):
    torch.manual_seed(0)
    model = _bn_inception_port(NUM_CLASSES)
    _randomise_batch_norms(model, seed=2)
    assert set(_state_dict_shapes("inception_bn", num_classes=NUM_CLASSES)) == {
        key for key in model.state_dict() if not key.endswith("num_batches_tracked")
    }
    path = tmp_path / "bn_inception.pth"
    torch.save(model.state_dict(), path)
    images = _random_images()
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images)).numpy()
    logits = _flax_outputs("inception_bn", path, images, NUM_CLASSES)
    assert logits.shape == expected.shape
    assert _relative_error(logits, expected) <= 1e-4


def write_torchvision_references(out_dir: pathlib.Path) -> None:
    """Writes what the torchvision tests compare against; runs in a fresh interpreter.

    shapes.json: arch -> {key: shape} of torchvision's state dict (1000 classes) for every ResNet arch.
    For each of LOGITS_ARCHS: {arch}.pth, a 10-class model with randomised BN, and {arch}.npz with
    its eval-mode "logits" (for resnet50 also the pooled "features") on `_random_images()`.
    """
    import torchvision

    shapes = {}
    for arch in RESNET_ARCHS:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            state = getattr(torchvision.models, arch)().state_dict()
        shapes[arch] = {key: list(v.shape) for key, v in state.items() if not key.endswith("num_batches_tracked")}
    (out_dir / "shapes.json").write_text(json.dumps(shapes))

    images = torch.from_numpy(_random_images())
    for seed, arch in enumerate(LOGITS_ARCHS):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES).eval()
        _randomise_batch_norms(model, seed)
        torch.save(model.state_dict(), out_dir / f"{arch}.pth")
        with torch.no_grad():
            outputs = {"logits": model(images).numpy()}
            if arch == "resnet50":
                model.fc = torch.nn.Identity()
                outputs["features"] = model(images).numpy()
        np.savez(out_dir / f"{arch}.npz", **outputs)


@pytest.fixture(scope="module", autouse=True)
def _torchvision_reference_run(request, tmp_path_factory):
    """Starts `python tests/test_pretrained.py DIR` in the background when this module's first test runs,
    if a selected test needs its references: it then runs beside the tests that do not (half a minute of
    importing torchvision and building models, on a core the test process leaves mostly idle)."""
    needed = HAVE_TORCHVISION and any(
        getattr(item, "module", None) is request.module
        and "torchvision_references" in getattr(item, "fixturenames", ())
        for item in request.session.items
    )
    if not needed:
        yield None
        return
    out_dir = tmp_path_factory.mktemp("torchvision")
    log = out_dir.with_name(out_dir.name + ".log")  # stderr in a file: a full pipe would stall the run
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, __file__, str(out_dir)], stdout=stderr, stderr=stderr)
    yield out_dir, log, process
    if process.poll() is None:  # no test waited for it (all of them deselected or skipped)
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def torchvision_references(_torchvision_reference_run) -> pathlib.Path:
    """The folder `write_torchvision_references` filled (waits for the run started above)."""
    out_dir, log, process = _torchvision_reference_run
    try:
        process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.returncode != 0:
        pytest.fail(f"the torchvision reference run failed ({process.returncode}):\n{log.read_text()[-4000:]}")
    return out_dir


@requires_torchvision
@pytest.mark.parametrize("arch", RESNET_ARCHS)
def test_names_and_shapes_match_torchvision(arch, torchvision_references):
    torch_shapes = json.loads((torchvision_references / "shapes.json").read_text())[arch]
    assert {key: tuple(shape) for key, shape in torch_shapes.items()} == _state_dict_shapes(
        arch, num_classes=1000
    )


@requires_torchvision
@pytest.mark.parametrize("arch", LOGITS_ARCHS)
def test_logits_match_torchvision(arch, torchvision_references):
    path = torchvision_references / f"{arch}.pth"
    expected = np.load(torchvision_references / f"{arch}.npz")
    logits = _flax_outputs(arch, path, _random_images(), NUM_CLASSES, LOGITS_CONV_IMPL.get(arch, "auto"))
    assert logits.shape == expected["logits"].shape
    assert _relative_error(logits, expected["logits"]) <= 1e-4
    if arch == "resnet50":  # the backbone alone gives torchvision's pooled features
        features = _flax_outputs(arch, path, _random_images(), None)
        assert _relative_error(features, expected["features"]) <= 1e-4


@requires_torchvision
def test_convert_weights_writes_safetensors_that_load_without_torch(torchvision_references, tmp_path):
    pytest.importorskip("safetensors")
    from jaxembed.models import convert_weights  # python -m jaxembed.convert_weights

    state = torch.load(torchvision_references / "resnet50.pth", weights_only=True)
    # Saved the way training scripts often do: wrapped, with DataParallel's "module." prefix.
    source, destination = tmp_path / "resnet50.pth", tmp_path / "resnet50.safetensors"
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 90}, source)
    assert convert_weights_cli.main([str(source), "--arch", "resnet50"]) == 0

    from_safetensors = _flat(models.load_pretrained("resnet50", destination, num_classes=NUM_CLASSES))
    expected = _flat(pretrained.variables_from_state_dict("resnet50", state, num_classes=NUM_CLASSES))
    assert from_safetensors.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(from_safetensors[key], expected[key], err_msg=key)


if __name__ == "__main__":
    write_torchvision_references(pathlib.Path(sys.argv[1]))
