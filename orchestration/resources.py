"""Resources carry configuration into the assets."""

from __future__ import annotations

from functools import cached_property

import dagster as dg

from etl.config import PipelineConfig
from etl.layout import DataLayout


class PipelineResource(dg.ConfigurableResource):
    """The pipeline config file every asset reads (root, sources, stage settings)."""

    config_path: str

    @cached_property
    def config(self) -> PipelineConfig:
        return PipelineConfig.from_yaml(self.config_path)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.config.root)
