"""The IADGPT model: Qwen2.5-VL plus layer fusion, exemplar compression, image scores and pixel maps."""

from .checkpoint import PRESETS, ImageOnlyQwen2_5_VLProcessor, init_model, load_model, load_processor
from .compression import compress_exemplar_tokens
from .modeling_iadgpt import (
    ROLE_EXEMPLAR,
    ROLE_OTHER,
    ROLE_QUERY,
    IADGPTForConditionalGeneration,
    IADGPTOutput,
    pixel_anomaly_probability,
)
from .prompts import detection_inputs, few_shot_messages
from .settings import DetectionQuestion, IADGPTSettings

__all__ = [
    "PRESETS", "ImageOnlyQwen2_5_VLProcessor", "init_model", "load_model", "load_processor",
    "compress_exemplar_tokens", "ROLE_EXEMPLAR", "ROLE_OTHER", "ROLE_QUERY", "IADGPTForConditionalGeneration",
    "IADGPTOutput", "pixel_anomaly_probability", "detection_inputs", "few_shot_messages", "DetectionQuestion",
    "IADGPTSettings",
]
