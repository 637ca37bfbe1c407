"""aim-hf: AiM, the Mamba-based autoregressive image generator, for transformers and diffusers."""

from transformers import AutoConfig, AutoModel

from .configuration_aim import PRESETS, AiMConfig
from .modeling_aim import AiMForImageGeneration, AiMModel, AiMPreTrainedModel
from .pipeline_aim import AiMPipeline

AutoConfig.register("aim", AiMConfig)
AutoModel.register(AiMConfig, AiMForImageGeneration)

__all__ = ["PRESETS", "AiMConfig", "AiMForImageGeneration", "AiMModel", "AiMPipeline", "AiMPreTrainedModel"]
