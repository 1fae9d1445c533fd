"""Results users look at, checked against independent references: ``pvtv2 info``'s parameter count against
transformers' model, its multiply-adds against a hand count from the architecture (and the paper's Table 1), pictures
against the model's own outputs; and the ONNX serving's external-data check on legitimate layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pvtv2.flops import count_macs
from pvtv2.models.config import PvtV2Config
from pvtv2.models.modeling import PvtV2ForImageClassification

from conftest import TINY, hf_twin


def _side(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def hand_macs(config: PvtV2Config, height: int, width: int) -> int:
    """Multiply-adds of a PVTv2 classifier from the paper's architecture, written out: overlapping patch embedding
    (kernel p, stride s, padding p // 2), per block query/key/value/projection, spatial reduction (an sr x sr conv of
    stride sr, or 7x7 average pooling then a 1x1 conv), Q K^T and A V, Mix-FFN (fc1, 3x3 depthwise conv, fc2), and the
    classifier. Biases, norms, activations, softmax and pooling are not counted."""
    total, channels = 0, config.num_channels
    for i in range(config.num_encoder_blocks):
        p, s, c = config.patch_sizes[i], config.strides[i], config.hidden_sizes[i]
        height, width = _side(height, p, s, p // 2), _side(width, p, s, p // 2)
        n = height * width
        total += n * channels * c * p * p
        hidden = int(c * config.mlp_ratios[i])
        for _ in range(config.depths[i]):
            if config.linear_attention:
                keys = 7 * 7
                total += keys * c * c  # 1x1 conv on the pooled grid
            elif config.sr_ratios[i] > 1:
                r = config.sr_ratios[i]
                keys = (height // r) * (width // r)
                total += keys * c * c * r * r
            else:
                keys = n
            total += n * c * c  # query
            total += 2 * keys * c * c  # key, value
            total += 2 * n * keys * c  # Q K^T, A V
            total += n * c * c  # projection
            total += n * c * hidden + n * hidden * 9 + n * hidden * c  # fc1, depthwise 3x3, fc2
        channels = c
    return total + channels * config.num_labels


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("size", [(224, 224), (64, 64), (37, 53), (95, 33)])
def test_macs_equal_a_hand_count(linear, size):
    config = PvtV2Config(**TINY, linear_attention=linear, num_labels=5)
    with torch.device("meta"):
        model = PvtV2ForImageClassification(config)
    counted = count_macs(model, size)
    assert counted["macs"] == hand_macs(config, *size)
    assert sum(counted["per_stage_macs"]) + counted["head_macs"] == counted["macs"]
    assert counted["head_macs"] == 64 * 5


@pytest.mark.parametrize("preset", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_preset_macs_hand_count_and_paper(preset):
    """At 224 the hand count of the full preset is the paper's Table 1 figure to its one decimal."""
    from pvtv2.flops import PAPER_GMACS

    config = PvtV2Config.from_preset(preset)
    with torch.device("meta"):
        model = PvtV2ForImageClassification(config)
    macs = count_macs(model, 224)["macs"]
    assert macs == hand_macs(config, 224, 224)
    assert round(macs / 1e9, 1) == PAPER_GMACS[preset]


def test_info_parameters_equal_transformers(tmp_path, capsys):
    """``pvtv2 info --json`` of a saved tiny model: parameters = sum(numel) of transformers' model built from the file's
    config with those weights, stage outputs and compute as counted by hand."""
    from pvtv2.cli import main

    torch.manual_seed(0)
    config = PvtV2Config(**TINY, num_labels=3, sr_ratios=[4, 2, 1, 1])
    model = PvtV2ForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--image-size", "40x56", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    theirs = hf_twin(model)
    assert summary["parameters"] == sum(p.numel() for p in theirs.parameters())
    assert summary["num_labels"] == 3
    assert [s["output"] for s in summary["stages"]] == [[10, 14], [5, 7], [3, 4], [2, 2]]
    assert summary["stages"][0]["attention"] == "sr 4" and summary["stages"][3]["attention"] == "full"
    assert math.isclose(summary["gmacs"] * 1e9, hand_macs(config, 40, 56), rel_tol=1e-12)
    assert math.isclose(summary["gflops"], 2 * summary["gmacs"])
    assert "paper_gmacs" not in summary


def test_attention_maps_are_transformers_attention_probabilities():
    """attention_maps' per-stage map = transformers' attention probabilities of the stage's last block, averaged over
    heads and queries, on a non-square input."""
    from pvtv2.visualize import attention_maps

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=3)).eval()
    x = torch.randn(1, 3, 64, 96)
    maps = attention_maps(model, x)
    with torch.no_grad():
        theirs = hf_twin(model).eval()(x, output_attentions=True).attentions
    assert [m["keys"] for m in maps] == [(2, 3), (2, 3), (2, 3), (2, 3)]
    assert [m["tokens"] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for m, stage in zip(maps, theirs):  # transformers gives each stage's blocks' attentions
        expected = stage[-1][0].mean(dim=(0, 1)).reshape(m["keys"]).numpy()
        assert abs(m["map"].sum() - 1) < 1e-5
        assert abs(m["map"] - expected).max() < 1e-5


def test_segmentation_overlay_colours_are_the_argmax():
    import numpy as np
    import PIL.Image

    from pvtv2.visualize import LEGEND_WIDTH, palette, segmentation_picture

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (13, 29))
    labels[labels == 2] = 3  # class 2 absent: no legend row for it
    image = PIL.Image.fromarray(rng.integers(0, 256, (13, 29, 3), dtype=np.uint8))
    picture = segmentation_picture(image, labels, {0: "a", 1: "b", 2: "c", 3: "d"}, alpha=1.0)
    scale = math.ceil(256 / 13)
    assert picture.size == (29 * scale + LEGEND_WIDTH, 13 * scale)
    drawn = np.asarray(picture)[: 13 * scale : scale, : 29 * scale : scale]
    assert (drawn == palette(4)[labels]).all()
    assert len({tuple(c) for c in palette(4)}) == 4  # distinct colours: the argmax is read back from the picture


def test_depth_picture_colours_follow_depth_order():
    """The right half's colours, located on the viridis ramp, are in the order of the depths (near dark, far bright),
    the nearest at the ramp's start and the farthest at its end."""
    import numpy as np
    import PIL.Image

    from pvtv2.visualize import depth_picture, viridis_lut

    depth = np.random.default_rng(1).permutation(np.linspace(0.5, 9.0, 5 * 300)).reshape(5, 300)
    image = PIL.Image.new("RGB", (300, 5), (9, 9, 9))
    picture = depth_picture(image, depth, min_side=5)
    assert picture.size == (600, 5)
    right = np.asarray(picture)[:, 300:].reshape(-1, 3).astype(int)
    lut = viridis_lut().astype(int)
    index = np.abs(right[:, None, :] - lut[None]).sum(-1).argmin(1)
    order = np.argsort(depth.reshape(-1), kind="stable")
    assert (np.diff(index[order]) >= 0).all()
    assert index[order[0]] == 0 and index[order[-1]] == 255


@pytest.mark.parametrize("linear", [False, True])
def test_a_frozen_model_follows_the_onednn_switch_in_another_thread(linear):
    """The switch entered and left between calls of a frozen model, in a worker thread: under it the reference path's
    computation bit for bit, after it the fast path's again."""
    import threading

    import pvtv2.fast as fast

    if not fast.fast_path_available():
        pytest.skip("no oneDNN fast path on this build")
    torch.manual_seed(3)
    model = PvtV2ForImageClassification(PvtV2Config(**TINY, num_labels=5, linear_attention=linear)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 3, 61, 47)
    with torch.no_grad():
        with torch.backends.mkldnn.flags(enabled=False), fast.fast_path(False):
            reference = model(x).logits
        fast.freeze(model)
        on = model(x).logits
    assert not torch.equal(on, reference)  # the two summations differ: the comparison below can tell them apart
    got = {}

    def work():
        with torch.no_grad():
            with torch.backends.mkldnn.flags(enabled=False):
                got["off"] = model(x).logits
            got["on"] = model(x).logits

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert torch.equal(got["off"], reference)
    assert torch.equal(got["on"], on)


def test_onnx_served_through_a_linked_folder_and_refused_through_a_linked_file(tmp_path):
    """A folder link (data beside the file, through the link) is served, as onnxruntime serves it; a link to the file
    alone, whose data stays beside the link's target, is refused naming the data file, as onnxruntime refuses it."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pvtv2.export import export_onnx
    from pvtv2.inference import onnx_runtime

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**dict(TINY, depths=[1, 1, 1, 1]), num_labels=3)).eval()
    export_onnx(model, tmp_path / "g.onnx", exporter="torchscript", check_sizes=[(1, 64, 64)])
    (tmp_path / "real").mkdir()
    onnx.save(onnx.load(tmp_path / "g.onnx"), tmp_path / "real" / "m.onnx", save_as_external_data=True,
              location="./m.data", size_threshold=0)
    (tmp_path / "folder_link").symlink_to(tmp_path / "real")
    (tmp_path / "file_link").mkdir()
    (tmp_path / "file_link" / "m.onnx").symlink_to(tmp_path / "real" / "m.onnx")
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x).logits
    session = ort.InferenceSession(str(tmp_path / "folder_link" / "m.onnx"), providers=["CPUExecutionProvider"])
    assert abs(session.run(None, {"pixel_values": x.numpy()})[0] - expected.numpy()).max() < 1e-4
    onnx_runtime(tmp_path / "folder_link" / "m.onnx", model)  # served
    with pytest.raises(Exception):
        ort.InferenceSession(str(tmp_path / "file_link" / "m.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match=r"'\./m\.data', which does not exist in .*file_link"):
        onnx_runtime(tmp_path / "file_link" / "m.onnx", model)


def test_fixed_size_declarations_leave_external_data_where_the_exporter_put_it(tmp_path):
    """The TorchScript exporter keeps a model past 2 GB in data files beside the graph; the export's rewrite of the
    output declarations loaded them back into the graph and saved it whole, past protobuf's limit ("EncodeError:
    Failed to serialize proto", every export of such a model failed). The rewrite now touches the graph alone: here, a
    small graph whose weights are in a data file stays small, still points at its data, and computes the same."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pvtv2.export import _declare_fixed_sizes, export_onnx

    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**dict(TINY, depths=[1, 1, 1, 1]), num_labels=3)).eval()
    export_onnx(model, tmp_path / "g.onnx", exporter="torchscript", check_sizes=[(1, 64, 64)])
    proto = onnx.load(tmp_path / "g.onnx")
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"  # as the exporter declares it
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    graph_bytes = (tmp_path / "m.onnx").stat().st_size
    _declare_fixed_sizes(tmp_path / "m.onnx", ["logits"], [(2, 3)])
    assert (tmp_path / "m.onnx").stat().st_size < graph_bytes + 100  # the weights were not written into the graph
    saved = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert saved.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer if t.dims and
               math.prod(t.dims) > 16)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(x).logits.numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4
