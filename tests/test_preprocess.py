"""Intensity normalisation: hand-computed values, refusals, modality guessing, and the reference's
``preprocess`` on the same images."""

from __future__ import annotations

import numpy as np
import pytest

from itk_gradicon.errors import InputError
from itk_gradicon.pipeline.preprocess import (IntensityNormalization, apply_input_mask, guess_modality, quantile,
                                     resolve_modality)


def test_quantile_is_the_references_kth_value():
    values = np.arange(1, 101, dtype=np.float32)[::-1].copy()  # 100 .. 1
    assert quantile(values, 0.99) == 99.0   # k = int(0.99 * 100) = 99th smallest
    assert quantile(values, 0.5) == 50.0
    assert quantile(values, 0.0) == 1.0     # k clamped to 1: the minimum
    assert quantile(values, 1.0) == 100.0
    assert quantile(values, 0.001) == 1.0


@pytest.mark.parametrize("kind", ["smooth", "few values", "constant", "sorted", "with nan"])
def test_quantile_of_a_large_image_is_the_exact_kth_value(kind):
    """Above ``QUANTILE_SAMPLE_ABOVE`` voxels the value is looked for near a sample's estimate: the same
    value as partitioning everything, for every kind of intensity distribution."""
    rng = np.random.default_rng(7)
    n = 1_300_000
    values = {"smooth": rng.gamma(2.0, 50.0, n), "few values": rng.integers(0, 4, n).astype(float),
              "constant": np.full(n, 3.0), "sorted": np.arange(n, dtype=float),
              "with nan": np.where(rng.random(n) < 0.01, np.nan, rng.normal(size=n))}[kind].astype(np.float32)

    def partitioned(q):
        k = max(1, min(int(q * n), n))
        return float(np.partition(values, k - 1)[k - 1])

    for q in (0.0, 0.003, 0.01, 0.5, 0.98, 0.99, 0.999, 1.0):
        got, expected = quantile(values, q), partitioned(q)
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (q, got, expected)


def test_normalisation_computes_in_double_precision():
    """The [lo, hi] scaling runs in float64 and rounds once to float32 (the reference's arithmetic)."""
    values = np.array([0.0, 1.0, 2.0, 3.0, 1e7 + 1.0], dtype=np.float32)
    out = IntensityNormalization("mri", quantile_range=(0.0, 1.0))(values)
    expected = ((np.clip(values.astype(np.float64), 0.0, 1e7 + 1.0) - 0.0) / (1e7 + 1.0)).astype(np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, expected)


def test_ct_window_by_hand():
    norm = IntensityNormalization("ct")
    out = norm(np.array([-3000, -1000, 0, 500, 1000, 3000], dtype=np.float32))
    np.testing.assert_allclose(out, [0, 0, 0.5, 0.75, 1, 1])
    assert out.dtype == np.float32
    narrow = IntensityNormalization("ct", ct_window=(-200.0, 300.0))
    np.testing.assert_allclose(narrow(np.array([-250.0, 50.0, 400.0])), [0, 0.5, 1])


def test_mri_default_is_minimum_and_99th_percentile():
    values = np.concatenate([np.linspace(10, 110, 100), [10_000.0]]).astype(np.float32)  # one outlier
    norm = IntensityNormalization("mri")
    lo, hi = norm.intensity_range(values)
    assert lo == 10.0 and hi == quantile(values, 0.99) and hi < 200
    out = norm(values)
    assert out.min() == 0.0 and out.max() == 1.0 and out[-1] == 1.0  # the outlier is clipped
    custom = IntensityNormalization("mri", quantile_range=(0.1, 0.9))
    assert custom.intensity_range(values) == (quantile(values, 0.1), quantile(values, 0.9))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(modality="pet"), "unknown modality 'pet'"),
    (dict(modality="ct", ct_window=(100.0, -100.0)), "min < max"),
    (dict(modality="mri", quantile_range=(0.5, 0.2)), "0 <= lower < upper <= 1"),
    (dict(modality="mri", quantile_range=(-0.1, 0.9)), "0 <= lower < upper <= 1"),
])
def test_bad_settings_are_refused(kwargs, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        IntensityNormalization(**kwargs)


def test_empty_intensity_range_is_refused_with_advice():
    mostly_zero = np.zeros(1000, np.float32)
    mostly_zero[:5] = 1.0  # 99.5% of the voxels are 0: min = 99th percentile = 0
    with pytest.raises(InputError, match="--quantile-range 0 1") as err:
        IntensityNormalization("mri")(mostly_zero, what="moving image")
    assert "moving image" in str(err.value)
    np.testing.assert_allclose(IntensityNormalization("mri", quantile_range=(0.0, 1.0))(mostly_zero)[:6],
                               [1, 1, 1, 1, 1, 0])


def test_modality_guess(rng):
    ct = np.concatenate([np.full(500, -1000.0), rng.normal(40, 30, 1500)])
    assert guess_modality(ct)[0] == "ct"
    mri = rng.gamma(2.0, 100.0, 2000)
    modality, reason = guess_modality(mri)
    assert modality == "mri" and "no air-like values" in reason
    odd = np.concatenate([mri, [-800.0]])  # one negative outlier is not CT air
    modality, reason = guess_modality(odd)
    assert modality == "mri" and "pass the modality explicitly" in reason
    assert resolve_modality("ct", mri) == ("ct", None)
    with pytest.raises(InputError, match="allowed: auto, ct, mri"):
        resolve_modality("xray", mri)


def test_input_mask():
    image = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)
    mask = np.array([[0, 1, 2, 0], [255, 0, 0, 1]], np.uint8)
    out = apply_input_mask(image, mask)
    np.testing.assert_allclose(out, image * (mask > 0))
    assert out.dtype == np.float32


def test_registration_uses_a_model_files_preprocessing(tmp_path, rng, monkeypatch):
    """A model file's preprocessing defaults (here a quantile range) are used unless overridden."""
    import torch

    from conftest import blob_volume, make_image, tiny_architecture
    import itk_gradicon.registration as registration
    from itk_gradicon.models import load_model, save_model_file
    from itk_gradicon.network import build_network

    arch = tiny_architecture(3)
    torch.manual_seed(0)
    path = save_model_file(tmp_path / "m.pt", build_network(arch), arch, name="m",
                           preprocessing={"quantile_range": [0.05, 0.95]})
    model = load_model(str(path))
    seen = []
    real = registration.IntensityNormalization

    def spy(*args, **kwargs):
        norm = real(*args, **kwargs)
        seen.append(norm)
        return norm

    monkeypatch.setattr(registration, "IntensityNormalization", spy)
    image = make_image(blob_volume((20, 20, 20), rng) * 100)
    registration.register(image, image, model=model, fixed_modality="mri", moving_modality="mri",
                          compute_inverse=False)
    assert [n.quantile_range for n in seen] == [(0.05, 0.95)] * 2
    seen.clear()
    registration.register(image, image, model=model, fixed_modality="mri", moving_modality="mri",
                          quantile_range=(0.0, 0.99), compute_inverse=False)
    assert [n.quantile_range for n in seen] == [(0.0, 0.99)] * 2


@pytest.mark.reference
@pytest.mark.parametrize("modality,kwargs", [("ct", {}), ("ct", {"ct_window": (-500, 700)}), ("mri", {}),
                                             ("mri", {"quantile_range": (0.05, 0.95)})])
def test_same_as_the_reference_preprocess(rng, modality, kwargs):
    """unigradicon.preprocess and ours give the same [0, 1] image."""
    unigradicon = pytest.importorskip("unigradicon")
    import itk

    from conftest import make_image

    array = (rng.normal(0, 600, (12, 14, 16)) if modality == "ct" else rng.gamma(2.0, 80.0, (12, 14, 16)))
    image = make_image(array.astype(np.float32))
    theirs = itk.array_from_image(unigradicon.preprocess(image, modality=modality, **kwargs))
    settings = {"ct_window": tuple(float(v) for v in kwargs["ct_window"])} if "ct_window" in kwargs else {}
    if "quantile_range" in kwargs:
        settings["quantile_range"] = kwargs["quantile_range"]
    ours = IntensityNormalization(modality, **settings)(array.astype(np.float32))
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("air_fraction", [0.0, 0.005, 0.0099, 0.01, 0.0101, 0.02, 0.5])
def test_modality_guess_is_the_one_percent_quantile_rule(rng, air_fraction):
    """CT exactly when the 1% quantile (as :func:`quantile` defines it) is at or below -500 HU."""
    n = 10_000
    image = rng.gamma(2.0, 100.0, n)
    image[: int(round(air_fraction * n))] = -1000.0
    image[-1] = -500.0  # one voxel exactly at the threshold
    rng.shuffle(image)
    expected = "ct" if quantile(image, 0.01) <= -500.0 else "mri"
    assert guess_modality(image)[0] == expected
