"""Every fast path computes what the plain path computes (behaviour only; speed is never asserted).

The plain path is the published architecture operation by operation
(:func:`itk_gradicon.network.performance.fast_paths` with ``enabled=False``); the fast paths fold
BatchNorm, compose the finest up level with the final convolution, use channels-last tensors and
sample fields on several threads. In float64 they agree to ~1e-15; in float32 to float rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import randomize
from itk_gradicon.spatial import frames as geometry
from itk_gradicon.network import Architecture, UNetStep, build_network
from itk_gradicon.network import sampling
from itk_gradicon.network.performance import FastPaths, current, fast_paths

SWITCHES = [dict(zip(("fold_batch_norm", "fuse_last_level", "channels_last"), values))
            for values in itertools.product((False, True), repeat=3)]


def _small_unet(d: int, *, seed: int = 1) -> UNetStep:
    torch.manual_seed(seed)
    net = UNetStep(d, 1, (4, 8, 8), (4, 8, 8))
    return randomize(net, seed=seed, last_std=0.1).eval()


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(k for k, v in s.items() if v) or "none")
@pytest.mark.parametrize("d,shape", [(3, (23, 26, 21)), (3, (24, 24, 24)), (2, (37, 40))],
                         ids=["3d-odd", "3d-even", "2d"])
def test_fast_unet_equals_plain_float64(d, shape, switches):
    net = _small_unet(d).double()
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 1, *shape, generator=g, dtype=torch.float64)
    b = torch.rand(2, 1, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        with fast_paths(enabled=False):
            plain = net(a, b)
        with fast_paths(**switches):
            fast = net(a, b)
    assert fast.shape == plain.shape == (2, d, *shape)
    assert plain.abs().max() > 1e-2  # the random weights move voxels
    assert (fast - plain).abs().max().item() < 1e-12


@pytest.mark.parametrize("d,shape", [(3, (23, 26, 21)), (2, (33, 40))], ids=["3d", "2d"])
def test_fast_unet_gradients_equal_plain(d, shape):
    """Instance optimisation differentiates the fast path: same gradients for every parameter."""
    net = _small_unet(d, seed=3).double()
    g = torch.Generator().manual_seed(4)
    a = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    upstream = torch.randn(1, d, *shape, generator=g, dtype=torch.float64)
    params = list(net.parameters())

    def gradients(**switches):
        with fast_paths(**switches):
            return torch.autograd.grad(net(a, b), params + [a], upstream)

    plain = gradients(enabled=False)
    fast = gradients(channels_last=True)
    assert len(plain) == len(fast) == len(params) + 1 == 21
    for p, f in zip(plain, fast):
        assert (p - f).abs().max().item() <= 1e-12 * max(1.0, p.abs().max().item())


def test_fast_network_equals_plain_float32():
    """The whole registration network (three UNets, warps, composition) in float32."""
    arch = Architecture(input_shape=(40, 44, 36), levels=2, refinement_steps=1,
                        down_channels=(4, 8, 16), up_channels=(4, 8, 8))
    torch.manual_seed(5)
    net = randomize(build_network(arch), seed=5, last_std=0.05).eval()
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(1, 1, *arch.input_shape, generator=g), torch.rand(1, 1, *arch.input_shape, generator=g)
    with torch.inference_mode():
        with fast_paths(enabled=False):
            plain = net(a, b).on_grid(arch.input_shape)
        fast = net(a, b).on_grid(arch.input_shape)
    moved = (plain - geometry.cube_identity(arch.input_shape)).abs().max().item()
    assert moved > 0.01
    assert (fast - plain).abs().max().item() < 1e-6


@pytest.mark.parametrize("coarse,fine", [((11, 12, 13), (21, 23, 25)), ((9, 10), (17, 30))], ids=["3d", "2d"])
def test_map_on_a_finer_grid_equals_sampling_at_the_identity(coarse, fine):
    """``resample_on_grid``: a coarse field at a finer grid's nodes by ``interpolate``, then composed."""
    from itk_gradicon.network.operators import CubeMap

    g = torch.Generator().manual_seed(12)
    d = len(coarse)
    inner = 0.05 * torch.randn(2, d, *coarse, generator=g, dtype=torch.float64)
    outer = 0.05 * torch.randn(2, d, *[n + 3 for n in coarse], generator=g, dtype=torch.float64)
    cube_map = CubeMap((outer, inner))
    with fast_paths(resample_on_grid=False):
        plain = cube_map.on_grid(fine)
    fast = cube_map.on_grid(fine)
    assert fast.shape == (2, d, *fine)
    assert (fast - plain).abs().max().item() < 1e-12


def test_training_mode_uses_the_plain_operations():
    """With BatchNorm on batch statistics nothing is folded: the fast paths change only the layout of
    the convolutions' inputs and how the upsampling is computed, so only float rounding differs."""
    net = _small_unet(3, seed=7).train().double()
    g = torch.Generator().manual_seed(8)
    a = torch.rand(2, 1, 20, 20, 20, generator=g, dtype=torch.float64)
    b = torch.rand(2, 1, 20, 20, 20, generator=g, dtype=torch.float64)
    params = list(net.parameters())

    def output_and_gradients(**switches):
        with fast_paths(**switches):
            out = net(a, b)
            return [out, *torch.autograd.grad(out.square().sum(), params)]

    plain = output_and_gradients(enabled=False)
    for switches in (dict(), dict(channels_last=False), dict(upsample_by_products=False)):
        fast = output_and_gradients(**switches)
        assert plain[0].abs().max() > 1e-2
        for p, f in zip(plain, fast):
            assert (p - f).abs().max().item() <= 1e-12 * max(1.0, p.abs().max().item())
    with fast_paths(channels_last=False, upsample_by_products=False), torch.no_grad():
        assert torch.equal(net(a, b), plain[0])  # both off: the plain operations, bit for bit


@pytest.mark.parametrize("shape", [(1, 3, 5, 6, 7), (2, 2, 9, 4), (1, 1, 1, 3, 2)], ids=["3d", "2d", "flat"])
def test_upsample_by_products_is_interpolate(shape):
    """The banded products compute ``interpolate(scale_factor=2, align_corners=False)``, gradients too."""
    from itk_gradicon.network.unet import upsample_by_products

    g = torch.Generator().manual_seed(9)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    mode = {4: "bilinear", 5: "trilinear"}[x.dim()]
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
    got = upsample_by_products(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-14
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (grad_expected,) = torch.autograd.grad(expected, x, upstream)
    (grad_got,) = torch.autograd.grad(got, x, upstream)
    assert (grad_got - grad_expected).abs().max().item() < 1e-13


def test_fast_path_under_autocast_is_close_to_plain():
    """Reduced precision (what a GPU uses with autocast) runs through the fused path too."""
    net = _small_unet(3, seed=8)
    a, b = torch.rand(1, 1, 24, 26, 22), torch.rand(1, 1, 24, 26, 22)
    with torch.no_grad():
        with fast_paths(enabled=False):
            plain = net(a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = net(a, b)
    assert fast.shape == plain.shape
    assert (fast.float() - plain).abs().max().item() < 0.05 * plain.abs().max().item()


def test_switches_are_scoped():
    assert current() == FastPaths()
    with fast_paths(fuse_last_level=False) as inside:
        assert current() is inside and not inside.fuse_last_level
    assert current() == FastPaths()
    assert FastPaths().use_channels_last(torch.device("cpu"))
    assert not FastPaths().use_channels_last(torch.device("cuda"))
    with pytest.raises(TypeError):
        with fast_paths(no_such_switch=True):
            pass


@pytest.mark.parametrize("field_shape,points_shape", [((1, 3, 20, 21, 22), (1, 3, 30, 31, 29)),
                                                      ((2, 1, 16, 16, 16), (1, 3, 17, 18, 19)),
                                                      ((1, 2, 40, 30), (1, 2, 50, 45))],
                         ids=["field", "batch-broadcast", "2d"])
def test_threaded_sampling_equals_geometry(two_threads, field_shape, points_shape):
    g = torch.Generator().manual_seed(9)
    field = torch.randn(*field_shape, generator=g, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(*points_shape, generator=g, dtype=torch.float64) * 1.3 - 0.15).requires_grad_(True)
    assert sampling._slabs(points) == 2
    plain = sampling.grid_sample_cube_field(field, points)
    threaded = sampling.sample_cube_field(field, points)
    assert torch.equal(plain, threaded)  # each point is computed by the same kernel
    upstream = torch.randn(plain.shape, generator=g, dtype=torch.float64)
    for p, t in zip(torch.autograd.grad(plain, (field, points), upstream),
                    torch.autograd.grad(threaded, (field, points), upstream)):
        assert (p - t).abs().max().item() < 1e-12
    with torch.inference_mode():
        assert torch.equal(sampling.sample_cube_field(field.detach(), points.detach()), plain.detach())


@pytest.mark.parametrize("shape,layout", [((2, 12, 7, 9, 8), torch.channels_last_3d), ((1, 12, 7, 9, 8), None),
                                          ((2, 12, 10, 11), torch.channels_last)], ids=["3d-cl", "3d", "2d-cl"])
def test_padded_stack_in_one_buffer_equals_padded_copies(shape, layout):
    """Without autograd the fused level's input is written into one buffer: bitwise the same tensor."""
    from itk_gradicon.network.unet import _padded_stack

    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    coarse = x[:, :5]
    with torch.no_grad():
        buffered = _padded_stack(x, coarse)
    halo = [1] * (2 * (x.dim() - 2))
    copies = torch.cat([torch.nn.functional.pad(torch.nn.functional.leaky_relu(x), halo),
                        torch.nn.functional.pad(coarse, halo, mode="replicate")], dim=1)
    assert torch.equal(buffered, copies)
    assert layout is None or buffered.is_contiguous(memory_format=layout)
    x.requires_grad_(True)  # with autograd: the differentiable copies
    assert _padded_stack(x, x[:, :5]).requires_grad
