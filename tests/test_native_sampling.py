"""The compiled sampling kernel (``itk_gradicon._linear``) returns ``grid_sample``'s values bit for bit.

Every case compares :func:`itk_gradicon.network.sampling.sample_cube_field` (which uses the kernel
for float32 3-D tensors without autograd) with :func:`itk_gradicon.spatial.frames.sample_cube_field`
(``grid_sample`` itself) by ``torch.equal``: points inside, outside and exactly on the border,
non-contiguous and channels-last fields, batches, one-voxel axes, several threads.
"""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itk_gradicon.spatial import frames as geometry
from itk_gradicon.network import sampling
from itk_gradicon.network.performance import fast_paths


def _compiler_available() -> bool:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(compiler) is not None


def test_kernel_is_built_where_a_compiler_is():
    """A build on a machine with a C compiler includes the kernel (CI would otherwise fall back silently)."""
    if not _compiler_available():
        pytest.skip("no C compiler here: itk_gradicon samples with grid_sample")
    assert sampling.NATIVE is not None, "itk_gradicon._linear was not built; reinstall with a working C compiler"


needs_kernel = pytest.mark.skipif(sampling.NATIVE is None, reason="itk_gradicon._linear not built")


def _points(shape, generator, *, spread=1.4):
    """CUBE points: a smooth map around the identity plus random points, many outside ``[0, 1]``."""
    ident = geometry.cube_identity(shape)
    noise = torch.rand(1, 3, *shape, generator=generator) * spread - (spread - 1) / 2
    points = torch.where(torch.rand(1, 1, *shape, generator=generator) < 0.5, ident + 0.05 * noise, noise)
    flat = points.view(3, -1)
    flat[:, :6] = torch.tensor([[0.0, 1.0, 0.0, 1.0, -0.3, 1.2]] * 3)  # first and last node, outside
    flat[0, 6], flat[1, 7], flat[2, 8] = 1.0, 1.0, 1.0  # on the far face along one axis only
    flat[:, 9:12] = torch.tensor([[float("nan"), float("inf"), -float("inf")]] * 3).T  # grid_sample clamps these
    return points.float()


@needs_kernel
@pytest.mark.parametrize("field_shape,out_shape", [
    ((1, 3, 9, 10, 11), (12, 7, 9)),
    ((1, 1, 20, 17, 13), (20, 17, 13)),
    ((2, 3, 6, 5, 4), (8, 8, 8)),
    ((1, 3, 1, 7, 8), (5, 6, 7)),        # one-voxel axis
    ((1, 2, 2, 2, 2), (4, 4, 4)),
], ids=["3ch", "1ch-same-grid", "batch", "one-voxel-axis", "two-nodes"])
def test_kernel_equals_grid_sample(two_threads, field_shape, out_shape):
    g = torch.Generator().manual_seed(4)
    field = torch.randn(*field_shape, generator=g)
    points = _points(out_shape, g)
    with torch.no_grad():
        expected = sampling.grid_sample_cube_field(field, points)
        got = sampling.sample_cube_field(field, points)
    assert torch.equal(got, expected)


@needs_kernel
@pytest.mark.parametrize("layout", ["channels-last", "sliced", "expanded-batch", "batched-points"])
def test_kernel_reads_any_strides(two_threads, layout):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 5, 12, 11, 10, generator=g)
    points = _points((9, 8, 7), g)
    if layout == "channels-last":
        field = base.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        field = base[:, 1:4, 1:, :, ::2]
    elif layout == "expanded-batch":
        field = base[:1].expand(3, -1, -1, -1, -1)
    else:
        field = base
        points = torch.cat([points, _points((9, 8, 7), g)])
    assert layout == "batched-points" or not field.is_contiguous()
    with torch.inference_mode():
        assert torch.equal(sampling.sample_cube_field(field, points), sampling.grid_sample_cube_field(field, points))


@needs_kernel
def test_kernel_is_used_and_can_be_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "NATIVE", _Recorder(sampling.NATIVE, calls))
    field, points = torch.randn(1, 3, 5, 5, 5), torch.rand(1, 3, 4, 4, 4)
    with torch.no_grad():
        sampling.sample_cube_field(field, points)
        assert len(calls) == 1
        with fast_paths(native_sampling=False):
            sampling.sample_cube_field(field, points)
        sampling.sample_cube_field(field.double(), points.double())  # float64: grid_sample
    assert len(calls) == 1


class _Recorder:
    def __init__(self, native, calls):
        self.native, self.calls = native, calls

    def sample_3d(self, *args):
        self.calls.append(args)
        return self.native.sample_3d(*args)


@needs_kernel
@pytest.mark.parametrize("field_shape,out_shape,points_batch", [
    ((1, 3, 10, 9, 8), (11, 10, 9), 1),
    ((2, 1, 7, 8, 9), (9, 8, 7), 1),      # points shared by a batch: their gradients add up
    ((2, 3, 6, 7, 5), (8, 6, 7), 2),
    ((1, 2, 1, 6, 7), (5, 6, 7), 1),      # one-voxel axis
], ids=["3ch", "shared-points", "batch", "one-voxel-axis"])
def test_kernel_gradients_equal_grid_sample(two_threads, field_shape, out_shape, points_batch):
    """With autograd: forward values bitwise grid_sample's; the points' gradients too (each is computed by
    the same arithmetic); the field's up to the order in which the threads' contributions are summed."""
    g = torch.Generator().manual_seed(6)
    field = torch.randn(*field_shape, generator=g).requires_grad_(True)
    points = torch.cat([_points(out_shape, g) for _ in range(points_batch)]).requires_grad_(True)
    plain = sampling.grid_sample_cube_field(field, points)
    threaded = sampling.sample_cube_field(field, points)
    assert sampling._slabs(points) == 2 and threaded.grad_fn.name().endswith("_ParallelCubeSampleBackward")
    assert torch.equal(plain, threaded)
    upstream = torch.randn(plain.shape, generator=g)
    grad_field_plain, grad_points_plain = torch.autograd.grad(plain, (field, points), upstream)
    grad_field, grad_points = torch.autograd.grad(threaded, (field, points), upstream)
    if points_batch == field_shape[0]:
        assert torch.equal(grad_points, grad_points_plain)
    else:  # summed over the batch in another order
        torch.testing.assert_close(grad_points, grad_points_plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_field, grad_field_plain, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_gradient_of_one_input_only(two_threads):
    g = torch.Generator().manual_seed(8)
    field = torch.randn(1, 3, 9, 9, 9, generator=g)
    points = _points((10, 10, 10), g)
    for wants in ("field", "points"):
        f = field.clone().requires_grad_(wants == "field")
        p = points.clone().requires_grad_(wants == "points")
        (grad,) = torch.autograd.grad(sampling.sample_cube_field(f, p).square().sum(), f if wants == "field" else p)
        (expected,) = torch.autograd.grad(sampling.grid_sample_cube_field(f, p).square().sum(),
                                          f if wants == "field" else p)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_leaves_the_network_map_unchanged():
    """A composed map evaluated with and without the kernel: the same tensor."""
    from itk_gradicon.network.operators import CubeMap

    g = torch.Generator().manual_seed(7)
    fields = [F.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g), size=s, mode="trilinear",
                            align_corners=True) * 0.05 for s in ((8, 8, 8), (16, 16, 16), (31, 30, 29))]
    cube_map = CubeMap(fields)
    with torch.inference_mode():
        fast = cube_map.on_grid((31, 30, 29))
        with fast_paths(native_sampling=False):
            plain = cube_map.on_grid((31, 30, 29))
    assert torch.equal(fast, plain)


@needs_kernel
@pytest.mark.parametrize("field_shape", [(1, 1, 21, 17, 14), (2, 1, 9, 12, 10), (1, 3, 9, 12, 10)],
                         ids=["1ch", "batch", "3ch"])
def test_kernel_on_points_strictly_inside_equals_grid_sample(two_threads, field_shape):
    """Every point strictly inside the field (where the AVX2 path takes eight points at a time): values and
    the points' gradients bitwise grid_sample's; a count of points that is not a multiple of eight."""
    g = torch.Generator().manual_seed(11)
    field = torch.randn(*field_shape, generator=g).requires_grad_(False)
    out_shape = (13, 11, 9)
    ident = geometry.cube_identity(out_shape)
    points = (0.04 + 0.92 * ident + 0.02 * torch.randn(field_shape[0], 3, *out_shape, generator=g)).clamp(0.01, 0.99)
    points.requires_grad_(True)
    plain = sampling.grid_sample_cube_field(field, points)
    threaded = sampling.sample_cube_field(field, points)
    assert torch.equal(plain, threaded)
    upstream = torch.randn(plain.shape, generator=g)
    (grad_plain,) = torch.autograd.grad(plain, points, upstream)
    (grad,) = torch.autograd.grad(threaded, points, upstream)
    assert torch.equal(grad, grad_plain)


@needs_kernel
@pytest.mark.parametrize("affines", ["none", "pre", "post"])
def test_fields_on_an_image_grid_are_the_torch_paths(two_threads, affines):
    """``displacement_on_grid`` on the compiled kernel (one pass per voxel) gives the torch path's field: an
    oblique, flipped grid, a pre-alignment before or after the map, displacements that leave the cube, a field
    that is a view of a larger tensor."""
    from itk_gradicon.spatial import frames

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q[:, 0] *= -1.0
    fixed = geometry.ImageGrid(size=(23, 19, 17), spacing=(0.9, 1.3, 2.1), origin=tuple(rng.uniform(-60, 60, 3)),
                               direction=tuple(map(tuple, q)))
    moving = geometry.ImageGrid(size=(20, 25, 14), spacing=(1.1, 1.0, 1.7), origin=tuple(rng.uniform(-60, 60, 3)),
                                direction=((1.0, 0, 0), (0, -1.0, 0), (0, 0, 1.0)))
    source = geometry.NetworkFrame.reference_layout(fixed, (12, 10, 9))
    target = geometry.NetworkFrame.reference_layout(moving, (12, 10, 9))
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(1, 4, 12, 10, 9, generator=g) * 0.3  # up to about a third of the cube: far outside at times
    field = wide[:, 1:]  # not contiguous
    affine = np.eye(4)
    affine[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] * 1.05
    affine[:3, 3] = rng.uniform(-5, 5, 3)
    kwargs = {"none": {}, "pre": {"preaffine": affine}, "post": {"postaffine": affine}}[affines]
    assert frames._native_grid_field(field, 3)
    got = frames.displacement_on_grid(field, fixed, source, target, **kwargs)
    with fast_paths(native_sampling=False):
        assert not frames._native_grid_field(field, 3)
        expected = frames.displacement_on_grid(field, fixed, source, target, **kwargs)
    assert got.shape == expected.shape == fixed.array_shape + (3,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)  # mm; equal but for float64 summation order


def _voxel_displacement(shape, generator, spread=2.0):
    """Displacements in voxels that reach up to two voxels outside the grid, never onto a node exactly (where a
    linear interpolation's gradient is one-sided)."""
    v = torch.randn(1, 3, *shape, generator=generator) * spread
    return v + 0.0123 * torch.sign(v - v.round()).clamp(min=-1, max=1)


@needs_kernel
@pytest.mark.parametrize("shape", [(9, 10, 11), (24, 20, 17), (2, 5, 3)])
def test_warp_by_voxels_is_the_cube_expression(two_threads, shape):
    """Field IO's warp of an image by a displacement in voxels (``instance.warp_voxels``) on the compiled kernel:
    the values and gradient of ``losses.warp(image, identity + v / scale, zero_outside=True)`` to float rounding."""
    from itk_gradicon.pipeline import instance

    g = torch.Generator().manual_seed(8)
    image = torch.rand(1, 1, *shape, generator=g)
    v = _voxel_displacement(shape, g)
    upstream = torch.randn(1, 1, *shape, generator=g)
    ours, theirs = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    assert instance._voxel_warp_applies(image, ours)
    got = instance.warp_voxels(image, ours)
    (got * upstream).sum().backward()
    with fast_paths(native_sampling=False):
        assert not instance._voxel_warp_applies(image, theirs)
        expected = instance.warp_voxels(image, theirs)
        (expected * upstream).sum().backward()
    assert (got - expected).abs().max().item() < 1e-5
    assert (ours.grad - theirs.grad).abs().max().item() < 1e-4 * theirs.grad.abs().max().item()


@needs_kernel
def test_warp_by_voxels_is_zero_beyond_one_voxel_outside_and_on_nan(two_threads):
    from itk_gradicon.pipeline import instance

    image = torch.rand(1, 1, 6, 7, 8) + 1.0
    v = torch.zeros(1, 3, 6, 7, 8)
    v[0, 2, 0, 0, 0] = -1.5       # x = -1.5: beyond the zero ring
    v[0, 0, 1, 1, 1] = 10.0       # z = 11 of 6
    v[0, 1, 2, 2, 2] = float("nan")
    v[0, 2, 3, 3, 0] = -0.5       # half way to the ring: half the edge value
    v = v.requires_grad_(True)
    out = instance.warp_voxels(image, v)
    out.sum().backward()
    assert out[0, 0, 0, 0, 0] == 0 and out[0, 0, 1, 1, 1] == 0 and out[0, 0, 2, 2, 2] == 0
    assert v.grad[0, :, 0, 0, 0].abs().sum() == 0 and v.grad[0, :, 1, 1, 1].abs().sum() == 0
    assert out[0, 0, 3, 3, 0].item() == pytest.approx(0.5 * image[0, 0, 3, 3, 0].item(), rel=1e-6)
    assert v.grad[0, 2, 3, 3, 0].item() == pytest.approx(image[0, 0, 3, 3, 0].item(), rel=1e-6)  # d/dx of the ramp
    assert torch.equal(out[0, 0, 4:], image[0, 0, 4:])  # no displacement: the image itself


@needs_kernel
def test_warp_by_voxels_takes_the_kernel_only_where_it_applies(monkeypatch):
    from itk_gradicon.pipeline import instance

    image, v = torch.rand(1, 1, 5, 6, 7), torch.zeros(1, 3, 5, 6, 7)
    assert instance._voxel_warp_applies(image, v)
    assert not instance._voxel_warp_applies(image.double(), v.double())
    assert not instance._voxel_warp_applies(image.requires_grad_(True), v)
    assert not instance._voxel_warp_applies(torch.rand(1, 1, 5, 6), torch.zeros(1, 2, 5, 6))
    assert not instance._voxel_warp_applies(torch.rand(1, 1, 5, 6, 7), torch.zeros(1, 3, 5, 6, 8))
    two_d = instance.warp_voxels(torch.rand(1, 1, 5, 6), torch.zeros(1, 2, 5, 6))  # the expression in 2-D
    assert two_d.shape == (1, 1, 5, 6)


@needs_kernel
def test_warp_by_voxels_is_the_same_on_any_number_of_threads(monkeypatch):
    from itk_gradicon.pipeline import instance

    g = torch.Generator().manual_seed(9)
    image = torch.rand(1, 1, 40, 41, 42, generator=g)
    v = _voxel_displacement((40, 41, 42), g).requires_grad_(True)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        v.grad = None
        out = instance.warp_voxels(image, v)
        (out * out).sum().backward()
        results.append((out.detach().clone(), v.grad.clone()))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


@needs_kernel
@pytest.mark.parametrize("shape", [(9, 10, 11), (2, 5, 3), (24, 20, 17)])
def test_round_trip_in_voxels_is_the_cube_one(two_threads, shape):
    """Field IO's inverse-consistency round trip in voxels (``instance.round_trip_voxels``) on the compiled kernel:
    the value and both gradients of the CUBE definition (``instance._round_trip``) to float rounding, with
    displacements that leave the grid (border values) and never end on a node exactly."""
    from itk_gradicon.pipeline import instance

    g = torch.Generator().manual_seed(11)
    first, second = _voxel_displacement(shape, g), _voxel_displacement(shape, g, spread=1.5)
    ours = [t.clone().requires_grad_(True) for t in (first, second)]
    theirs = [t.clone().requires_grad_(True) for t in (first, second)]
    assert instance._round_trip_applies(*ours)
    value = instance.round_trip_voxels(*ours)
    (value * 1.7).backward()
    with fast_paths(native_sampling=False):
        assert not instance._round_trip_applies(*theirs)
        expected = instance.round_trip_voxels(*theirs)
        (expected * 1.7).backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(ours, theirs):
        assert (a.grad - b.grad).abs().max().item() < 1e-4 * b.grad.abs().max().item()


@needs_kernel
def test_round_trip_in_voxels_of_inverse_shifts_is_zero_and_thread_independent(monkeypatch):
    from itk_gradicon.pipeline import instance

    shift = torch.zeros(1, 3, 30, 31, 32)
    shift[:, 2] = 1.25  # a shift along x and its inverse: every node back where it started
    assert instance.round_trip_voxels(shift, -shift).item() == 0.0
    assert instance.round_trip_voxels(shift, shift).item() == pytest.approx(2.5 ** 2)
    g = torch.Generator().manual_seed(12)
    first = _voxel_displacement((30, 31, 32), g).requires_grad_(True)
    second = _voxel_displacement((30, 31, 32), g).requires_grad_(True)
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        first.grad = second.grad = None
        instance.round_trip_voxels(first, second).backward()
        results.append((first.grad.clone(), second.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])  # each node's own gradient: the same arithmetic
    assert (results[0][1] - results[1][1]).abs().max().item() <= 1e-6 * results[0][1].abs().max().item()
