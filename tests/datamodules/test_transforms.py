"""Face transforms: shapes and dtypes for grayscale/RGB input to 1- and 3-channel models, the bounds of flip,
rotation and erasing (deterministic by seed), and a deterministic eval transform."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules.transforms import MultiView, ToMode, eval_transform, train_transform

SIZE = 32


def aug(**overrides):
    """data.augment with everything random switched off unless asked for (crop scale 1 = the whole image)."""
    base = {"preset": "fer", "crop_scale": [1.0, 1.0], "hflip": 0.0, "rotation": 0.0, "color_jitter": 0.0,
            "random_erasing": 0.0}
    return OmegaConf.create({**base, **overrides})


def norm(channels: int) -> tuple[list[float], list[float]]:
    return [0.5] * channels, [0.5] * channels


def gradient_image(mode: str, size: int = SIZE) -> Image.Image:
    """Left-to-right ramp (so a flip is visible), red-tinted in RGB (so a grayscale conversion is visible)."""
    ramp = np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1))
    if mode == "L":
        return Image.fromarray(ramp)
    return Image.fromarray(np.stack([ramp, ramp // 2, np.zeros_like(ramp)], -1))


@pytest.mark.parametrize("preset", ["fer", "light", "none"])
@pytest.mark.parametrize("input_mode", ["L", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_and_dtype_for_any_input_and_model_channels(preset, input_mode, channels):
    image = gradient_image(input_mode, size=48)  # another size than the model's: resized to SIZE
    mean, std = norm(channels)
    torch.manual_seed(0)
    train = train_transform(OmegaConf.create({**aug(), "preset": preset, "hflip": 0.5, "rotation": 10.0,
                                              "color_jitter": 0.3, "random_erasing": 0.25,
                                              "crop_scale": [0.8, 1.0]}), SIZE, channels, mean, std)
    for out in (train(image), eval_transform(SIZE, mean, std)(image)):
        assert out.shape == (channels, SIZE, SIZE) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    if channels == 3 and input_mode == "L":  # gray replicated into R, G and B
        out = eval_transform(SIZE, mean, std)(image)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_rgb_to_a_one_channel_model_is_luminance():
    rgb = gradient_image("RGB")
    expected = eval_transform(SIZE, [0.5], [0.5])(rgb.convert("L"))
    assert torch.equal(eval_transform(SIZE, [0.5], [0.5])(rgb), expected)
    assert ToMode(3)(rgb) is rgb  # already the right mode: untouched
    with pytest.raises(ValueError, match="data.channels=2"):
        ToMode(2)
    with pytest.raises(ValueError, match=r"data.mean=\[0.5\].*expected 3 values"):
        train_transform(aug(), SIZE, 3, [0.5], [0.5])


def test_eval_transform_is_deterministic_and_exact():
    image = gradient_image("L")
    tf = eval_transform(SIZE, [0.25], [0.5])
    outs = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        outs.append(tf(image))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # same size in and out: no resampling, only (x / 255 - mean) / std
    expected = (torch.from_numpy(np.asarray(image)).float() / 255 - 0.25) / 0.5
    assert torch.allclose(outs[0][0], expected, atol=1e-6)


def test_train_transform_is_deterministic_by_seed():
    tf = train_transform(aug(crop_scale=[0.8, 1.0], hflip=0.5, rotation=10.0, color_jitter=0.3, random_erasing=0.5),
                         SIZE, 3, *norm(3))
    image = gradient_image("RGB")

    def run(seed):
        torch.manual_seed(seed)
        return tf(image)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_flip_probability_and_result():
    image = gradient_image("L")
    plain = eval_transform(SIZE, *norm(1))(image)
    mirrored = eval_transform(SIZE, *norm(1))(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert torch.equal(train_transform(aug(hflip=1.0), SIZE, 1, *norm(1))(image), mirrored)
    assert torch.equal(train_transform(aug(hflip=0.0), SIZE, 1, *norm(1))(image), plain)
    tf = train_transform(aug(hflip=0.5), SIZE, 1, *norm(1))
    flips = 0
    for seed in range(100):
        torch.manual_seed(seed)
        out = tf(image)
        assert torch.equal(out, plain) or torch.equal(out, mirrored)
        flips += torch.equal(out, mirrored)
    assert 30 < flips < 70  # p = 0.5


def _bar_angle(t: torch.Tensor) -> float:
    """Orientation in degrees of the bright pixels (second moments), 0 for a horizontal bar."""
    w = (t[0] > 0).double()
    ys, xs = torch.meshgrid(torch.arange(t.shape[1]).double(), torch.arange(t.shape[2]).double(), indexing="ij")
    m = w.sum()
    cx, cy = (w * xs).sum() / m, (w * ys).sum() / m
    mu20, mu02 = (w * (xs - cx) ** 2).sum() / m, (w * (ys - cy) ** 2).sum() / m
    mu11 = (w * (xs - cx) * (ys - cy)).sum() / m
    return math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02))


def test_rotation_stays_within_its_bound():
    bar = np.zeros((64, 64), np.uint8)
    bar[31:33, 8:56] = 255  # a thin horizontal bar through the centre
    image = Image.fromarray(bar)
    assert abs(_bar_angle(eval_transform(64, *norm(1))(image))) < 0.5
    tf = train_transform(aug(rotation=10.0), 64, 1, *norm(1))
    angles = []
    for seed in range(40):
        torch.manual_seed(seed)
        angles.append(_bar_angle(tf(image)))
    assert max(abs(a) for a in angles) <= 10.5  # +-10 degrees, plus a little for the pixel grid
    assert max(angles) > 5 and min(angles) < -5  # both directions, most of the range


def test_random_erasing_area_and_probability():
    image = Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8))  # normalises to 1.0; erased pixels are 0
    always = train_transform(aug(random_erasing=1.0), SIZE, 1, *norm(1))
    for seed in range(30):
        torch.manual_seed(seed)
        erased = always(image)[0] == 0
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        area = int(erased.sum())
        assert area == (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)  # one rectangle
        assert 0.02 * SIZE * SIZE * 0.8 <= area <= 0.15 * SIZE * SIZE * 1.2  # scale (0.02, 0.15), rounding
    never = train_transform(aug(random_erasing=0.0), SIZE, 1, *norm(1))
    assert bool((never(image) == 1).all())
    sometimes = train_transform(aug(random_erasing=0.25), SIZE, 1, *norm(1))
    hits = 0
    for seed in range(100):
        torch.manual_seed(seed)
        hits += bool((sometimes(image) == 0).any())
    assert 10 < hits < 40  # p = 0.25


def test_multi_view_applies_each_transform():
    views = MultiView([eval_transform(16, *norm(1)), eval_transform(SIZE, *norm(3))])(gradient_image("L"))
    assert [v.shape for v in views] == [(1, 16, 16), (3, SIZE, SIZE)]
