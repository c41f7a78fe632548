import json

import pytest
import torch

from longgen.backbones import (
    FAMILIES,
    adapter_class_for_pipeline,
    build_tiny,
    get_adapter_class,
    load_adapter,
)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_adapter(tmp_path)


def test_unsupported_pipeline_class_names_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline.*Supported pipeline classes: .*WanPipeline"):
        load_adapter(tmp_path)


def test_every_family_is_registered_with_its_pipelines():
    for family in FAMILIES:
        cls = get_adapter_class(family)
        assert cls.family == family
        for name in cls.pipeline_class_names:
            assert adapter_class_for_pipeline(name) is cls
    with pytest.raises(ValueError, match="unknown backbone family"):
        get_adapter_class("sora")


def test_compute_dtype_follows_casts_and_kept_fp32_modules():
    """The cached compute dtype is re-read after ``.to(dtype)``, and fp32-kept modules do not decide it."""
    from longgen.backbones.base import compute_dtype

    model = build_tiny("wan").model
    assert compute_dtype(model) == torch.float32
    model.to(torch.bfloat16)
    assert compute_dtype(model) == torch.bfloat16
    first = next(model.parameters())
    first.data = first.data.float()  # like diffusers' _keep_in_fp32_modules: the first parameter stays fp32
    assert compute_dtype(model) == torch.bfloat16
    model.to(torch.float32)
    assert compute_dtype(model) == torch.float32
