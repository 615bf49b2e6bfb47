"""The typed options of a registration (itk_gradicon.pipeline.options): one object for register(), the command line,
register-batch and run_register, every default and every choice written once."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from itk_gradicon.errors import InputError
from itk_gradicon.pipeline.options import (AFFINE_CHOICES, IO_METHOD_CHOICES, IO_SIMILARITY_CHOICES, IO_STARTS,
                                           KEYWORDS, MASK_MODES, MODALITY_CHOICES, NETWORK_REGIONS, ORIENTATIONS,
                                           IntensityOptions, PrealignmentOptions, RefinementOptions,
                                           RegistrationOptions, check_options)


def test_flat_keywords_and_groups_are_the_same_options():
    grouped = RegistrationOptions(intensity=IntensityOptions(fixed_modality="t1w", moving_modality="t2w"),
                                  refinement=RefinementOptions(iterations=7, similarity="mind", start="prediction"),
                                  prealignment=PrealignmentOptions(affine="rigid"), mask_mode="loss")
    flat = RegistrationOptions.from_keywords(fixed_modality="t1w", moving_modality="t2w", io_iterations=7,
                                             io_similarity="mind", io_start="prediction", affine="rigid",
                                             mask_mode="loss")
    assert grouped == flat
    assert RegistrationOptions.from_keywords(**flat.keywords()) == flat
    assert set(flat.keywords()) == set(KEYWORDS)
    # keywords given beside a base replace only their own fields
    changed = RegistrationOptions.from_keywords(flat, io_iterations=0)
    assert changed.refinement.iterations == 0 and changed.refinement.similarity == "mind"
    assert flat.refinement.iterations == 7  # frozen: the base is not changed


def test_every_default_is_written_once():
    defaults = RegistrationOptions().keywords()
    assert defaults == {"fixed_modality": "auto", "moving_modality": "auto", "ct_window": None,
                        "quantile_range": None, "mask_mode": "input", "io_iterations": None, "io_similarity": None,
                        "io_lr": None, "io_method": "auto", "io_smoothness": None, "io_dice_weight": 1.0,
                        "io_start": "auto", "affine": "auto", "orientation": "fixed", "network_region": "auto",
                        "compute_inverse": True}
    with pytest.raises(Exception):
        RegistrationOptions().mask_mode = "loss"  # frozen


def test_an_unknown_keyword_is_named_with_the_nearest_option():
    with pytest.raises(TypeError, match=r"'io_iteration' \(did you mean 'io_iterations'\?\)"):
        RegistrationOptions.from_keywords(io_iteration=3)


@pytest.mark.parametrize("keywords, inputs, message", [
    ({"mask_mode": "outside"}, {}, "unknown mask_mode 'outside'; allowed: input, loss, both"),
    ({"io_iterations": -1}, {}, "io_iterations must be a whole number >= 0"),
    ({"io_method": "magic"}, {}, "unknown io_method 'magic'"),
    ({"affine": "rigid"}, {"initial_transform": "t.mat"}, "give either affine rigid or initial_transform"),
    ({}, {"fixed_labels": "f.nii"}, "fixed_labels and moving_labels must be given together"),
    ({"mask_mode": "loss"}, {"fixed_mask": "m.nii"}, "mask_mode loss needs both fixed_mask and moving_mask"),
    ({"fixed_modality": "xray"}, {}, "unknown fixed_modality 'xray'"),
])
def test_check_options_names_what_was_received(keywords, inputs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        check_options(RegistrationOptions.from_keywords(**keywords), inputs)
    keyword = next(word for word in message.split() if word in KEYWORDS or word.endswith(("_labels", "_mask")))
    with pytest.raises(InputError, match="--" + keyword.replace("_", "-")):
        check_options(RegistrationOptions.from_keywords(**keywords), inputs,
                      name=lambda keyword: "--" + keyword.replace("_", "-"))


def test_the_choices_are_the_library_s_and_the_command_line_s():
    from itk_gradicon.pipeline import losses
    from itk_gradicon.cli.register_cmd import register

    assert IO_SIMILARITY_CHOICES == tuple(losses.SIMILARITIES)
    choices = {p.name: tuple(p.type.choices) for p in register.params if hasattr(p.type, "choices")}
    assert choices == {"fixed_modality": MODALITY_CHOICES, "moving_modality": MODALITY_CHOICES,
                       "mask_mode": MASK_MODES, "io_similarity": IO_SIMILARITY_CHOICES,
                       "io_method": IO_METHOD_CHOICES, "io_start": IO_STARTS, "affine": AFFINE_CHOICES,
                       "orientation": ORIENTATIONS, "network_region": NETWORK_REGIONS}


def test_the_options_load_without_torch_or_itk():
    code = ("import sys, itk_gradicon.pipeline.options; "
            "print(sorted(m for m in ('torch', 'itk', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_pre_alignment_policy_and_the_foreground_box_load_without_torch_or_itk():
    """The command module imports them at start-up (``register --help``, the file commands)."""
    code = ("import sys, itk_gradicon.pipeline.affine, itk_gradicon.pipeline.region, itk_gradicon.commands.register; "
            "print(sorted(m for m in ('torch', 'itk', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_register_takes_the_options_object_or_the_keywords(tiny_model_file):
    from conftest import blob_volume, make_image
    from itk_gradicon.models import load_model
    from itk_gradicon.registration import register

    rng = np.random.default_rng(4)
    fixed, moving = make_image(blob_volume((24, 24, 24), rng) * 100), make_image(blob_volume((24, 24, 24), rng) * 100)
    model = load_model(str(tiny_model_file))
    keywords = dict(affine="none", fixed_modality="mri", moving_modality="mri", io_iterations=2, io_method="field")
    by_keywords = register(fixed, moving, model=model, **keywords)
    by_object = register(fixed, moving, model=model, options=RegistrationOptions.from_keywords(**keywords))
    np.testing.assert_array_equal(by_keywords.forward_field.array, by_object.forward_field.array)
    with pytest.raises(TypeError, match="did you mean 'io_iterations'"):
        register(fixed, moving, model=model, io_iteration=2)
