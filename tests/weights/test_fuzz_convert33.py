"""What a seeded differential search of ``convert_checkpoint`` found, and a compact seeded slice of it.

Found: a file holding one weight under two keys that both name it (timm's ``stages.0.`` beside its features_only
spelling ``stages_0.``, transformers' ``pvt_v2.encoder.`` beside ``encoder.``) loaded and converted as whichever key
came last, a silent mix of two models; it is now refused naming both keys (the same numbers twice still load).

The slice: random tiny classifiers and encoders (1-4 stages, linear attention, odd label counts, float16 / bfloat16 /
float64 storage) written by pvtv2, by transformers or as timm's and the authors' files, converted to a folder or to
each single-file layout and on through a second layout; each output is read by the code whose layout it claims
(transformers' ``from_pretrained`` or a strict ``load_state_dict``, ``timm.create_model`` with the file as its
pretrained weights, pvtv2 for the authors' layout) and must give the source's outputs in float64 to 1e-10, keep the
stored dtype, and hold exactly the target layout's keys.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from pvtv2 import CheckpointError, PvtV2Config, PvtV2ForImageClassification, PvtV2Model
from pvtv2.export import convert_checkpoint
from pvtv2.weights.files import read_state_dict, save_state_dict
from pvtv2.weights.layouts import convert_state_dict

from conftest import TINY, hf_config, random_weights_

# The epsilons of the original code and timm (a file without config.json is read with them).
TIMM_EPS = dict(patch_embed_layer_norm_eps=1e-5, reduction_layer_norm_eps=1e-5)


def _tiny(cls=PvtV2ForImageClassification, seed=0, **kw):
    return random_weights_(cls(PvtV2Config(**dict(TINY, **TIMM_EPS, **kw))), seed).eval()


# ---------------------------------------------------------------------------------------------- the defect found
@pytest.mark.parametrize("spelling", ["timm", "transformers"])
def test_a_weight_under_two_keys_with_different_numbers_is_refused_naming_both(tmp_path, spelling):
    first, second = _tiny(num_labels=3), _tiny(num_labels=3, seed=1)
    if spelling == "timm":
        state = convert_state_dict(first.state_dict(), "timm")
        state.update({k.replace("stages.", "stages_", 1): v
                      for k, v in convert_state_dict(second.state_dict(), "timm").items() if k.startswith("stages.")})
        shown = ("'stages.0.", "'stages_0.")
    else:
        state = dict(first.state_dict())
        state.update({k[len("pvt_v2."):]: v for k, v in second.state_dict().items() if k.startswith("pvt_v2.")})
        shown = ("'pvt_v2.encoder.layers.0.", "'encoder.layers.0.")
    source = save_state_dict(state, tmp_path / "two.safetensors")
    # was: converted without a word, the encoder taken key by key from whichever model's spelling came last
    with pytest.raises(CheckpointError, match="both the weight") as caught:
        convert_checkpoint(source, tmp_path / "out")
    assert all(s in str(caught.value) for s in shown), str(caught.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="both the weight"):
        PvtV2ForImageClassification.from_pretrained(source)


def test_a_weight_under_two_keys_with_the_same_numbers_still_loads(tmp_path):
    model = _tiny(num_labels=3)
    state = convert_state_dict(model.state_dict(), "timm")
    state.update({k.replace("stages.", "stages_", 1): v for k, v in state.items() if k.startswith("stages.")})
    source = save_state_dict(state, tmp_path / "twice.safetensors")
    convert_checkpoint(source, tmp_path / "out")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = PvtV2ForImageClassification.from_pretrained(tmp_path / "out").eval()(x).logits
        assert torch.equal(got, model(x).logits)


# ------------------------------------------------------------------------------------------------ the seeded slice
def _config(rng):
    n = rng.randint(1, 4)
    width = rng.choice([4, 8])
    heads = [1] + [rng.choice([1, 2, 3]) for _ in range(n - 1)]  # heads = widths / widths[0]: what a bare file reads
    return dict(num_encoder_blocks=n, depths=[rng.randint(1, 2) for _ in range(n)], hidden_sizes=[h * width for h in heads],
                num_attention_heads=heads, mlp_ratios=[rng.choice([1, 2, 3]) for _ in range(n)],
                sr_ratios=[rng.choice([1, 2, 4]) for _ in range(n)], linear_attention=rng.random() < 0.4,
                patch_sizes=[7, 3, 3, 3][:n], strides=[4, 2, 2, 2][:n], **TIMM_EPS)


def _timm(config, num_classes, file=None):
    import timm

    kw = dict(depths=config.depths, embed_dims=config.hidden_sizes, num_heads=config.num_attention_heads,
              mlp_ratios=config.mlp_ratios, sr_ratios=config.sr_ratios, linear=config.linear_attention,
              num_classes=num_classes)
    if file is None:
        return timm.create_model("pvt_v2_b0", pretrained=False, **kw).eval()
    # num_classes in the overlay too: else timm drops a head of another size than its 1000 and draws a random one
    return timm.create_model("pvt_v2_b0", pretrained=True, **kw,
                             pretrained_cfg_overlay=dict(file=str(file), num_classes=num_classes)).eval()


def _write_source(rng, model, folder, dtype):
    """The model stored in ``dtype`` in a random layout, written by the code that owns the layout where it can be."""
    import transformers

    stored = {k: v.to(dtype) for k, v in model.state_dict().items()}
    how = rng.choice(["pvtv2", "transformers", "timm", "original"])
    if how == "pvtv2":
        twin = type(model)(model.config).to(dtype)
        twin.load_state_dict(stored)
        kwargs = rng.choice([{}, {"max_shard_size": "20KB"}, {"safe_serialization": False}])
        twin.save_pretrained(folder, **kwargs)
        return folder, how
    if how == "transformers":
        cls = (transformers.PvtV2ForImageClassification if isinstance(model, PvtV2ForImageClassification)
               else transformers.PvtV2Model)
        twin = cls(hf_config(model.config)).to(dtype)
        twin.load_state_dict(stored, strict=True)
        twin.save_pretrained(folder, **rng.choice([{}, {"max_shard_size": "20KB"}]))
        return folder, how
    folder.mkdir()
    if how == "timm":
        twin = _timm(model.config, getattr(model.config, "num_labels", 0)
                     if isinstance(model, PvtV2ForImageClassification) else 0).to(dtype)
        twin.load_state_dict(convert_state_dict(stored, "timm"), strict=True)
        state = {k: v.contiguous() for k, v in twin.state_dict().items()}
        name = rng.choice(["w.safetensors", "w.pth"])
        if name.endswith(".pth"):
            torch.save(state, folder / name)
        else:
            save_state_dict(state, folder / name)
        return folder / name, how
    torch.save({"model": convert_state_dict(stored, "original")}, folder / "w.pth")
    return folder / "w.pth", how


def _forward(model, x):
    with torch.no_grad():
        out = model.double()(x)
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def _check_file(path, layout, model, x, expected, expected_hf, what):
    """``path``, a ``layout`` file of ``model``, read by that layout's code, against ``expected`` (``expected_hf``
    for transformers, whose code has one LayerNorm epsilon)."""
    import transformers

    state = read_state_dict(path)
    assert set(state) == set(convert_state_dict(model.state_dict(), layout)), what
    classifier = isinstance(model, PvtV2ForImageClassification)
    if layout == "timm":
        theirs = _timm(model.config, model.config.num_labels if classifier else 0, path)
        got = _forward(theirs, x) if classifier else theirs.double().forward_features(x)
    elif layout == "transformers":
        theirs = (transformers.PvtV2ForImageClassification if classifier else transformers.PvtV2Model)(
            hf_config(model.config))
        theirs.load_state_dict(state, strict=True)
        expected = expected_hf
        got = _forward(theirs.eval(), x)
    else:
        got = _forward(type(model).from_pretrained(path).eval(), x)
    assert (got - expected).abs().max().item() <= 1e-10 * max(1.0, expected.abs().max().item()), what
    return state


@pytest.mark.parametrize("seed", range(10))
def test_seeded_conversions_give_the_sources_outputs_where_their_layout_is_read(tmp_path, seed):
    import transformers

    rng = random.Random(3300 + seed)
    kw = _config(rng)
    classifier = rng.random() < 0.6
    if classifier:
        labels = rng.choice([1, 3, 5, 7])
        model = random_weights_(PvtV2ForImageClassification(PvtV2Config(
            **kw, id2label={i: f"class {i}" for i in range(labels)})), seed).eval()
    else:
        model = random_weights_(PvtV2Model(PvtV2Config(**kw)), seed).eval()
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
    source, how = _write_source(rng, model, tmp_path / "source", dtype)
    # the model as stored, in float64: the answer every conversion must keep
    stored = type(model)(model.config)
    stored.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = _forward(stored.eval(), x)
    # what transformers' code (one LayerNorm epsilon, 1e-6) computes with these weights
    hf_eps = type(model)(model.config.replace(**{k: None for k in TIMM_EPS}))
    hf_eps.load_state_dict(stored.state_dict())
    expected_hf = _forward(hf_eps.eval(), x)
    assert not torch.equal(expected, expected_hf)  # the epsilons matter: a conversion mixing them up shows
    what = f"seed {seed}: {how} source, {dtype}, config {kw}"

    # to a folder: transformers reads it where its one epsilon is the model's, pvtv2 always
    folder = tmp_path / "folder"
    convert_checkpoint(source, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == kw["num_attention_heads"], what
    if classifier and how != "timm" and how != "original":
        assert config["id2label"] == {str(i): f"class {i}" for i in range(labels)}, what
    weights = read_state_dict(folder / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {dtype}, what
    got = _forward(type(model).from_pretrained(folder).eval(), x)
    assert (got - expected).abs().max().item() <= 1e-10 * max(1.0, expected.abs().max().item()), what
    cls = transformers.PvtV2ForImageClassification if classifier else transformers.PvtV2Model
    theirs = cls.from_pretrained(folder, dtype=dtype)  # reads weights and config, not our epsilons
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in weights.items()), what

    # to a file of each layout, then on to another layout and back to a folder
    first, second = rng.sample(["transformers", "timm", "original"], 2)
    one = tmp_path / ("one" + rng.choice([".safetensors", ".pth", ".bin"]))
    convert_checkpoint(source, one, first)
    state = _check_file(one, first, stored, x, expected, expected_hf, what + f" -> {first}")
    assert {v.dtype for v in state.values()} == {dtype}, what
    two = tmp_path / ("two" + rng.choice([".safetensors", ".pt"]))
    convert_checkpoint(one, two, second)
    _check_file(two, second, stored, x, expected, expected_hf, what + f" -> {first} -> {second}")
    back = tmp_path / "back"
    convert_checkpoint(two, back)
    assert {v.dtype for v in read_state_dict(back / "model.safetensors").values()} == {dtype}, what
    got = _forward(type(model).from_pretrained(back).eval(), x)
    # a bare transformers file is read with transformers' one epsilon, a timm or authors' file with theirs
    want = expected_hf if second == "transformers" else expected
    assert (got - want).abs().max().item() <= 1e-10 * max(1.0, want.abs().max().item()), what


@pytest.mark.parametrize("kwargs", [dict(max_shard_size="20KB"), dict(max_shard_size="20KB", safe_serialization=False)])
def test_a_sharded_save_pretrained_folder_is_a_checkpoints_folder_to_convert_over(tmp_path, kwargs):
    model = _tiny(num_labels=3)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).logits
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, **kwargs)
    assert len(list(sharded.glob("*-00002-of-*"))) == 1  # the case: shards beside their index
    # was: "already holds files that are not a checkpoint's (model-00001-of-00024.safetensors, ...)", over itself and
    # over an earlier sharded output alike
    convert_checkpoint(sharded, sharded)
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(PvtV2ForImageClassification.from_pretrained(sharded).eval()(x).logits, expected)
    earlier = tmp_path / "earlier"
    model.save_pretrained(earlier, **kwargs)
    convert_checkpoint(sharded, earlier)
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", "model.safetensors"]
    # anything else beside the shards is still someone's data
    model.save_pretrained(earlier, **kwargs)
    (earlier / "model-00001-of-00002.safetensors.notes").write_text("mine")
    with pytest.raises(FileExistsError, match="model-00001-of-00002.safetensors.notes"):
        convert_checkpoint(sharded, earlier)
    assert (earlier / "model-00001-of-00002.safetensors.notes").read_text() == "mine"
