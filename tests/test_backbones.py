"""The backbone registry tells the truth, and weights are handled safely and offline."""

from __future__ import annotations

import hashlib
import io
import urllib.error

import pytest
import torch
from PIL import Image

from core.vision import backbones as bb
from core.vision import networks as nw
from core.vision import weights as wt
from core.vision.device import describe_device, device_summary, pick_device

ALL_IDS = [b.id for b in bb.list_backbones()]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Weights caches in tmp_path: no test sees or leaves a real downloaded file."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CATALOG_LENS_CACHE_DIR", str(tmp_path / "lens-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Downloads fail as on an air-gapped machine, also where the internet is reachable."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(wt.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


# --------------------------------------------------------------------------- registry


def test_ids_are_unique_and_every_fact_is_filled():
    backbones = bb.list_backbones()
    assert len(ALL_IDS) == len(set(ALL_IDS)) >= 10
    for b in backbones:
        assert b.id and b.name and callable(b.builder) and callable(b.full_builder)
        assert b.feature_dim > 0 and b.params_features > 0 and b.input_size >= 224
        assert 60 < b.imagenet_top1 < 90
        assert b.good_for.endswith(".") and len(b.good_for) < 140
        assert b.params_full is not None or b.self_supervised
        w = b.weights
        assert w.source in {"torchvision", "timm-hub", "package"}
        assert w.name and w.location and w.file_name and w.size_mb > 0 and w.licence
        p = b.preprocessing
        assert p.crop_size == b.input_size and p.resize_size >= p.crop_size
        assert len(p.mean) == len(p.std) == 3 and p.interpolation in {"bilinear", "bicubic"}
        assert p.describe()


LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def test_default_is_first_and_the_lites_are_the_offline_ones():
    assert bb.DEFAULT_BACKBONE_ID == ALL_IDS[0]
    assert bb.DEFAULT_BACKBONE_ID in LITES
    assert sorted(b.id for b in bb.list_backbones() if b.offline) == LITES
    sizes = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
    for backbone_id in LITES:
        lite = bb.get_backbone(backbone_id)
        assert lite.weights.source == "package" and not lite.self_supervised
        p = lite.preprocessing  # the facts checked in STACK.md (Lite0) and the timm configs
        assert (p.crop_size, p.interpolation, p.mean, p.std) == (sizes[backbone_id], "bicubic", (0.5,) * 3, (0.5,) * 3)
        assert p.crop_mode == "squash"  # the whole photo; no variant measured clearly better
        assert wt.weights_status(lite).available


def test_dinov2_is_self_supervised_from_timm():
    b = bb.get_backbone("dinov2_vits14")
    assert b.self_supervised and b.weights.source == "timm-hub"
    assert b.weights.location == "timm/vit_small_patch14_dinov2.lvd142m"


def test_unknown_id_names_the_valid_ones():
    with pytest.raises(ValueError, match="resnet50") as err:
        bb.get_backbone("resnet51")
    assert "efficientnet_lite0" in str(err.value)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("backbone_id", ALL_IDS)
def test_entry_matches_the_real_network(backbone_id):
    """Feature width and parameter counts are those of the networks actually built."""
    b = bb.get_backbone(backbone_id)
    full = b.full_builder()
    if b.params_full is not None:
        assert _count(full) == b.params_full
    features = bb.features_of(b, full).eval()
    assert _count(features) == b.params_features
    with torch.inference_mode():
        out = features(torch.rand(1, 3, b.input_size, b.input_size))
    assert out.shape == (1, b.feature_dim)


def test_builder_gives_the_same_feature_extractor():
    b = bb.get_backbone("resnet18")
    model = b.builder().eval()
    assert _count(model) == b.params_features
    with torch.inference_mode():
        assert model(torch.rand(2, 3, 224, 224)).shape == (2, 512)


@pytest.mark.parametrize("backbone_id", ["efficientnet_lite0", "resnet50", "dinov2_vits14"])
def test_transform_follows_the_preprocessing(backbone_id):
    b = bb.get_backbone(backbone_id)
    x = nw.build_transform(b)(Image.new("RGB", (640, 480), (255, 0, 0)))
    assert x.shape == (3, b.input_size, b.input_size)
    expected_red = (1.0 - b.preprocessing.mean[0]) / b.preprocessing.std[0]
    assert x[0].mean().item() == pytest.approx(expected_red, abs=1e-3)


def test_preprocessing_key_is_stable_and_tells_preprocessings_apart():
    keys = {bid: bb.preprocessing_key(bid) for bid in ALL_IDS}
    assert keys["efficientnet_lite0"] == bb.preprocessing_key("efficientnet_lite0")
    assert keys["efficientnet_lite0"] != keys["resnet18"] != keys["resnet50"]  # 256 vs 232
    assert keys["resnet18"] == keys["vgg16"]  # same transform, same key


def test_classifier_model_seam():
    model = nw.build_classifier_model("efficientnet_lite0", 3, pretrained=False)
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == 1280
    model.eval()
    with torch.inference_mode():
        assert model(torch.rand(2, 3, 224, 224)).shape == (2, 3)
    with pytest.raises(ValueError, match="2 classes"):
        nw.build_classifier_model("resnet18", 1, pretrained=False)


# --------------------------------------------------------------------------- weights


def test_missing_torchvision_weights_say_download_in_plain_words():
    status = wt.weights_status("resnet50")
    assert not status.available and status.path is None
    assert "download" in status.message and "98 MB" in status.message
    assert "resnet50-11ad3fa6.pth" in status.message


def test_unreachable_download_is_a_plain_error_and_leaves_nothing():
    with pytest.raises(wt.WeightsUnavailable) as err:
        nw.load_feature_extractor("resnet50")
    assert str(err.value) == (
        "ResNet-50 needs a one-time download of 98 MB from download.pytorch.org. This "
        "computer could not reach it. Ask IT to allow it, or import the weights file "
        "(resnet50-11ad3fa6.pth) under 'Import weights'."
    )
    folder = wt._torchvision_cache_path(bb.get_backbone("resnet50")).parent
    assert not folder.exists() or not any(folder.iterdir())
    assert wt.weights_status("efficientnet_lite0").available  # others stay usable


def test_unreachable_hub_is_a_plain_error():
    with pytest.raises(wt.WeightsUnavailable, match="huggingface.co"):
        wt.ensure_weights("dinov2_vits14")


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _published_as(monkeypatch, backbone_id: str, data: bytes) -> None:
    """Make ``data`` the published file of a backbone: its record's checksum prefix is that of
    ``data`` (a test cannot produce the real file; the record stays otherwise as registered)."""
    import dataclasses

    real = bb.get_backbone(backbone_id)
    published = dataclasses.replace(
        real, weights=dataclasses.replace(real.weights, sha256_prefix=hashlib.sha256(data).hexdigest()[:8]))
    monkeypatch.setattr(wt, "get_backbone", lambda b: published if b in (backbone_id, real) else bb.get_backbone(b))


def test_download_reports_progress_into_torchvision_cache(monkeypatch):
    import torchvision.models as tvm

    state = tvm.mobilenet_v3_large().state_dict()
    data = _saved(state)
    _published_as(monkeypatch, "mobilenet_v3_large", data)
    monkeypatch.setattr(wt.urllib.request, "urlopen", lambda *a, **k: _FakeResponse(data))
    seen = []
    path = wt.ensure_weights("mobilenet_v3_large", on_progress=lambda d, t: seen.append((d, t)))
    assert path.name == "mobilenet_v3_large-5c1a4163.pth" and path.parent.name == "checkpoints"
    assert seen[-1] == (len(data), len(data)) and len(seen) >= 2
    # torchvision's own loader finds the file where we put it (no second download)
    loaded = tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
    assert torch.equal(loaded["features.0.0.weight"], state["features.0.0.weight"])
    assert wt.weights_status("mobilenet_v3_large").available


def test_import_accepts_the_right_network(tmp_path):
    import torchvision.models as tvm

    source = tvm.resnet18()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(source.state_dict(), path)
    target = wt.import_weights("resnet18", path)
    assert target == wt._torchvision_cache_path(bb.get_backbone("resnet18"))
    status = wt.weights_status("resnet18")
    assert status.available and status.official is False  # random weights: not the published file
    assert wt.weights_hash("resnet18") == hashlib.sha256(path.read_bytes()).hexdigest()
    model, transform = nw.load_feature_extractor("resnet18")
    x = torch.rand(1, 3, 224, 224)
    source.fc = torch.nn.Identity()
    with torch.inference_mode():
        assert torch.allclose(model(x), source.eval()(x), atol=1e-5)


def test_import_rejects_another_network_with_a_clear_message(tmp_path):
    import torchvision.models as tvm

    path = tmp_path / "efficientnet_b4_rwightman-23ab8bcd.pth"
    torch.save(tvm.efficientnet_b0().state_dict(), path)
    with pytest.raises(ValueError, match=r"different network: \d+ of \d+ tensors have other shapes"):
        wt.import_weights("efficientnet_b4", path)
    torch.save(tvm.mobilenet_v3_large().state_dict(), path)
    with pytest.raises(ValueError, match="different network: none of the"):
        wt.import_weights("resnet18", path)
    assert not wt.weights_status("efficientnet_b4").available
    with pytest.raises(ValueError, match="comes with the app"):
        wt.import_weights("efficientnet_lite0", path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a weights file"):
        wt.import_weights("resnet18", tmp_path / "notes.txt")
    (tmp_path / "fake.pth").write_text("<html>proxy login</html>")
    with pytest.raises(ValueError, match="opened safely"):
        wt.import_weights("resnet18", tmp_path / "fake.pth")


def test_import_for_a_timm_hub_backbone_works_offline(tmp_path):
    """A DINOv2 file in the published (518 px) layout is accepted and runs at 224 px."""
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False).state_dict()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    wt.import_weights("dinov2_vits14", path)
    assert wt.weights_status("dinov2_vits14").available
    model, _ = nw.load_feature_extractor("dinov2_vits14")
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 384)


@pytest.mark.parametrize(("backbone_id", "prefix"), [
    ("efficientnet_lite0", "57934424"), ("efficientnet_lite1", "77cc7160"), ("efficientnet_lite2", "9656183e"),
])
def test_lite_weights_hash_matches_its_published_prefix(backbone_id, prefix):
    assert wt.weights_hash(backbone_id).startswith(prefix)
    assert wt.weights_status(backbone_id).official is True


@pytest.mark.parametrize(("backbone_id", "p_cat", "p_coffee"), [
    ("efficientnet_lite0", 0.77, 0.90), ("efficientnet_lite1", None, None), ("efficientnet_lite2", None, None),
])
def test_lite_real_weights_recognise_real_photos(backbone_id, p_cat, p_coffee):
    """Proves the offline weights loaded and the preprocessing is right (random weights
    give near-uniform output)."""
    from skimage import data

    model, transform, categories = nw.load_imagenet_model(backbone_id)
    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    with torch.inference_mode():
        probs = model(torch.stack([transform(p) for p in photos])).softmax(-1)
    p, top = probs.max(-1)
    assert categories[285] == "Egyptian cat" and categories[967] == "espresso"
    assert top[1].item() == 967 and p[1].item() > 0.5
    assert top[0].item() in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    if p_cat is not None:  # the figures checked in STACK.md
        assert top[0].item() == 285
        assert p[0].item() == pytest.approx(p_cat, abs=0.05)
        assert p[1].item() == pytest.approx(p_coffee, abs=0.05)


@pytest.mark.parametrize("backbone_id", ["efficientnet_lite1", "efficientnet_lite2"])
def test_new_lites_extract_features_offline_from_a_real_photo(backbone_id):
    """Lite1/Lite2 build with their packaged weights (no download: the network is refused
    here) and give features that tell two real photos apart; random weights would not
    give the published network's ImageNet answer, checked above."""
    from skimage import data

    model, transform = nw.load_feature_extractor(backbone_id, device="cpu")
    x = torch.stack([transform(Image.fromarray(data.astronaut())), transform(Image.fromarray(data.coffee()))])
    assert x.shape[-1] == bb.get_backbone(backbone_id).input_size
    with torch.inference_mode():
        f = model(x.contiguous(memory_format=torch.channels_last))
    assert f.shape == (2, 1280) and torch.isfinite(f).all()
    assert torch.nn.functional.cosine_similarity(f[0], f[1], dim=0) < 0.9


# --------------------------------------------------------------------------- device


def test_pick_device_honours_and_explains():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="Unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no|none"):
            pick_device("cuda:1")
    assert describe_device("cpu").startswith("CPU · ")
    summary = device_summary()
    assert {"device", "kind", "label", "accelerated", "cpu_cores"} <= set(summary)


def test_cpu_cores_is_the_share_a_scheduler_gives(monkeypatch):
    """A Ray worker is told its share of the CPUs by OMP_NUM_THREADS; the network must not
    take every core of the machine there (N workers x all cores on N cores)."""
    from core.vision.device import compute_settings, cpu_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    every = cpu_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_cores() == 1
    with compute_settings(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(every + 8))
    assert cpu_cores() == every  # never more than the process may use


def test_a_download_that_is_not_the_published_file_is_refused_and_not_kept(monkeypatch):
    """Right tensors, wrong bytes (a mirror's re-save, a corrupted copy): the checksum the
    publisher put in the file name is checked right after the download."""
    import torchvision.models as tvm

    data = _saved(tvm.mobilenet_v3_large().state_dict())  # not the published weights
    monkeypatch.setattr(wt.urllib.request, "urlopen", lambda *a, **k: _FakeResponse(data))
    with pytest.raises(wt.WeightsUnavailable, match="checksum does not match the published one"):
        wt.ensure_weights("mobilenet_v3_large")
    folder = wt._torchvision_cache_path(bb.get_backbone("mobilenet_v3_large")).parent
    assert not folder.exists() or list(folder.iterdir()) == []
    assert not wt.weights_status("mobilenet_v3_large").available
