import pytest
import yaml

from etl.config import ConfigError, PipelineConfig


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("buckets", {"multiple": 0}, "buckets.multiple: must be at least 1, got 0"),
        ("buckets", {"multiple": -16}, "buckets.multiple: must be at least 1, got -16"),
        ("buckets", {"resolutions": [256, 256]}, "buckets.resolutions: each resolution once, got [256, 256]"),
        ("buckets", {"resolutions": [100]}, "buckets.resolutions: 100 is not a positive multiple of 16"),
        ("buckets", {"format": "jpeg", "quality": 101}, "buckets.quality: must be in [0, 100], got 101"),
        ("buckets", {"format": "webp", "quality": -1}, "buckets.quality: must be in [0, 100], got -1"),
        ("filter", {"min_side": -5}, "filter.min_side: must be at least 0, got -5"),
        ("filter", {"max_punsafe": 7.0}, "filter.max_punsafe: must be in [0, 1] or null, got 7.0"),
        ("filter", {"max_pwatermark": -0.1}, "filter.max_pwatermark: must be in [0, 1] or null, got -0.1"),
        ("download", {"processes": 0}, "download.processes: must be at least 1, got 0"),
        ("automation", {"retries": -1}, "automation.retries: must be at least 0, got -1"),
    ],
)
def test_pipeline_settings_out_of_range_name_the_key(tmp_path, section, values, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"root": "data", "sources": [], section: values}))
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_yaml(path)
    assert str(err.value).startswith(message), err.value


def test_pipeline_settings_at_their_bounds_load(tmp_path):
    path = tmp_path / "pipeline.yaml"
    # null disables a score's limit; min_side 0 keeps any size.
    path.write_text(yaml.safe_dump({"root": "data", "sources": [], "buckets": {"multiple": 1, "quality": 100},
                                    "filter": {"min_side": 0, "max_punsafe": None, "max_pwatermark": 1}}))
    config = PipelineConfig.from_yaml(path)
    assert (config.buckets.quality, config.filter.min_side, config.filter.max_punsafe) == (100, 0, None)
