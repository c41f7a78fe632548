import json

import pytest

from longgen.backbones import FAMILIES, adapter_class_for_pipeline, get_adapter_class, load_adapter


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
