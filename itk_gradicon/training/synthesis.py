"""Synthetic training pairs from label maps, in the spirit of SynthMorph and SynthSeg.

A ``kind: synthetic`` data set lists label maps instead of images. Every training pair is made on the
fly from one label map (``pairing: intra``) or two (``pairing: inter``):

1. **Anatomy.** Each label map is sampled onto the network grid through its own random transform: the
   field of view is the brain's bounding box plus a random margin (a skull-stripped image) or the
   head's (labels > 0), a small random affine change, and a smooth random displacement (Gaussian
   control points, trilinearly upsampled). Sampling takes the nearest label, so label maps stay label
   maps. With probability ``shapes`` the anatomy is replaced by random shapes (the argmax of smoothed
   noise fields) deformed twice, so that the network also learns to register what it has never seen.
2. **Contrast.** Every label gets a random mean intensity and spread, with the same table for both
   images (``same_contrast``) or independent ones; then Gaussian blur, a smooth multiplicative bias
   field, Gaussian noise and a random gamma. The result is normalised as an MRI image is at
   registration (:class:`itk_gradicon.pipeline.preprocess.IntensityNormalization`).
3. **Skull.** With probability ``skull_strip`` both images keep only the brain's labels
   (``brain_labels``) and are cropped around the brain, as skull-stripped images are; otherwise they
   show the whole head.

The pair's label maps (brain labels only, original label values) feed the Dice term and validation.
Everything is drawn from a generator seeded by ``(seed, pair index)``: the pairs do not depend on the
worker that makes them, and a resumed run sees the same pairs.

Label maps are read once per process and kept in memory as compact class indices in the network's
axis order at their own resolution (a 256^3 map takes 16 MiB).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..io.images import image_array, read_float32
from ..pipeline.preprocess import IntensityNormalization
from ..spatial.frames import ImageGrid, NetworkFrame

#: Most distinct labels a label map may hold (class indices are stored as int16).
MAX_LABELS = 32767


@dataclass(frozen=True)
class LabelMapEntry:
    """One label map of a synthetic data set, checked at scan time.

    Attributes:
        path: absolute path.
        grid: its grid (from the header).
        labels: the distinct label values, sorted (0 first when present).
        origin: where it was listed, for messages.
    """

    path: Path
    grid: ImageGrid
    labels: Tuple[int, ...]
    origin: str


@dataclass
class PreparedMap:
    """A label map ready for sampling: class indices in network axis order, and its boxes.

    Attributes:
        classes: ``int16`` tensor in network axis order (native resolution, cropped to the head),
            index into ``labels``.
        labels: label value of every class index.
        brain_box: ``(low, high)`` per network axis in normalised coordinates ``[-1, 1]``
            (``align_corners=True``) of the brain's box (see :func:`_box`).
    """

    classes: torch.Tensor
    labels: np.ndarray
    brain_box: np.ndarray


def read_label_values(path: Path, *, what: str, dimension: int) -> Tuple[np.ndarray, ImageGrid]:
    """The voxel array (ARRAY order) and grid of a label map; :class:`InputError` if it is not one.

    A label map holds whole numbers (any integer or floating pixel type whose values are whole)
    and at least two labels besides the background 0.
    """
    image, _ = read_float32(path, what=what, dimension=dimension)
    array = np.array(image_array(image))  # a copy: a view would outlive the image
    grid = ImageGrid.from_image(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError(f"{what} '{path}' holds NaN or infinite values; a label map holds whole numbers")
        if not np.array_equal(array, np.round(array)):
            sample = array[array != np.round(array)].flat[0]
            raise InputError(f"{what} '{path}' is not a label map: it holds non-integer values such as "
                             f"{float(sample):g}; a label map holds whole numbers")
    elif array.dtype.kind not in "iub":
        raise InputError(f"{what} '{path}' has pixel type {array.dtype}; a label map holds whole numbers")
    return array, grid


def check_label_map(path: Path, *, what: str, dimension: int, min_labels: int = 2) -> Tuple[ImageGrid, Tuple[int, ...]]:
    """Read and check a label map; returns its grid and its label values.

    Raises:
        InputError: not an image, wrong dimension, non-integer values, or fewer than ``min_labels``
            labels besides 0.
    """
    array, grid = read_label_values(path, what=what, dimension=dimension)
    if array.size and array.min() < 0:
        raise InputError(f"{what} '{path}' holds negative values (down to {array.min():g}); label values must "
                         "be >= 0")
    labels = tuple(int(v) for v in _compact(array)[0])
    foreground = [v for v in labels if v != 0]
    if len(foreground) < min_labels:
        raise InputError(f"{what} '{path}' holds {len(foreground)} label(s) besides 0 "
                         f"({', '.join(map(str, foreground)) or 'none'}); a synthetic data set needs label maps "
                         f"with at least {min_labels}")
    if len(labels) > MAX_LABELS:
        raise InputError(f"{what} '{path}' holds {len(labels)} distinct values; at most {MAX_LABELS} labels are "
                         "supported (is it an intensity image?)")
    return grid, labels


def _box(mask: np.ndarray) -> np.ndarray:
    """``[d, 2]`` box of ``mask`` from its moments, in normalised coordinates (``align_corners=True``).

    The box is the centre of mass plus and minus ``sqrt(5)`` standard deviations per axis (the extent
    of a solid ellipsoid with those moments, the shape of a brain): unlike the bounding box, it does not follow thin
    structures such as a brain stem cut by the field of view, so boxes of different scans of one
    anatomy correspond as an affine pre-alignment would make them correspond.
    """
    box = np.zeros((mask.ndim, 2))
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        counts = mask.sum(axis=others).astype(np.float64)
        n = mask.shape[axis]
        position = np.arange(n) * (2.0 / max(n - 1, 1)) - 1.0
        total = max(counts.sum(), 1.0)
        mean = float((counts * position).sum() / total)
        std = float(np.sqrt(max((counts * (position - mean) ** 2).sum() / total, 0.0)))
        half = np.sqrt(5.0) * std
        box[axis] = (mean - half, mean + half)
    return box


def _compact(array: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(labels, classes)``: the sorted distinct values and every voxel's index among them."""
    low, high = int(array.min()), int(array.max())
    if high - low < 1 << 20:  # small label values: a lookup table instead of sorting every voxel
        shifted = (array - low).astype(np.int64, copy=False).reshape(-1)
        present = np.nonzero(np.bincount(shifted, minlength=high - low + 1))[0]
        table = np.zeros(high - low + 1, dtype=np.int16)
        table[present] = np.arange(present.size, dtype=np.int16)
        return present + low, table[shifted].reshape(array.shape)
    labels, classes = np.unique(array, return_inverse=True)
    return labels, classes.reshape(array.shape).astype(np.int16)


def prepare_label_map(entry: LabelMapEntry, layout_axes: np.ndarray, brain_labels: Tuple[int, int],
                      *, dimension: int) -> PreparedMap:
    """Read ``entry``, lay it out along ``layout_axes`` (see :meth:`NetworkFrame.aligned_to`) and
    crop it to the head (labels other than 0)."""
    array, grid = read_label_values(entry.path, what="label map", dimension=dimension)
    frame = NetworkFrame.aligned_to(grid, (1,) * dimension, layout_axes)
    laid_out = frame.to_network_layout(array)
    head = laid_out != 0
    crop = []
    for axis in range(dimension):
        others = tuple(a for a in range(dimension) if a != axis)
        hits = np.nonzero(head.any(axis=others))[0]
        crop.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    laid_out = np.ascontiguousarray(laid_out[tuple(crop)])
    head = head[tuple(crop)]
    labels, classes = _compact(laid_out)
    low, high = brain_labels
    brain = (laid_out >= low) & (laid_out <= high)
    if not brain.any():
        brain = head
    return PreparedMap(torch.from_numpy(classes), labels.astype(np.int64), _box(brain))


# ------------------------------------------------------------------------------------------------
# random fields
# ------------------------------------------------------------------------------------------------

def smooth_noise(rng: np.random.Generator, shape: Sequence[int], control: int, channels: int = 1) -> torch.Tensor:
    """``[channels, *shape]`` standard-normal control values on a ``control^d`` grid, upsampled trilinearly."""
    d = len(shape)
    coarse = torch.from_numpy(rng.standard_normal((1, channels) + (control,) * d).astype(np.float32))
    mode = "trilinear" if d == 3 else "bilinear"
    return F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)[0]


def _identity(shape: Sequence[int]) -> torch.Tensor:
    """``[d, *shape]`` normalised coordinates (``align_corners=True``), network axis order."""
    axes = [torch.linspace(-1.0, 1.0, int(n)) if n > 1 else torch.zeros(1) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def blur_edge_replicated(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``[*shape]`` tensor (``sigma`` in voxels, kernel radius ``3 sigma``), the
    edge values repeated outside the image (replicate padding; :func:`itk_gradicon.pipeline.losses.gaussian_blur` is
    the similarities' blur of ``[B, C, *shape]`` batches, with zeros outside)."""
    if sigma <= 0.05:
        return image
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    d = image.dim()
    out = image[None, None]
    for axis in range(d):
        size = [1] * d
        size[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *size)
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = min(radius, image.shape[axis] - 1)
        padded = F.pad(out, pad, mode="replicate") if any(pad) else out
        conv = F.conv3d if d == 3 else F.conv2d
        out = conv(padded, weight)
        if out.shape[2 + axis] != image.shape[axis]:  # an axis shorter than the kernel
            out = F.interpolate(out, size=tuple(image.shape), mode="nearest")
    return out[0, 0]


# ------------------------------------------------------------------------------------------------
# the synthesiser
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """One synthetic subject on the network grid: class labels (original values) and brain mask."""

    labels: torch.Tensor       # [*shape] int64 label values
    brain: torch.Tensor        # [*shape] bool


class Synthesizer:
    """Makes the pairs of one synthetic data set (see the module docstring).

    Args:
        entries: the data set's label maps.
        settings: its :class:`~itk_gradicon.training.config.SynthesisConfig`.
        shape: the network input shape.
        layout_axes: world axes the network axes follow (see :class:`~itk_gradicon.spatial.frames.NetworkFrame`).
        memory_items: label maps kept in memory by each process.
    """

    def __init__(self, entries: Sequence[LabelMapEntry], settings, shape: Sequence[int], layout_axes: np.ndarray,
                 *, memory_items: int = 64) -> None:
        self.entries = list(entries)
        self.settings = settings
        self.shape = tuple(int(s) for s in shape)
        self.layout_axes = np.asarray(layout_axes, dtype=np.float64)
        self.memory_items = max(1, int(memory_items))
        self._maps: "OrderedDict[int, PreparedMap]" = OrderedDict()
        self._identity: Optional[torch.Tensor] = None

    def __getstate__(self) -> Dict[str, object]:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        state["_identity"] = None
        return state

    # ---- label maps -----------------------------------------------------------------------------
    def label_map(self, index: int) -> PreparedMap:
        hit = self._maps.get(index)
        if hit is not None:
            self._maps.move_to_end(index)
            return hit
        s = self.settings
        prepared = prepare_label_map(self.entries[index], self.layout_axes, tuple(s.brain_labels),
                                     dimension=len(self.shape))
        self._maps[index] = prepared
        while len(self._maps) > self.memory_items:
            self._maps.popitem(last=False)
        return prepared

    def _grid(self) -> torch.Tensor:
        if self._identity is None:
            self._identity = _identity(self.shape)
        return self._identity

    # ---- anatomy --------------------------------------------------------------------------------
    def _coordinates(self, rng: np.random.Generator, box: np.ndarray, margin: float) -> torch.Tensor:
        """``[d, *shape]`` normalised source coordinates: the box (plus margin), a random affine
        change and a smooth random displacement."""
        s = self.settings
        d = len(self.shape)
        centre = box.mean(axis=1)
        half = (box[:, 1] - box[:, 0]) / 2 * (1.0 + 2 * margin)
        matrix = np.eye(d) + s.affine_std * rng.standard_normal((d, d))
        shift = s.affine_std * rng.standard_normal(d)
        ident = self._grid()
        flat = ident.reshape(d, -1)
        moved = torch.from_numpy(matrix.astype(np.float32)) @ flat + torch.from_numpy(shift.astype(np.float32))[:, None]
        coords = moved.reshape(ident.shape)
        if s.warp_std > 0:
            magnitude = rng.uniform(0.0, s.warp_std)
            control = int(rng.integers(s.warp_control[0], s.warp_control[1] + 1))
            noise = smooth_noise(rng, self.shape, control, channels=d)
            # warp_std is in network voxels: normalised units are 2 / (n - 1) per voxel
            per_voxel = torch.tensor([2.0 / max(n - 1, 1) for n in self.shape]).reshape(d, *(1,) * d)
            coords = coords + magnitude * per_voxel * noise
        return coords * torch.from_numpy(half.astype(np.float32)).reshape(d, *(1,) * d) \
            + torch.from_numpy(centre.astype(np.float32)).reshape(d, *(1,) * d)

    def _sample_nearest(self, classes: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Class index at the nearest source voxel of every point; -1 outside the map."""
        d = len(self.shape)
        size = classes.shape
        index = torch.zeros(self.shape, dtype=torch.int64)
        inside = torch.ones(self.shape, dtype=torch.bool)
        stride = 1
        for axis in reversed(range(d)):
            n = size[axis]
            position = torch.round((coords[axis] + 1.0) * 0.5 * (n - 1)).to(torch.int64)
            inside &= (position >= 0) & (position < n)
            index += position.clamp_(0, n - 1) * stride
            stride *= n
        values = classes.reshape(-1)[index.reshape(-1)].reshape(self.shape).to(torch.int64)
        return torch.where(inside, values, torch.full_like(values, -1))

    def subject(self, rng: np.random.Generator, map_index: int, stripped: bool, margin: float) -> Subject:
        """One subject from label map ``map_index``: labels and brain mask on the network grid.

        The field of view is the brain's box plus ``margin`` on each side (one margin for both
        subjects of a pair: after an affine pre-alignment they share a field of view). A whole head
        is framed on the brain too, with a wider margin, not on the head's box (which depends on how
        much neck a scan holds).
        """
        s = self.settings
        prepared = self.label_map(map_index)
        coords = self._coordinates(rng, prepared.brain_box, margin)
        classes = self._sample_nearest(prepared.classes, coords)
        table = torch.from_numpy(prepared.labels)
        labels = torch.where(classes >= 0, table[classes.clamp(min=0)], torch.zeros_like(classes))
        low, high = s.brain_labels
        brain = (labels >= low) & (labels <= high)
        if stripped:
            labels = torch.where(brain, labels, torch.zeros_like(labels))
        return Subject(labels, brain)

    def shapes_pair(self, rng: np.random.Generator) -> Tuple[Subject, Subject]:
        """Two deformations of one random-shapes label map (no anatomy)."""
        count = int(rng.integers(4, 13))
        control = int(rng.integers(3, 9))
        fields = smooth_noise(rng, self.shape, control, channels=count)
        base = torch.argmax(fields, dim=0) + 1
        whole = np.tile([-1.0, 1.0], (len(self.shape), 1))
        prepared = PreparedMap((base - 1).to(torch.int16), np.arange(1, count + 1, dtype=np.int64), whole)
        out = []
        for _ in range(2):
            coords = self._coordinates(rng, prepared.brain_box, 0.0)
            classes = self._sample_nearest(prepared.classes, coords)
            labels = torch.where(classes >= 0, classes.to(torch.int64) + 1, torch.zeros_like(classes))
            out.append(Subject(labels, labels > 0))
        return out[0], out[1]

    # ---- contrast -------------------------------------------------------------------------------
    def contrast_table(self, rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
        """Mean and spread of every label value ``0..size-1`` (label 0, the background, stays dark)."""
        means = rng.uniform(0.0, 1.0, size)
        spreads = rng.uniform(0.0, self.settings.texture_std, size)
        means[0] = rng.uniform(0.0, 0.1)
        spreads[0] = rng.uniform(0.0, 0.02)
        return means, spreads

    def render(self, rng: np.random.Generator, subject: Subject, table: Tuple[np.ndarray, np.ndarray],
               value_index: torch.Tensor) -> torch.Tensor:
        """The image of ``subject`` under a contrast table; ``value_index`` maps label values to rows."""
        s = self.settings
        means = torch.from_numpy(table[0].astype(np.float32))
        spreads = torch.from_numpy(table[1].astype(np.float32))
        rows = value_index[subject.labels]
        image = means[rows] + spreads[rows] * torch.from_numpy(
            rng.standard_normal(self.shape).astype(np.float32))
        image = blur_edge_replicated(image, float(rng.uniform(*s.blur)))
        if s.bias_std > 0:
            bias = smooth_noise(rng, self.shape, int(rng.integers(2, 6)))[0]
            image = image * torch.exp(float(rng.uniform(0.0, s.bias_std)) * bias)
        if s.noise_std > 0:
            image = image + float(rng.uniform(0.0, s.noise_std)) * torch.from_numpy(
                rng.standard_normal(self.shape).astype(np.float32))
        image = image.clamp(min=0.0)
        top = float(image.max())
        if top > 0:
            image = image / top
        if s.gamma_std > 0:
            image = image ** float(np.exp(rng.normal(0.0, s.gamma_std)))
        normalised = IntensityNormalization("mri")(image.numpy(), what="synthetic image")
        return torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32))

    # ---- pairs ----------------------------------------------------------------------------------
    def pair(self, rng: np.random.Generator, map_A: int, map_B: int) -> Dict[str, torch.Tensor]:
        """``image_A``, ``image_B``, ``seg_A``, ``seg_B`` (``[1, *shape]`` float32) of one pair."""
        s = self.settings
        if s.shapes > 0 and rng.random() < s.shapes:
            subject_A, subject_B = self.shapes_pair(rng)
            dice_A, dice_B = subject_A.labels, subject_B.labels
            values = np.arange(int(max(subject_A.labels.max(), subject_B.labels.max())) + 1)
        else:
            stripped = bool(rng.random() < s.skull_strip)
            margin = float(rng.uniform(*(s.margin if stripped else s.head_margin)))
            subject_A = self.subject(rng, map_A, stripped, margin)
            subject_B = self.subject(rng, map_B, stripped, margin)
            dice_A = torch.where(subject_A.brain, subject_A.labels, torch.zeros_like(subject_A.labels))
            dice_B = torch.where(subject_B.brain, subject_B.labels, torch.zeros_like(subject_B.labels))
            values = np.union1d(self.label_map(map_A).labels, self.label_map(map_B).labels)
        values = np.union1d(values, [0])  # row 0 of the contrast table is the background's
        value_index = torch.zeros(int(values.max()) + 1, dtype=torch.int64)
        value_index[torch.from_numpy(values)] = torch.arange(values.size)
        size = values.size
        table_A = self.contrast_table(rng, size)
        table_B = table_A if rng.random() < s.same_contrast else self.contrast_table(rng, size)
        image_A = self.render(rng, subject_A, table_A, value_index)
        image_B = self.render(rng, subject_B, table_B, value_index)
        return {"image_A": image_A[None], "image_B": image_B[None],
                "seg_A": dice_A.to(torch.float32)[None], "seg_B": dice_B.to(torch.float32)[None]}

