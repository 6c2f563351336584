"""Distillation: the recipe schema is defined; the stage itself is not built yet."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DistillConfig(BaseModel):
    """Settings of a distill stage: loss = alpha*T^2*KL(t/T || s/T) + (1-alpha)*CE."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T")
    steps: int = Field(100, gt=0, description="optimizer steps")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
