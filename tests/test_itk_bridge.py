"""The bridge between ITK Python and SimpleITK: exact conversions of images and of every transform class."""

from __future__ import annotations

import numpy as np
import pytest

from itk_gradicon.io.itk_bridge import (is_itk_image, is_simpleitk, to_itk, to_itk_transform, to_simpleitk,
                                        to_simpleitk_transform, transform_parts)

itk = pytest.importorskip("itk")
sitk = pytest.importorskip("SimpleITK")


def _sitk_transforms():
    """One SimpleITK transform of each class ITK files hold, with parameters away from the identity."""
    rng = np.random.default_rng(0)
    euler = sitk.Euler3DTransform((1.0, -2.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, -6.0))
    similarity = sitk.Similarity3DTransform(1.1, (0.0, 0.0, 1.0), 0.2, (1.0, 2.0, 3.0), (0.5, 0.5, 0.5))
    versor = sitk.VersorRigid3DTransform((0.0, 0.6, 0.0), 0.4, (2.0, 0.0, -1.0), (3.0, 3.0, 3.0))
    skew = sitk.ScaleSkewVersor3DTransform()
    skew.SetParameters([0.05, -0.02, 0.03, 1.0, -2.0, 0.5, 1.1, 0.9, 1.05, 0.01, 0.02, -0.01, 0.03, 0.0, 0.02])
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([1.1, 0.1, 0.0, -0.05, 0.95, 0.02, 0.0, 0.03, 1.02])
    affine.SetTranslation((3.0, -1.0, 2.0))
    affine.SetCenter((10.0, 20.0, 30.0))
    scale = sitk.ScaleTransform(3, (1.2, 0.8, 1.1))
    translation = sitk.TranslationTransform(3, (1.5, -2.5, 0.25))
    euler2d = sitk.Euler2DTransform((1.0, 2.0), 0.3, (4.0, -1.0))
    reference = sitk.Image([8, 9, 10], sitk.sitkFloat32)
    reference.SetSpacing((2.0, 1.5, 1.0))
    reference.SetOrigin((-5.0, 3.0, 1.0))
    bspline = sitk.BSplineTransformInitializer(reference, [3, 3, 3], order=3)
    bspline.SetParameters(rng.normal(0, 0.5, len(bspline.GetParameters())).tolist())
    vectors = sitk.GetImageFromArray(rng.normal(0, 1.0, (10, 9, 8, 3)), isVector=True)
    vectors.CopyInformation(reference)
    field = sitk.DisplacementFieldTransform(sitk.Cast(vectors, sitk.sitkVectorFloat64))
    composite = sitk.CompositeTransform([affine, field])
    return {"euler": euler, "similarity": similarity, "versor": versor, "skew": skew, "affine": affine,
            "scale": scale, "translation": translation, "euler2d": euler2d, "bspline": bspline, "field": field,
            "composite": composite}


def _points(dimension):
    return np.random.default_rng(1).uniform(-3.0, 15.0, size=(20, dimension))


@pytest.mark.parametrize("name", list(_sitk_transforms()))
def test_a_transform_crosses_the_bridge_both_ways_exactly(name):
    original = _sitk_transforms()[name]
    if name not in ("field", "composite"):  # as a transform file gives it: the matrix computed from the parameters
        original.SetParameters(original.GetParameters())
    as_itk = to_itk_transform(original)
    assert not is_simpleitk(as_itk)
    back = to_simpleitk_transform(as_itk)
    assert is_simpleitk(back)
    d = original.GetDimension()
    for point in _points(d):
        expected = original.TransformPoint(point.tolist())
        assert tuple(as_itk.TransformPoint(point.tolist())) == expected
        assert back.TransformPoint(point.tolist()) == expected
    parts = transform_parts(as_itk)
    names = [part.GetNameOfClass() for part in parts]
    assert names == [part.GetName() for part in transform_parts(original)]  # each part keeps its class


def test_an_image_crosses_the_bridge_with_its_pixels_and_grid():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 1.5, 2.5))
    image.SetOrigin((3.0, -4.0, 5.0))
    image.SetDirection([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    as_itk = to_itk(image)
    assert is_itk_image(as_itk) and not is_itk_image(image)
    back = to_simpleitk(as_itk)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), array)
    assert back.GetPixelID() == sitk.sitkInt16
    assert (back.GetSpacing(), back.GetOrigin(), back.GetDirection()) == \
        (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert to_simpleitk(image) is image and to_itk(as_itk) is as_itk and to_itk(None) is None
