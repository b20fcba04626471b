"""`SpUNetLayout`, the one UNet description, against independent expectations: the official key listings, the
state_dicts of the modules built from it, a walk of the channel widths through the network, and the engine
that reads a checkpoint by it."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from conftest import KEYS
from model.backbones.engine_backed import EngineBackedV1m1, EngineBackedV1m3
from model.backbones.layout import ConvSpec, NormSpec, SpUNetLayout
from model.backbones.pdnorm import PDBatchNorm
from model.config import BackboneConfig, ModelConfig
from model.engine.unet import SpUNetEngine

CONDITIONS = ("ScanNet", "S3DIS", "Structured3D")
PUBLISHED = dict(in_channels=6, base_channels=32, channels=(32, 64, 128, 256, 256, 128, 96, 96),
                 layers=(2, 3, 4, 6, 2, 2, 2, 2))
SIZES = [  # (in_channels, num_classes, base_channels, channels, layers)
    (6, 20, 32, PUBLISHED["channels"], PUBLISHED["layers"]),
    (6, 0, 32, PUBLISHED["channels"], PUBLISHED["layers"]),
    (4, 0, 8, (8, 16, 16, 8), (1, 2, 1, 3)),            # two stages; the decoder narrower than the stem
    (3, 5, 16, (16, 32, 64, 32, 16, 24), (2, 1, 1, 1, 2, 1)),
    (1, 2, 4, (4, 4), (1, 1)),                          # one stage, no projection anywhere but the concat
]


def _norm_factory(variant: str, affine: bool = True):
    if variant == "v1m1":
        return partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
    return lambda c: PDBatchNorm(c, 256, CONDITIONS, affine=affine)


def _expected(layout: SpUNetLayout, norm) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every backbone tensor the layout names, in order; a norm's own keys from its module."""
    out = []
    for part in layout.parts():
        if isinstance(part, NormSpec):
            out += [(f"{part.key}.{k}", tuple(v.shape)) for k, v in norm(part.channels).state_dict().items()]
        else:
            out.append((f"{part.key}.weight", part.shape))
            if part.bias:
                out.append((f"{part.key}.bias", (part.out_channels,)))
    return out


def _modules(variant: str, size, spconv: bool) -> nn.Module:
    in_ch, classes, base, channels, layers = size
    if spconv:
        from model.backbones.spunet_v1m1 import SpUNetV1m1
        from model.backbones.spunet_v1m3 import SpUNetV1m3

        cls = SpUNetV1m1 if variant == "v1m1" else SpUNetV1m3
    else:
        cls = EngineBackedV1m1 if variant == "v1m1" else EngineBackedV1m3
    return cls(in_ch, classes, base, channels=channels, layers=layers)


@pytest.mark.parametrize("spconv", [False, True], ids=["engine-backed", "spconv"])
@pytest.mark.parametrize("variant", ["v1m1", "v1m3"])
@pytest.mark.parametrize("size", SIZES, ids=[f"size{i}" for i in range(len(SIZES))])
def test_modules_have_exactly_the_described_tensors(variant, size, spconv):
    if spconv:
        pytest.importorskip("spconv.pytorch")
    module = _modules(variant, size, spconv)
    layout = module.layout
    assert layout == SpUNetLayout.build(variant, size[0], size[1], size[2], size[3], size[4])
    got = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    assert got == _expected(layout, _norm_factory(variant))  # names, order and shapes
    assert [k for k, _ in got] == layout.keys(lambda c: list(_norm_factory(variant)(c).state_dict()))
    assert (module.num_stages, module.out_channels, module.channels) == (layout.num_stages, size[3][-1], size[3])


def _read_tsv(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = KEYS / name
    if not path.is_file():
        pytest.skip(f"key listings not found at {KEYS}")
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    prefix = "module.backbone."
    return [(k[len(prefix):], () if s == "scalar" else tuple(int(d) for d in s.split("x")))
            for k, s, _ in rows if k.startswith(prefix)]


@pytest.mark.parametrize("name, variant, num_classes", [
    ("semseg-spunet-v1m1-0-base.tsv", "v1m1", 20),
    ("pretrain-ponder-spunet-v1m1-0-base.tsv", "v1m1", 0),
    ("semseg-ppt-v1m1-0-sc-s3-st-spunet-lovasz-ft.tsv", "v1m3", 0),
    ("pretrain-ponder-ppt-v1m1-0-sc-s3-st-spunet.tsv", "v1m3", 0),
    ("pretrain-ponder-ppt-v1m1-0-sc-s3-st-spunet.70e8ead.tsv", "v1m3", 0),
])
def test_layout_names_exactly_the_published_backbone_keys(name, variant, num_classes):
    layout = SpUNetLayout.build(variant, num_classes=num_classes, **PUBLISHED)
    assert _expected(layout, _norm_factory(variant)) == _read_tsv(name)


def _walk(layout: SpUNetLayout, in_channels: int) -> None:
    """Push a width through the network as the forward passes do and check every conv takes what arrives."""
    def conv(spec: ConvSpec, width: int) -> int:
        assert spec.in_channels == width, spec.key
        return spec.out_channels

    def block(b, width: int) -> int:
        out = conv(b.conv2, conv(b.conv1, width))
        assert b.norm1.channels == b.norm2.channels == out
        if b.proj is None:
            assert width == out, b.key  # identity residual
        else:
            assert conv(b.proj.conv, width) == out == b.proj.norm.channels
        return out

    width = conv(layout.stem.conv, in_channels)
    skips = [width]
    for s in range(layout.num_stages):
        width = conv(layout.down[s].conv, width)
        for b in layout.enc[s]:
            width = block(b, width)
        skips.append(width)
    width = skips.pop()
    for s in reversed(range(layout.num_stages)):
        width = conv(layout.up[s].conv, width) + skips.pop()  # concat [upsampled, skip]
        for b in layout.dec[s]:
            width = block(b, width)
    assert width == layout.out_channels
    if layout.final is not None:
        assert conv(layout.final, width) == layout.num_classes


@pytest.mark.parametrize("variant", ["v1m1", "v1m3"])
@pytest.mark.parametrize("size", SIZES, ids=[f"size{i}" for i in range(len(SIZES))])
def test_widths_flow_through_the_network(variant, size):
    in_ch, classes, base, channels, layers = size
    layout = SpUNetLayout.build(variant, in_ch, classes, base, channels, layers)
    _walk(layout, in_ch)
    assert [len(stage) for stage in layout.enc] + [len(stage) for stage in reversed(layout.dec)] == list(layers)
    kinds = [(c.kind, c.indice_key, c.kernel_size) for c in (layout.stem.conv, layout.down[0].conv, layout.up[0].conv)]
    assert kinds == [("subm", "stem", 5), ("down", "spconv1", 2), ("inverse", "spconv1", 2)]
    assert {b.conv1.indice_key for b in layout.dec[0]} == {"subm0"}  # level 0's submanifold maps
    assert {b.conv2.indice_key for b in layout.enc[0]} == {"subm1"}


def test_published_decoder_concat_widths():
    layout = SpUNetLayout.build("v1m3", **PUBLISHED)
    assert [stage[0].in_channels for stage in layout.dec] == [96 + 32, 96 + 32, 128 + 64, 256 + 128]
    assert [stage[0].proj.conv.key for stage in layout.dec] == [f"dec.{s}.block0.proj_conv" for s in range(4)]
    assert all(b.proj is None for stage in layout.enc for b in stage)


def test_bad_descriptions_are_refused():
    with pytest.raises(ValueError, match="same even length"):
        SpUNetLayout.build("v1m1", 6, channels=(32, 64, 96), layers=(1, 1, 1))
    with pytest.raises(ValueError, match="unknown SpUNet variant"):
        SpUNetLayout.build("v2", 6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backbone type"):
        SpUNetLayout.from_config(BackboneConfig(type="PTv3"))


def _random_state_dict(module: nn.Module, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            v = torch.rand(v.shape, generator=gen) + (0.5 if k.endswith("running_var") else 0.0)
        sd[prefix + k] = v
    return sd


def _engine_inputs(variant: str, size) -> tuple[nn.Module, dict[str, torch.Tensor], ModelConfig]:
    """An engine-backed module (PDNorm without context, so no wrapper embedding is needed), random weights
    in its layout, and the config naming that size."""
    in_ch, classes, base, channels, layers = size
    if variant == "v1m1":
        module = EngineBackedV1m1(in_ch, classes, base, channels=channels, layers=layers)
    else:
        module = EngineBackedV1m3(in_ch, classes, base, channels=channels, layers=layers, norm_adaptive=False)
    bb = BackboneConfig(type=f"SpUNet-{variant}", in_channels=in_ch, num_classes=classes, base_channels=base,
                        channels=channels, layers=layers, norm_adaptive=False)
    return module, _random_state_dict(module), ModelConfig(kind="segmentor", backbone=bb)


@pytest.mark.parametrize("variant", ["v1m1", "v1m3"])
def test_engine_reads_the_described_keys(variant):
    module, sd, config = _engine_inputs(variant, SIZES[3])
    engine = SpUNetEngine(sd, config)
    assert engine.layout == module.layout and engine.head == "final" and engine.num_levels == 4
    projections = [[hasattr(b, "wp") for b in stage] for stage in (*engine.enc, *engine.dec)]
    assert projections == [[b.proj is not None for b in stage] for stage in (*module.layout.enc, *module.layout.dec)]
    key = "backbone.dec.1.block0.conv1.weight"
    sd[key] = sd[key][..., :-1]
    with pytest.raises(ValueError, match=r"dec\.1\.block0\.conv1\.weight has shape"):
        SpUNetEngine.from_state_dict(sd, config)
    del sd[key]
    with pytest.raises(ValueError, match="missing key"):
        SpUNetEngine.from_state_dict(sd, config)


def test_engine_condition_index_follows_the_shared_rule():
    engines = {}
    for variant in ("v1m1", "v1m3"):
        _, sd, config = _engine_inputs(variant, SIZES[4])
        engines[variant] = SpUNetEngine(sd, config)
    v1m1, v1m3 = engines["v1m1"], engines["v1m3"]
    assert [v1m1.condition_index(c) for c in (None, "", "default", 0)] == [0, 0, 0, 0]  # the graphs' placeholder
    assert v1m3.conditions == CONDITIONS
    assert [v1m3.condition_index(c) for c in ("ScanNet", "S3DIS", 2, None)] == [0, 1, 2, 0]  # None: the default
    for engine, bad, words in ((v1m1, "ScanNet", "takes no condition"), (v1m1, 1, "takes no condition"),
                               (v1m3, "Matterport", "unknown condition"), (v1m3, 3, "out of range")):
        with pytest.raises(ValueError, match=words):
            engine.condition_index(bad)
