"""--data-on-device: training batches cut, augmented and normalised on the device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from localearn import registry
from localearn.cli import main
from localearn.config import make_config
from localearn.data import PadCropFlip, TensorImages, digits, make_loader, on_device
from localearn.data.on_device import device_loader
from localearn.engine import Trainer
from localearn.models.cifar_resnet import CifarResNet

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def indexed_images(n: int = 40, side: int = 8, **aug) -> TensorImages:
    """n random uint8 images; image i has label i, so a batch's labels name its images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    return TensorImages(images, torch.arange(n), PadCropFlip(MEAN, STD, train=True, **aug))


def reference(img: torch.Tensor, i: int, j: int, flip: bool, p: int, mode: str) -> torch.Tensor:
    """What the CPU pipeline (`PadCropFlip`) makes of ``img`` for crop offset (i, j), flip."""
    x = F.pad(img.float()[None] / 255, (p, p, p, p), mode=mode)[0]
    x = x[:, i:i + img.shape[1], j:j + img.shape[2]]
    x = x.flip(-1) if flip else x
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_every_crop_and_flip_equals_the_cpu_pipelines(mode):
    ds = indexed_images(4, padding=2, mode=mode)
    loader = device_loader(ds, batch_size=4, device="cpu")
    index = torch.tensor([1, 3])
    for i in range(5):
        for j in range(5):
            for flip in (False, True):
                got = loader.batch(index, torch.tensor([[i, j]] * 2), torch.tensor([flip] * 2))
                for b, k in enumerate(index.tolist()):
                    want = reference(ds.images[k], i, j, flip, 2, mode)
                    torch.testing.assert_close(got[b], want, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_crops_gathered_on_cuda_equal_the_cpu_pipelines():
    ds = indexed_images(4, padding=2, mode="reflect")
    loader = device_loader(ds, batch_size=4, device="cuda")
    offsets, flips = torch.tensor([[0, 4], [3, 1]]), torch.tensor([True, False])
    got = loader.batch(torch.tensor([0, 2], device="cuda"), offsets.cuda(), flips.cuda()).cpu()
    for b, (k, (i, j), flip) in enumerate(zip([0, 2], offsets.tolist(), flips.tolist())):
        want = reference(ds.images[k], i, j, flip, 2, "reflect")
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-5)


def test_augmentation_is_visible_on_a_known_image():
    # a horizontal ramp: a flip reverses it, a crop shifts it (reflect padding at the border)
    ramp = torch.arange(8, dtype=torch.uint8).mul(30).expand(3, 8, 8).contiguous()
    ds = TensorImages(ramp[None].repeat(200, 1, 1, 1), torch.zeros(200, dtype=torch.long),
                      PadCropFlip(MEAN, STD, train=True, padding=2))
    loader = device_loader(ds, batch_size=200, device="cpu", seed=1)
    x, _ = next(iter(loader))
    row = (x[:, 0, 4] * STD[0] + MEAN[0]) * 255  # the middle row of channel 0, back in pixels
    plain = ramp[0, 4].float()
    steps = row[:, 1:] - row[:, :-1]
    flipped = (steps[:, 2:6] < 0).all(1)  # inside the image, away from reflected borders
    shifted = ~torch.isclose(row, plain).all(1) & ~torch.isclose(row, plain.flip(0)).all(1)
    assert 60 < int(flipped.sum()) < 140  # about half flipped
    assert int(shifted.sum()) > 100  # most moved: 24 of 25 offsets are not the centre


def test_batches_have_the_normal_loaders_shapes_order_and_normalisation():
    data = digits()
    dev = device_loader(data.train, batch_size=128, device="cpu", seed=3)
    normal = make_loader(data.train, batch_size=128, train=True, seed=3)
    assert dev.augment.padding == 2 and dev.augment.mode == "constant" and not dev.augment.flip
    assert len(dev) == len(normal) == 1347 // 128
    for epoch in (0, 1):
        dev.set_epoch(epoch)
        normal.sampler.set_epoch(epoch)
        got, want = list(dev), list(normal)
        assert [y.tolist() for _, y in got] == [y.tolist() for _, y in want]
    x, y = got[0]
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.device.type == y.device.type == "cpu"
    # unaugmented (centre crop, no flip): exactly the normal pipeline's normalisation
    index = torch.arange(5)
    plain = dev.batch(index, torch.full((5, 2), 2), torch.zeros(5, dtype=torch.bool))
    test_tf = data.test.transform
    torch.testing.assert_close(plain, torch.stack([test_tf(data.train.images[i]) for i in
                                                   range(5)]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2])
def test_every_image_is_seen_once_per_epoch(world):
    ds = indexed_images(40)
    seen = []
    for rank in range(world):
        loader = device_loader(ds, batch_size=5, device="cpu", seed=7, rank=rank,
                               world_size=world)
        loader.set_epoch(2)
        seen += [int(v) for _, y in loader for v in y]
    assert sorted(seen) == list(range(40))


def test_deterministic_per_seed_and_resumable_mid_epoch():
    ds = indexed_images(40, padding=2)

    def epoch(seed: int, e: int, skip: int = 0) -> list[torch.Tensor]:
        loader = device_loader(ds, batch_size=8, device="cpu", seed=seed)
        loader.set_epoch(e)
        loader.sampler.skip = skip  # what the trainer sets to resume mid-epoch
        return [x for x, _ in loader]

    a, b = epoch(0, 0), epoch(0, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], epoch(1, 0)[0])  # another seed, another order and crops
    assert not torch.equal(a[0], epoch(0, 1)[0])  # another epoch too
    tail = epoch(0, 0, skip=16)
    assert len(tail) == 3 and all(torch.equal(u, v) for u, v in zip(a[2:], tail))


def test_too_big_and_unsupported_datasets_are_refused_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(on_device, "MAX_BYTES", 1000)
    code = main(["fit", "--data-on-device", "--train-limit", "64", "--epochs", "1", "--k", "2",
                 "--no-progress", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("localearn: error: --data-on-device keeps at most 0 GiB"), err
    from torchvision.transforms import v2

    odd = TensorImages(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4),
                       v2.Compose([v2.RandomResizedCrop(8), v2.Normalize(MEAN, STD)]))
    with pytest.raises(on_device.UserError, match="does not support the transform "
                                                   "RandomResizedCrop"):
        device_loader(odd, batch_size=2, device="cpu")


def test_cifar10_shards_are_decoded_once_with_their_augmentation(cifar_shards):
    from localearn.data import cifar10_shards

    data = cifar10_shards(cifar_shards, train_limit=300)
    loader = device_loader(data.train, batch_size=64, device="cpu", workers=0)
    assert loader.images.shape == (300, 3, 32, 32) and loader.images.dtype == torch.uint8
    assert (loader.augment.padding, loader.augment.mode, loader.augment.flip) == (4, "reflect",
                                                                                  True)
    streamed = sorted(int(y) for _, y in data.train)  # the same 300 samples, streamed
    assert sorted(loader.labels.tolist()) == streamed and len(loader) == 4


def tiny_resnet(num_classes: int = 10, **_) -> CifarResNet:
    return CifarResNet(1, num_classes)  # ResNet-8: stem and three blocks


@pytest.fixture
def resnet8(monkeypatch) -> str:
    monkeypatch.setitem(registry._SESSION["model"], "od-resnet8",
                        registry.SessionEntry("od-resnet8", tiny_resnet))
    return "od-resnet8"


def test_digits_fit_with_data_on_device_learns(resnet8, tmp_path):
    # dgl, ResNet-8 in K=2, 3 epochs of batch 32: 94.4%, 94.9%, 95.8% measured with seeds
    # 0, 1, 2; chance is 10%, the bar 85%
    cfg = make_config(rule="dgl", model=resnet8, k=2, epochs=3, batch_size=32, lr=0.1,
                      data_on_device=True, device="cpu", progress=False, output_dir=tmp_path)
    trainer = Trainer(cfg)
    assert isinstance(trainer.train_loader, on_device.DeviceBatches)
    result = trainer.fit()
    assert result.test_acc > 0.85, result.history


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_data_on_device_cuda(resnet8, tmp_path):
    # the CPU test's run on the GPU (other crops and flips: drawn by CUDA's generator)
    cfg = make_config(rule="dgl", model=resnet8, k=2, epochs=3, batch_size=32, lr=0.1,
                      data_on_device=True, device="cuda", progress=False, output_dir=tmp_path)
    trainer = Trainer(cfg)
    x, y = next(iter(trainer.train_loader))
    assert x.is_cuda and y.is_cuda and x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert trainer.train_loader.images.is_cuda  # the whole split lives there
    result = trainer.fit()
    assert result.test_acc > 0.85, result.history
