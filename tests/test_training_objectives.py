"""Training objectives against hand-computed values on toy cases.

Toy networks return known maps (translations by whole voxels, or linear scalings about the centre),
so that warped images, the mono-modal cycle similarity of M2M-Reg, GradICON and GradCyCon can be
computed by hand: a translation by ``k`` voxels shifts arrays exactly; a scaling ``x -> c + s (x - c)``
has the Jacobian ``s I``, so the penalty of a cycle of scalings is ``(prod s - 1)^2`` (the sum over
the axes of the mean squared finite difference, ``d`` terms of ``(prod s - 1)^2 / d``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from itk_gradicon.pipeline import losses
from itk_gradicon.network.operators import CubeMap, identity_on
from itk_gradicon.training.objectives import GradICONObjective, M2MObjective, dice_term

# the tests read loss terms that carry autograd history as Python floats
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

N = 33  # grid nodes per axis: CUBE spacing 1/32
SHAPE = (N, N)


class ToyNet(nn.Module):
    """``net(X, Y)`` returns the map registered for the pair of tensors ``(X, Y)`` (by identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # so that the objective has a parameter
        self.maps: Dict[Tuple[int, int], torch.Tensor] = {}
        self.calls: List[Tuple[str, str]] = []
        self.names: Dict[int, str] = {}

    def register(self, X: torch.Tensor, Y: torch.Tensor, field: torch.Tensor) -> None:
        self.maps[(X.data_ptr(), Y.data_ptr())] = field

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> CubeMap:
        self.calls.append((self.names.get(X.data_ptr(), "?"), self.names.get(Y.data_ptr(), "?")))
        field = self.maps.get((X.data_ptr(), Y.data_ptr()))
        if field is None:
            field = torch.zeros((X.shape[0], X.dim() - 2, *X.shape[2:]))
        return CubeMap((field + 0 * self.weight,))


def translation(voxels_axis0: float, batch: int = 1) -> torch.Tensor:
    """Constant displacement field: ``voxels_axis0`` network voxels along network axis 0."""
    field = torch.zeros((batch, 2, *SHAPE))
    field[:, 0] = voxels_axis0 / (N - 1)
    return field


def scaling(s: float, batch: int = 1) -> torch.Tensor:
    """Displacement ``(s - 1)(x - 1/2)``: the map ``x -> 1/2 + s (x - 1/2)``."""
    ident = identity_on(SHAPE, torch.zeros(1))
    return ((s - 1.0) * (ident - 0.5)).expand(batch, -1, -1, -1).clone()


def blob(centre_axis0: int, centre_axis1: int = 16, width: float = 3.0) -> np.ndarray:
    i, j = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    return np.exp(-((i - centre_axis0) ** 2 + (j - centre_axis1) ** 2) / (2 * width ** 2))


def tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]


def shifted(array: np.ndarray, k: int) -> np.ndarray:
    """``out[i] = array[i + k]`` along axis 0, zero outside: the image warped by a translation of ``k``."""
    out = np.zeros_like(array)
    if k >= 0:
        out[: N - k] = array[k:]
    else:
        out[-k:] = array[: N + k]
    return out


def mse(warped, target, mask=None):
    return torch.mean((warped - target) ** 2)


INTERIOR_POINTS = identity_on((9, 9), torch.zeros(1)) * 0.5 + 0.25  # stay inside [0, 1] when scaled


# ------------------------------------------------------------------------------------------------
# GradICON objective
# ------------------------------------------------------------------------------------------------

def test_identity_network_lncc_of_negated_image_is_four_and_squared_lncc_is_zero():
    """An untrained network is the identity; for B = -A, LNCC = -1 wherever the local variance is
    large (here everywhere), so 1 - LNCC = 2 per direction and 1 - LNCC^2 = 0."""
    from itk_gradicon.network import Architecture, build_network

    arch = Architecture(dimension=2, input_shape=(32, 32), levels=2, refinement_steps=1,
                        down_channels=(4, 8, 8), up_channels=(4, 8, 8))
    net = build_network(arch)
    g = torch.Generator().manual_seed(0)
    A = torch.rand((2, 1, 32, 32), generator=g)
    B = -A
    for similarity, expected in ((losses.lncc_loss, 4.0), (losses.squared_lncc_loss, 0.0)):
        terms = GradICONObjective(net, similarity)({"image_A": A, "image_B": B}, generator=g)
        assert float(terms["similarity"]) == pytest.approx(expected, abs=2e-3)
        assert float(terms["gradicon"]) == pytest.approx(0.0, abs=1e-10)
        assert float(terms["total"]) == pytest.approx(expected, abs=2e-3)


def test_gradicon_of_two_scalings_and_total_with_lambda():
    net = ToyNet()
    A, B = tensor(blob(14)), tensor(blob(18))
    net.register(A, B, scaling(1.1))
    net.register(B, A, scaling(0.95))
    terms = GradICONObjective(net, mse, lmbda=1.5)({"image_A": A, "image_B": B}, INTERIOR_POINTS)
    expected_reg = (1.1 * 0.95 - 1) ** 2
    assert float(terms["gradicon"]) == pytest.approx(expected_reg, rel=1e-3)
    assert float(terms["total"]) == pytest.approx(float(terms["similarity"]) + 1.5 * float(terms["gradicon"]),
                                                  rel=1e-6)


def test_similarity_uses_the_loss_images_of_randomised_pairs():
    """With loss randomisation the similarity compares the loss images, warped by the inputs' maps."""
    net = ToyNet()
    A, B = tensor(blob(10)), tensor(blob(20))
    loss_A, loss_B = tensor(blob(12, 14)), tensor(blob(16, 18))
    net.register(A, B, translation(2))
    net.register(B, A, translation(-3))
    terms = GradICONObjective(net, mse)({"image_A": A, "image_B": B, "loss_A": loss_A, "loss_B": loss_B},
                                        INTERIOR_POINTS)
    la, lb = blob(12, 14), blob(16, 18)
    expected = np.mean((shifted(la, 2) - lb) ** 2) + np.mean((shifted(lb, -3) - la) ** 2)
    assert float(terms["similarity"]) == pytest.approx(expected, rel=1e-4)


def test_dice_term_counts_only_pairs_with_segmentations():
    net = ToyNet()
    seg_A = torch.zeros((2, 1, *SHAPE))
    seg_B = torch.zeros((2, 1, *SHAPE))
    seg_A[:, :, 5:15, 5:15] = 1      # 100 voxels
    seg_B[:, :, 10:20, 5:15] = 1     # 100 voxels, 50 shared
    seg_B[1] = 0                     # pair 1 has no segmentation: it must not count
    A, B = tensor(blob(14)), tensor(blob(18))
    phi = net(A, B)
    dice = dice_term(seg_A, seg_B, torch.tensor([True, False]), phi, phi)
    assert float(dice) == pytest.approx(2 * (1 - 2 * 50 / 200), rel=1e-5)
    assert float(dice_term(seg_A, seg_B, torch.tensor([False, False]), phi, phi)) == 0.0
    batch = {"image_A": A.expand(2, -1, -1, -1), "image_B": B.expand(2, -1, -1, -1), "seg_A": seg_A,
             "seg_B": seg_B, "has_seg": torch.tensor([True, False])}
    terms = GradICONObjective(net, mse, dice_weight=0.5)(batch, INTERIOR_POINTS)
    assert float(terms["total"]) == pytest.approx(float(terms["similarity"]) + 0.5 * 1.0, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# M2M-Reg
# ------------------------------------------------------------------------------------------------

def _cycle_images(t_ST, t_TSp, t_SpTp, t_TpS, tp_offset=0):
    """Images for which every mono-modal term of eq. 2 vanishes when the maps are wired correctly."""
    S = blob(16)
    T = blob(14, 20)
    Sp = shifted(S, t_ST + t_TSp)                     # S o Phi^ST o Phi^TS' == S'
    Tp = shifted(T, t_TSp + t_SpTp + tp_offset)       # T o Phi^TS' o Phi^S'T' == T'
    return S, T, Sp, Tp


def _toy_cycle(t, tp_offset=0, prealigned=False):
    t_ST, t_TSp, t_SpTp, t_TpS = t
    arrays = _cycle_images(t_ST, t_TSp, 0 if prealigned else t_SpTp, t_TpS, tp_offset)
    S, T, Sp, Tp = (tensor(a) for a in arrays)
    net = ToyNet()
    net.names = {S.data_ptr(): "S", T.data_ptr(): "T", Sp.data_ptr(): "Sp", Tp.data_ptr(): "Tp"}
    net.register(S, T, translation(t_ST))
    net.register(T, S, translation(-t_ST))
    net.register(T, Sp, translation(t_TSp))
    net.register(Sp, Tp, translation(t_SpTp))
    net.register(Tp, S, translation(t_TpS))
    batch = {"image_S": S, "image_T": T, "image_Sp": Sp, "image_Tp": Tp,
             "prealigned": torch.tensor([prealigned])}
    return net, batch, arrays


def test_m2m_cycle_similarity_compares_each_modality_with_itself():
    # a closed cycle: t_ST + t_TS' + t_S'T' + t_T'S = 0, every shift different
    t = (2, 3, -1, -4)
    net, batch, _ = _toy_cycle(t)
    terms = M2MObjective(net, mse, lmbda=0.5, lambda_gcc=0.1)(batch, INTERIOR_POINTS)
    assert float(terms["similarity"]) == pytest.approx(0.0, abs=1e-8)
    assert float(terms["gradicon"]) == pytest.approx(0.0, abs=1e-8)
    assert float(terms["gradcycon"]) == pytest.approx(0.0, abs=1e-8)
    assert sorted(set(net.calls)) == sorted({("S", "T"), ("T", "S"), ("T", "Sp"), ("Sp", "Tp"), ("Tp", "S")})

    # T' one voxel off: terms 3 and 4 of eq. 2 become computable mismatches, terms 1 and 2 stay 0
    net, batch, (S, T, Sp, Tp) = _toy_cycle(t, tp_offset=1)
    terms = M2MObjective(net, mse)(batch, INTERIOR_POINTS)
    term3 = np.mean((shifted(T, t[1] + t[2]) - Tp) ** 2)     # T o Phi^TS' o Phi^S'T' vs T'
    term4 = np.mean((shifted(Tp, t[3] + t[0]) - T) ** 2)     # T' o Phi^T'S o Phi^ST vs T
    assert term3 > 1e-4 and term4 > 1e-4
    assert float(terms["similarity"]) == pytest.approx(term3 + term4, rel=1e-4)


def test_m2m_prealigned_bridge_leaves_out_its_map():
    t = (2, 3, 99, -4)  # Phi^S'T' would shift by 99 voxels: it must not be used; the cycle is 1 voxel open
    net, batch, (S, T, Sp, Tp) = _toy_cycle(t, prealigned=True)
    terms = M2MObjective(net, mse)(batch, INTERIOR_POINTS)
    assert ("Sp", "Tp") not in net.calls
    term2 = np.mean((shifted(Sp, t[3]) - S) ** 2)            # S' o Phi^T'S vs S
    term3 = np.mean((shifted(T, t[1]) - Tp) ** 2)            # T o Phi^TS' vs T'
    term1 = np.mean((shifted(S, t[0] + t[1]) - Sp) ** 2)     # 0 by construction
    term4 = np.mean((shifted(Tp, t[3] + t[0]) - T) ** 2)
    assert term1 == 0.0 and term3 == 0.0 and term2 > 1e-3 and term4 > 1e-3
    assert float(terms["similarity"]) == pytest.approx(term1 + term2 + term3 + term4, rel=1e-4)


@pytest.mark.parametrize("prealigned", [False, True])
def test_gradcycon_and_gradicon_of_scalings(prealigned):
    s_ST, s_TS, s_TSp, s_SpTp, s_TpS = 1.1, 0.9, 1.05, 0.97, 1.02
    net, batch, _ = _toy_cycle((0, 0, 0, 0), prealigned=prealigned)
    S, T, Sp, Tp = (batch[f"image_{r}"] for r in ("S", "T", "Sp", "Tp"))
    net.register(S, T, scaling(s_ST))
    net.register(T, S, scaling(s_TS))
    net.register(T, Sp, scaling(s_TSp))
    net.register(Sp, Tp, scaling(s_SpTp))
    net.register(Tp, S, scaling(s_TpS))
    terms = M2MObjective(net, mse, lmbda=0.5, lambda_gcc=0.1)(batch, INTERIOR_POINTS)
    cycle = s_ST * s_TSp * (1.0 if prealigned else s_SpTp) * s_TpS
    assert float(terms["gradcycon"]) == pytest.approx((cycle - 1) ** 2, rel=1e-3)
    assert float(terms["gradicon"]) == pytest.approx((s_ST * s_TS - 1) ** 2, rel=1e-3)
    expected_total = float(terms["similarity"]) + 0.5 * (s_ST * s_TS - 1) ** 2 + 0.1 * (cycle - 1) ** 2
    assert float(terms["total"]) == pytest.approx(expected_total, rel=1e-4)


def test_m2m_mixed_batch_averages_the_two_kinds_of_cycle():
    from itk_gradicon.network import Architecture, build_network

    arch = Architecture(dimension=2, input_shape=(16, 16), levels=1, refinement_steps=0,
                        down_channels=(4, 4), up_channels=(4, 4))
    net = build_network(arch)
    g = torch.Generator().manual_seed(1)
    batch = {f"image_{r}": torch.rand((3, 1, 16, 16), generator=g) for r in ("S", "T", "Sp", "Tp")}
    objective = M2MObjective(net, losses.lncc_loss)
    points = losses.gradicon_sample_points((16, 16), like=batch["image_S"], generator=g)
    batch["prealigned"] = torch.tensor([True, False, True])
    mixed = objective(batch, points)
    parts = []
    for index, flag in (([0, 2], True), ([1], False)):
        sub = {k: v[index] for k, v in batch.items() if k.startswith("image_")}
        sub["prealigned"] = torch.tensor([flag] * len(index))
        parts.append((len(index), objective(sub, points)))
    for key in ("total", "similarity", "gradcycon"):
        expected = sum(n * float(t[key]) for n, t in parts) / 3
        assert float(mixed[key]) == pytest.approx(expected, rel=1e-5)
