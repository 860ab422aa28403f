"""Data: dataset readers, typed samples and image/mask loading (see readers.py and samples.py)."""

from .readers import (
    DATASET_KINDS,
    REALIAD_DEFECT_NAMES,
    Conversation,
    DatasetReader,
    DetectionItem,
    FolderReader,
    LLaVAConversationReader,
    MetaJsonReader,
    MMADItem,
    MMADReader,
    MultipleChoiceQuestion,
    MVTecReader,
    RealIADReader,
    ReasoningItem,
    Turn,
    VisAReader,
    VisaDRReader,
    open_dataset,
)
from .samples import (
    IMAGE_EXTENSIONS,
    NORMAL_DEFECT_TYPE,
    SPLITS,
    DataError,
    LoadedSample,
    Sample,
    load_image,
    load_mask,
    load_sample,
    resolve_under_root,
)

__all__ = [
    # samples.py
    "DataError", "IMAGE_EXTENSIONS", "LoadedSample", "NORMAL_DEFECT_TYPE", "SPLITS", "Sample", "load_image",
    "load_mask", "load_sample", "resolve_under_root",
    # readers.py
    "DATASET_KINDS", "REALIAD_DEFECT_NAMES", "Conversation", "DatasetReader", "DetectionItem", "FolderReader",
    "LLaVAConversationReader", "MMADItem", "MMADReader", "MVTecReader", "MetaJsonReader", "MultipleChoiceQuestion",
    "RealIADReader", "ReasoningItem", "Turn", "VisAReader", "VisaDRReader", "open_dataset",
]
