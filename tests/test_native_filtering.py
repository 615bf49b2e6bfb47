"""The compiled axis filter (``itk_gradicon._linear.filter_axis``) behind separable blurs.

:func:`itk_gradicon.network.separable.filter_along_axis` runs float32 CPU tensors on the compiled kernel
(the sum over the kernel's taps) and everything else as a product with the banded matrix. Both are checked
against a float64 depthwise convolution (PyTorch's ``conv(..., padding="same")``), values and gradients,
for odd and even kernels, every axis, 1-D to 3-D, kernels longer than the axis, non-contiguous inputs; the
compiled result must not depend on the number of threads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itk_gradicon.network import sampling, separable
from itk_gradicon.network.performance import fast_paths
from itk_gradicon.pipeline import losses

needs_kernel = pytest.mark.skipif(sampling.NATIVE is None, reason="itk_gradicon._linear not built")


def _convolved(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """The float64 definition: a zero-padded 'same' correlation of every channel along ``axis``."""
    d = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    taps = [1] * d
    taps[axis] = kernel.numel()
    weight = kernel.double().reshape(1, 1, *taps)
    x = x.double()
    return torch.cat([conv(x[:, c:c + 1], weight, padding="same") for c in range(x.shape[1])], dim=1)


CASES = [
    ((2, 3, 13, 17, 11), 9, 0),    # 3-D, channels and batch, first axis
    ((2, 3, 13, 17, 11), 9, 1),
    ((2, 3, 13, 17, 11), 9, 2),    # the last axis: whole lines per unit
    ((1, 2, 20, 7), 6, 0),         # 2-D, even kernel: conv's 'same' alignment
    ((1, 2, 20, 7), 6, 1),
    ((1, 1, 5, 6, 4), 21, 0),      # kernel longer than the axis
    ((3, 1, 40), 4, 0),            # 1-D
]


@needs_kernel
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("shape, taps, axis", CASES)
def test_compiled_filter_equals_the_convolution(shape, taps, axis):
    """Values and the gradient with respect to the input (the adjoint pass) within float32 rounding."""
    g = torch.Generator().manual_seed(taps + axis)
    x = torch.rand(shape, generator=g, requires_grad=True)
    weights = torch.rand(shape, generator=g)
    kernel = torch.rand(taps, generator=g)
    assert separable.uses_native_filter(x, kernel)
    ours = separable.filter_along_axis(x, kernel, axis)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)

    x64 = x.detach().double().requires_grad_(True)
    expected = _convolved(x64, kernel, axis)
    (grad_expected,) = torch.autograd.grad((expected * weights.double()).sum(), x64)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), expected, rtol=0, atol=1e-5)
    assert torch.allclose(grad_ours.double(), grad_expected, rtol=0, atol=1e-5)


@needs_kernel
def test_compiled_filter_is_the_banded_product_and_independent_of_threads():
    """The compiled pass and the banded matrix product agree to rounding; 1 and 2 threads agree bitwise."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 48, 36, generator=g)
    kernel = losses.gaussian_kernel1d(2.0)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([separable.filter_along_axis(x, kernel, axis) for axis in range(3)])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    with fast_paths(native_filtering=False):
        banded = [separable.filter_along_axis(x, kernel, axis) for axis in range(3)]
    for ours, theirs in zip(results[0], banded):
        assert (ours - theirs).abs().max().item() < 1e-6


@needs_kernel
def test_non_contiguous_input_and_other_types():
    """A transposed view is filtered as its values; float64 and a kernel that needs a gradient take the
    banded product (autograd reaches the kernel there)."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 2, 12, 14, 10, generator=g)
    view = base.transpose(2, 4)
    kernel = losses.gaussian_kernel1d(1.5)
    assert torch.allclose(separable.filter_along_axis(view, kernel, 1),
                          separable.filter_along_axis(view.contiguous(), kernel, 1), rtol=0, atol=0)
    assert not separable.uses_native_filter(base.double(), kernel.double())
    learnable = kernel.clone().requires_grad_(True)
    assert not separable.uses_native_filter(base, learnable)
    out = separable.filter_along_axis(base, learnable, 0)
    (grad_kernel,) = torch.autograd.grad(out.sum(), learnable)
    assert grad_kernel.shape == kernel.shape and torch.isfinite(grad_kernel).all()


@needs_kernel
def test_gaussian_blur_on_the_compiled_filter_matches_the_banded_blur():
    """``gaussian_blur`` (LNCC's window, field IO's pyramid) gives the banded blur's values and gradients
    to float32 rounding, axes longer than the banded limit included."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 30, 600, 9, generator=g, requires_grad=True)
    weights = torch.rand(x.shape, generator=g)
    ours = losses.gaussian_blur(x, 2.0)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    with fast_paths(native_filtering=False):
        theirs = losses.gaussian_blur(x, 2.0)
        (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), x)
    assert (ours - theirs).abs().max().item() < 1e-6
    assert (grad_ours - grad_theirs).abs().max().item() < 1e-6


@needs_kernel
@pytest.mark.parametrize("name", ["lncc", "lncc2"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 20, 22, 18), (1, 1, 30, 26)], ids=["3d", "2d"])
def test_compiled_lncc_against_a_fixed_image_equals_autograd(name, masked, shape):
    """Field IO's LNCC against a fixed image on the compiled kernel (one pass per pointwise part, its own
    backward) gives the loss and gradient of the plain autograd definition, constant regions (zero local
    variance) included."""
    g = torch.Generator().manual_seed(5)
    target = losses.gaussian_blur(torch.rand(shape, generator=g), 1.5)
    warped = losses.gaussian_blur(torch.rand(shape, generator=g), 1.5)
    target[..., :5] = 0.0                        # air in both: no local variance there
    warped[..., :4] = 0.0
    mask = (torch.rand(shape, generator=g) > 0.3).float() if masked else None
    similarity = losses.similarity_function(name, lncc_sigma=2.0)
    compiled = losses.against(similarity, target, mask)
    x = warped.clone().requires_grad_(True)
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    x_plain = warped.clone().requires_grad_(True)
    expected = similarity(x_plain, target, mask)
    (grad_expected,) = torch.autograd.grad(expected, x_plain)
    assert abs(value.item() - expected.item()) < 1e-5
    assert (grad - grad_expected).abs().max().item() < 1e-4 * grad_expected.abs().max().item()
    assert grad.abs().max().item() > 0


@needs_kernel
def test_compiled_lncc_is_used_only_where_it_applies():
    target = torch.rand(1, 1, 8, 9, 10)
    assert losses._LNCCAgainst(target, 2.0).compiled
    assert not losses._LNCCAgainst(torch.rand(2, 1, 8, 9, 10), 2.0).compiled        # a batch: autograd
    assert not losses._LNCCAgainst(target.double(), 2.0).compiled
    with fast_paths(native_filtering=False):
        assert not losses._LNCCAgainst(target, 2.0).compiled


def _replicate_reference(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """``sum_t kernel[t] x[clamp(i + t - half)]`` along ``axis``, in float64 by explicit indexing."""
    n, half = x.shape[2 + axis], (kernel.numel() - 1) // 2
    out = torch.zeros_like(x, dtype=torch.float64)
    for t in range(kernel.numel()):
        index = (torch.arange(n) + t - half).clamp(0, n - 1)
        out += float(kernel[t]) * x.double().index_select(2 + axis, index)
    return out


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 12, 7, 5, 9), (2, 3, 1, 6, 3), (1, 2, 2, 2, 2), (1, 4, 3, 40, 1)])
@pytest.mark.parametrize("taps", [3, 5, 7, 4])
def test_replicate_filter_and_its_adjoint(shape, taps):
    """The compiled filter with replicate padding (MIND's box means) against explicit clamped indexing, on every
    axis, kernels longer than the axis and even ones; its backward is the transposed map (<A x, g> = <x, A^T g>)."""
    g = torch.Generator().manual_seed(taps)
    kernel = torch.rand(taps, generator=g)
    for axis in range(3):
        x = torch.randn(*shape, generator=g).requires_grad_(True)
        y = separable.filter_along_axis_replicate(x, kernel, axis)
        assert torch.allclose(y.double(), _replicate_reference(x.detach(), kernel, axis), atol=1e-5)
        upstream = torch.randn(*shape, generator=g)
        (y * upstream).sum().backward()
        x2 = x.detach().double().requires_grad_(True)
        (_replicate_reference(x2, kernel.double(), axis) * upstream.double()).sum().backward()
        assert torch.allclose(x.grad.double(), x2.grad, atol=1e-5)


@needs_kernel
def test_box_mean_on_the_compiled_filter_is_the_banded_one_and_thread_independent(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 12, 17, 19, 23, generator=g)
    fast = losses.box_mean(x, 2)
    with fast_paths(native_filtering=False):
        banded = losses.box_mean(x, 2)
    assert (fast - banded).abs().max().item() < 1e-6
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert torch.equal(losses.box_mean(x, 2), fast)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 3, 24, 20, 19), (1, 3, 13, 1, 9), (1, 3, 1, 1, 5), (1, 3, 2, 31, 3)])
def test_compiled_diffusion_penalty_equals_the_torch_one(shape):
    """Field IO's diffusion penalty of displacements in voxels on the compiled kernel: the value and gradient of the
    written-out torch version to float rounding, one-node axes included; other tensors take the torch version."""
    from itk_gradicon.pipeline import instance

    g = torch.Generator().manual_seed(7)
    u = torch.randn(*shape, generator=g) * 0.5
    assert instance._compiled_diffusion_applies(u)
    ours = u.clone().requires_grad_(True)
    value = instance.diffusion_penalty_voxels(ours)
    (grad,) = torch.autograd.grad(value * 1.7, ours)
    with fast_paths(native_sampling=False):
        assert not instance._compiled_diffusion_applies(u)
        theirs = u.clone().requires_grad_(True)
        expected = instance.diffusion_penalty_voxels(theirs)
        (grad_expected,) = torch.autograd.grad(expected * 1.7, theirs)
    assert abs(value.item() - expected.item()) <= 1e-5 * max(expected.item(), 1e-12)
    assert (grad - grad_expected).abs().max().item() <= 1e-5 * grad_expected.abs().max().item()
    scale = instance.voxel_scale(shape[2:], u)
    assert instance.diffusion_penalty(u / scale).item() == pytest.approx(value.item(), rel=1e-5)  # the CUBE form
    assert not instance._compiled_diffusion_applies(u.double())
    assert not instance._compiled_diffusion_applies(torch.zeros(2, 3, 4, 4, 4))


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 20, 22, 18), (1, 1, 7, 1, 9), (1, 1, 3, 4, 2), (1, 1, 1, 1, 6)])
def test_compiled_mind_against_a_fixed_image_equals_autograd(masked, shape):
    """Field IO's MIND-SSC against a fixed image on the compiled kernel (the pair differences, variance,
    exponents and descriptor differences in passes of their own, its own backward) gives the loss and gradient
    of the autograd definition, on grids with axes shorter than the patch and the neighbours' distance
    (replicate padding), constant regions included, whatever the number of threads."""
    g = torch.Generator().manual_seed(11)
    target = torch.rand(shape, generator=g)
    warped = torch.rand(shape, generator=g)
    if shape[-1] > 6:
        target[..., :3] = 0.0                     # flat in both: distances 0 there
        warped[..., :4] = 0.0
    mask = (torch.rand(shape, generator=g) > 0.3).float() if masked else None
    compiled = losses.against(losses.mind_loss, target, mask)
    x = warped.clone().requires_grad_(True)
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    with fast_paths(native_filtering=False):
        assert not losses._MINDAgainst(target).compiled
        x_plain = warped.clone().requires_grad_(True)
        expected = losses.mind_loss(x_plain, target, mask)
        (grad_expected,) = torch.autograd.grad(expected, x_plain)
    assert abs(value.item() - expected.item()) < 1e-6
    assert (grad - grad_expected).abs().max().item() < 1e-4 * grad_expected.abs().max().item()
    assert grad.abs().max().item() > 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: 3)
        x3 = warped.clone().requires_grad_(True)
        value3 = compiled(x3)
        (grad3,) = torch.autograd.grad(value3, x3)
    assert abs(value3.item() - value.item()) < 1e-7
    assert (grad3 - grad).abs().max().item() < 1e-6 * grad.abs().max().item()


@needs_kernel
def test_compiled_mind_is_used_only_where_it_applies():
    target = torch.rand(1, 1, 8, 9, 10)
    against = losses._MINDAgainst(target)
    assert against.compiled and against.offsets.shape == (12, 6)
    assert against(torch.rand(1, 1, 8, 9, 10)).shape == (1, 1, 8, 9, 10)       # the mean over the channels
    assert not losses._MINDAgainst(torch.rand(2, 1, 8, 9, 10)).compiled         # a batch: autograd
    assert not losses._MINDAgainst(torch.rand(1, 1, 8, 9)).compiled             # 2-D: autograd
    assert not losses._MINDAgainst(target.double()).compiled
    plain = losses._MINDAgainst(torch.rand(1, 1, 8, 9))
    assert plain(torch.rand(1, 1, 8, 9)).shape == (1, 4, 8, 9)
