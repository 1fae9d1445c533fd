"""The evaluation protocols against the code that defines them, on real photographs (scikit-learn's china.jpg and
flower.jpg) saved as files the way they come: JPEG at several qualities, a CMYK JPEG, EXIF-rotated JPEGs, palette
PNGs, extreme aspect ratios.

References: ``original`` is the authors' ``build_transform(is_train=False)`` (whai362/PVT ``datasets.py``, DeiT's),
written here with torchvision; ``timm`` is ``timm.data.create_transform(**resolve_data_config(...))`` of timm's own
``pvt_v2_b0``; both are fed the image pvtv2 reads (``load_image``), so what is compared is the resize, crop and
normalisation (loading differs on purpose, see the README). Tolerance 1e-6: torchvision's ``ToTensor`` divides in
float32 where pvtv2 multiplies by 1/255 in float64, which may differ in the last bit.
"""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from pvtv2.data.processing import IMAGENET_MEAN, IMAGENET_STD, PvtV2ImageProcessor, load_image
from pvtv2.inference import load_processor

T = pytest.importorskip("torchvision.transforms")


def _authors_eval_transform(input_size: int):
    # whai362/PVT datasets.py build_transform(is_train=False), verbatim but for the names.
    t = []
    if input_size > 32:
        t.append(T.Resize(int((256 / 224) * input_size), interpolation=3))
        t.append(T.CenterCrop(input_size))
    t.append(T.ToTensor())
    t.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(t)


@pytest.fixture(scope="module")
def photo():
    datasets = pytest.importorskip("sklearn.datasets")
    return PIL.Image.fromarray(datasets.load_sample_images().images[0])  # china.jpg, 427x640


@pytest.mark.parametrize("size", [32, 16])
def test_original_protocol_at_32_pixels_or_fewer_does_not_resize_as_the_authors(photo, size):
    # The authors resize and crop only when input_size > 32 (CIFAR-sized inputs go in as they are); pvtv2 resized a
    # 32x32 image up to 36 and cropped 32 from it.
    image = photo.crop((300, 200, 300 + size, 200 + size))
    ours = PvtV2ImageProcessor.from_protocol("original", size)(image)["pixel_values"][0]
    theirs = _authors_eval_transform(size)(image)
    assert ours.shape == theirs.shape == (3, size, size)
    assert (ours - theirs).abs().max().item() < 1e-6
    # and it is still named: `pvtv2 eval --json` reports `"preprocess": processor.protocol or "custom"`
    assert PvtV2ImageProcessor.from_protocol("original", size).protocol == "original"
    assert PvtV2ImageProcessor(size=size, do_resize=False).protocol is None  # bilinear: not the authors' settings


@pytest.fixture(scope="module")
def files(photo, tmp_path_factory):
    """china.jpg as files of the kinds that come in: JPEG (two qualities), CMYK JPEG, a JPEG whose EXIF says rotate
    90 degrees (orientation 6), a palette PNG with a transparent index, and a 4000x30 strip."""
    folder = tmp_path_factory.mktemp("protocol_photos")
    photo.save(folder / "q40.jpg", quality=40)
    photo.save(folder / "q95.jpg", quality=95)
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    photo.save(folder / "exif6.jpg", quality=90, exif=exif)
    photo.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png", transparency=3)
    photo.resize((4000, 30)).save(folder / "strip.jpg", quality=90)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("size", [224, 256, 384])
def test_original_protocol_equals_the_authors_eval_transform_on_real_files(files, size):
    processor = load_processor("unused", size, protocol="original")
    reference = _authors_eval_transform(size)
    batch = processor([str(path) for path in files])["pixel_values"]
    for ours, path in zip(batch, files):
        theirs = reference(load_image(path))
        assert ours.shape == theirs.shape == (3, size, size)
        assert (ours - theirs).abs().max().item() < 1e-6, path.name
        assert ours.std().item() > 0.3, path.name  # a photograph, not a blank


@pytest.mark.parametrize("size", [224, 384])
def test_timm_protocol_equals_timms_eval_transform_of_its_pvt_v2_on_real_files(files, size):
    timm = pytest.importorskip("timm")
    reference_model = timm.create_model("pvt_v2_b0", pretrained=False)
    config = timm.data.resolve_data_config({"input_size": (3, size, size)}, model=reference_model)
    assert (config["crop_pct"], config["interpolation"]) == (0.9, "bicubic")
    reference = timm.data.create_transform(**config)
    processor = load_processor("unused", size, protocol="timm")
    batch = processor([str(path) for path in files])["pixel_values"]
    for ours, path in zip(batch, files):
        theirs = reference(load_image(path))
        assert ours.shape == theirs.shape == (3, size, size)
        assert (ours - theirs).abs().max().item() < 1e-6, path.name


def test_a_timm_file_is_scored_as_timm_scores_it_on_real_files(files, tmp_path):
    # A timm pvt_v2_b0 written as timm saves it: pvtv2 reads it, picks the timm protocol by itself, and its logits
    # on the files are timm's model on timm's eval transform (float32 rounding of the two implementations).
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from pvtv2.inference import load_classifier

    torch.manual_seed(0)
    reference_model = timm.create_model("pvt_v2_b0", pretrained=False).eval()
    with torch.no_grad():
        for parameter in reference_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)  # spread the logits so top-1 means something
    path = tmp_path / "pvt_v2_b0.safetensors"
    save_file({key: value.contiguous() for key, value in reference_model.state_dict().items()}, path)
    model = load_classifier(path).eval()
    processor = load_processor(path, 224, origin=model.checkpoint_layout)
    assert processor.protocol == "timm"
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference_model))
    with torch.no_grad():
        ours = model(processor([str(p) for p in files])["pixel_values"]).logits
        theirs = reference_model(torch.stack([reference(load_image(p)) for p in files]))
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert theirs.std().item() > 0.1


def test_training_reads_the_pixels_evaluation_reads(files):
    # The training loader (ImageFolder: load_image, then the transform) and evaluation (the processor on the path)
    # see the same upright, transparency-painted pixels: the validation transform gives the processor's numbers, and
    # a training crop of the whole image, unflipped, is the same resize as evaluation's.
    from pvtv2.data.folders import EvalTransform, ImageFolder, TrainTransform

    processor = PvtV2ImageProcessor.from_protocol("original", 64)
    validation = ImageFolder([(str(path), 0) for path in files], EvalTransform(64, processor))
    for index, path in enumerate(files):
        assert torch.equal(validation[index][0], processor(str(path))["pixel_values"][0]), path.name
        upright = load_image(path)
        ratio = upright.width / upright.height
        train = ImageFolder([(str(path), 0)], TrainTransform(48, scale=(1.0, 1.0), ratio=(ratio, ratio), hflip=0.0))
        expected = PvtV2ImageProcessor(size=48)(str(path))["pixel_values"][0]
        assert (train[0][0] - expected).abs().max().item() < 1e-5, path.name
    # And the rotation is applied: the 640x427 photograph saved with orientation 6 is read 427 wide, 640 high.
    assert load_image(next(p for p in files if p.name == "exif6.jpg")).size == (427, 640)


def test_a_one_pixel_strip_at_384_is_the_authors_pixels(photo):
    # Shorter side 1 -> 438 makes 438 x 280,320 pixels on the way to the crop: over PIL.Image.MAX_IMAGE_PIXELS, under
    # the twice of it where PIL refuses to open an image. The processor's pixel bound was once, and refused the strip
    # that the authors' (and timm's) transforms take.
    strip = photo.crop((0, 200, 640, 201))  # 640 x 1
    ours = PvtV2ImageProcessor.from_protocol("original", 384)(strip)["pixel_values"][0]
    theirs = _authors_eval_transform(384)(strip)
    assert ours.shape == theirs.shape == (3, 384, 384)
    assert (ours - theirs).abs().max().item() < 1e-6
