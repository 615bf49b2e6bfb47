"""``GradICONRegistrationMethod``: :func:`itk_gradicon.register` in the style of ITK's registration methods."""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

from .errors import InputError
from .models import DEFAULT_MODEL, Model, load_model
from .registration import RegistrationResult, register


class GradICONRegistrationMethod:
    """ITK-style registration method: set the inputs, ``Update()``, get the transforms.

    Example:
        >>> method = GradICONRegistrationMethod(model="unigradicon")   # doctest: +SKIP
        >>> method.SetFixedImage(fixed); method.SetMovingImage(moving)  # doctest: +SKIP
        >>> method.SetNumberOfIterations(50)                            # doctest: +SKIP
        >>> method.Update()                                             # doctest: +SKIP
        >>> transform = method.GetTransform()   # fixed -> moving       # doctest: +SKIP
    """

    def __init__(self, model: Union[str, Model] = DEFAULT_MODEL, **options: Any) -> None:
        self._model = model
        self._options: Dict[str, Any] = dict(options)
        self._fixed = self._moving = None
        self._result: Optional[RegistrationResult] = None

    def _set(self, key: str, value: Any) -> None:
        self._options[key] = value
        self._result = None

    def SetFixedImage(self, image) -> None:
        self._fixed, self._result = image, None

    def SetMovingImage(self, image) -> None:
        self._moving, self._result = image, None

    def SetModel(self, model: Union[str, Model]) -> None:
        self._model, self._result = model, None

    def SetFixedMask(self, mask) -> None:
        self._set("fixed_mask", mask)

    def SetMovingMask(self, mask) -> None:
        self._set("moving_mask", mask)

    def SetFixedLabels(self, labels) -> None:
        self._set("fixed_labels", labels)

    def SetMovingLabels(self, labels) -> None:
        self._set("moving_labels", labels)

    def SetNumberOfIterations(self, iterations: int) -> None:
        """Instance-optimisation steps (0: prediction only)."""
        self._set("io_iterations", iterations)

    def SetLearningRate(self, lr: float) -> None:
        self._set("io_lr", lr)

    def SetOptimisationMethod(self, method: str) -> None:
        """Instance-optimisation method: ``"auto"``, ``"network"`` or ``"field"``."""
        self._set("io_method", method)

    def SetSimilarity(self, name: str) -> None:
        self._set("io_similarity", name)

    def SetInitialTransform(self, transform) -> None:
        """Affine pre-alignment, fixed -> moving."""
        self._set("initial_transform", transform)

    def SetDevice(self, device: str) -> None:
        self._set("device", device)

    def Update(self) -> None:
        if self._fixed is None or self._moving is None:
            raise InputError("set both the fixed and the moving image before Update()")
        if not isinstance(self._model, Model):
            self._model = load_model(self._model)
        self._result = register(self._fixed, self._moving, model=self._model, **self._options)

    def _done(self) -> RegistrationResult:
        if self._result is None:
            self.Update()
        assert self._result is not None
        return self._result

    def GetTransform(self):
        """Forward ``itk.DisplacementFieldTransform`` (fixed -> moving, fixed grid)."""
        return self._done().forward_transform

    def GetInverseTransform(self):
        """Inverse ``itk.DisplacementFieldTransform`` (moving -> fixed, moving grid)."""
        return self._done().inverse_transform

    def GetResult(self) -> RegistrationResult:
        return self._done()


__all__ = ["GradICONRegistrationMethod"]
