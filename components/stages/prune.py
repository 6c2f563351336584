"""Pruning: the recipe schema is defined; the stage itself is not built yet."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PruneConfig(BaseModel):
    """Settings of a prune stage."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["sparsegpt", "wanda", "magnitude", "structured"] = Field(description="pruning technique")
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights (or heads/channels) removed")
    mask_structure: str = Field("0:0", pattern=r"^\d+:\d+$", description="N:M pattern such as '2:4'; '0:0' for unstructured")
