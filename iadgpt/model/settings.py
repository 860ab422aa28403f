"""The IADGPT additions to a Qwen2.5-VL config, stored as `config.iadgpt` in the checkpoint.

A plain Qwen2.5-VL checkpoint (e.g. `Qwen/Qwen2.5-VL-7B-Instruct`) has no such entry; it then gets
the paper's defaults scaled to its depth: four evenly spaced layers, which for the 7B model are the
paper's vision blocks 8/16/24/32 of 32 and LLM layers 7/14/21/28 of 28.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Words whose attention to the query image gives the anomaly channel of the pixel map ...
DEFAULT_ANOMALY_WORDS = ["defect", "defective", "defects", "anomaly", "anomalous", "abnormal", "damaged"]
# ... and the normal channel.
DEFAULT_NORMAL_WORDS = ["normal", "flawless", "good"]


@dataclass
class DetectionQuestion:
    """A yes/no question whose answer scores the query image."""

    text: str = "Is there any defect or anomaly in the query image? Answer Yes or No."
    """The question, asked after the exemplars and the query image."""
    defect_answer: str = "Yes"
    """The answer ("Yes" or "No") that means the query image is defective."""


@dataclass
class IADGPTSettings:
    """What IADGPT adds to Qwen2.5-VL. Layer numbers count from 1, as in the paper."""

    vision_fusion_layers: list[int] | None = None
    """Vision blocks whose outputs are fused (softmax-weighted sum) before the patch merger.
    None: four evenly spaced blocks ending at the last (paper: 8, 16, 24, 32 of 32). []: no fusion."""
    fusion_init_last_weight: float | None = None
    """Initial softmax weight of the last fused block; the others share the rest equally.
    None: equal weights. Close to 1 keeps a pretrained model's behaviour at the start."""
    compress_exemplars: bool = True
    """Drop redundant visual tokens of the normal exemplars (never of the query image)."""
    exemplar_retention: float = 0.2
    """Fraction of each non-reference exemplar's visual tokens kept (paper: 20%). In (0, 1]."""
    in_context_residuals: bool = False
    """Beyond the paper (InCTRLv2's patch-level in-context residuals): add to every query visual
    token a learned embedding of its residual to the nearest normal-exemplar token and of its
    token- and patch-level cosine distances to the nearest exemplar token / patches
    (`iadgpt.model.residuals`), so a defect reaches the language model as a token unlike any
    exemplar's. Starts at zero (a pretrained model's behaviour is unchanged until
    trained); samples without exemplars are left alone."""
    residual_scores: bool = False
    """Beyond the paper (InCTRL adds its residual score to its holistic score): also add the
    residual distances straight to the anomaly scores as learned evidence, in logit space. Image:
    r, linear in the query tokens' largest and mean distances, moves the Yes/No margin by r where
    the detection question is answered (so the score, the score loss and the generated answer use
    it); pixel map: per vision patch, sigmoid(logit(attention map) + r_patch), r_patch linear in the
    patch's and its token's distances (`iadgpt.model.residuals.ResidualEvidence`). Needs
    `in_context_residuals`; learned by the score / language-model loss (image) and the focal + Dice
    loss (map); starts at zero (scores unchanged)."""
    exemplar_shifts: int = 0
    """Beyond the paper (PatchCore's overlapping patches, for a ViT's fixed patch grid): with
    `in_context_residuals`, the normal exemplars are also encoded moved by half a vision patch (3:
    right, down and diagonally; 8: in all eight directions; 0: off), and those patches join the bank
    that each query patch's nearest-exemplar distance is taken over, so a product that sits at
    another offset modulo the patch size does not look anomalous at every patch. The copies are
    encoded without gradients and never enter the prompt: they cost vision-tower forward passes only
    (`iadgpt.model.residuals.shifted_image_pixels`)."""
    query_shifts: int = 0
    """Beyond the paper (PatchCore's overlapping patches, for the map): with `residual_scores`, a query
    whose pixel map is drawn is also encoded moved by half a vision patch (3: right, down and
    diagonally; 0: off), and each half-patch cell of the map gets the mean residual evidence of the
    four patches, one per grid, that cover it. The map's evidence then comes from overlapping
    windows on a half-patch lattice instead of a fixed grid that cuts defects across, and the map
    is twice as fine. The copies are encoded without gradients, only for the map; the image score
    and the language model's input are unchanged (`iadgpt.model.residuals.lattice_evidence`)."""
    map_attention_weight: float = 1.0
    """With `residual_scores`, the weight of the attention map's logit in a map that has residual
    evidence: sigmoid(weight * logit(attention map) + evidence). 1.0 adds the two as they are; 0
    leaves the map of a query with exemplars to the evidence, which compares it with them patch by
    patch on one scale for every image, while the attention map, normalised per image, still draws
    (and is trained on) the maps of queries without exemplars. The quickstart uses 0 (evidence in
    docs/model.md)."""
    image_score_map_weight: float = 0.0
    """Beyond the paper (InCTRLv2 Eq. 9 adds the largest patch residual to its holistic score): the
    inspection's image score fuses the answer's probability p with the largest value m of the
    query's pixel map, in logit space: sigmoid((1 - a) logit(p) + a logit(m)), a this weight in
    [0, 1]. 0 is the paper's score (p alone); 1 scores the image by its worst pixel, as PatchCore
    does. A defect that covers a few patches moves the answer's logit less than it moves its own
    patches' evidence, which the maximum keeps. Applied where the pixel map is drawn
    (`Inspector.inspect`, hence the detection benchmark); training and the generated Yes/No answer
    do not use it. The quickstart uses 0.75 (evidence in docs/model.md)."""
    attention_map_layers: list[int] | None = None
    """LLM layers whose attention gives the pixel map. None: four evenly spaced layers ending at
    the last (paper: 7, 14, 21, 28 of 28)."""
    anomaly_words: list[str] = field(default_factory=lambda: list(DEFAULT_ANOMALY_WORDS))
    """Prompt words whose attention to the query image is the anomaly map."""
    normal_words: list[str] = field(default_factory=lambda: list(DEFAULT_NORMAL_WORDS))
    """Prompt words whose attention to the query image is the normal map. With none in the
    prompt, the normal channel is uniform."""
    pixel_loss_weight: float = 1.0
    """Weight of (focal + Dice) pixel loss added to the language-model loss."""
    score_loss_weight: float = 0.0
    """Weight of an extra cross-entropy over the "Yes"/"No" logits at the first answer token of every
    sample whose answer starts with Yes or No: the image score's own loss. 0 (the paper) leaves the
    decision to the language-model loss, where it is one token among all the answer tokens of the
    batch; a model trained from scratch (the quickstart) learns the decision faster with it."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss."""
    focal_alpha: float | None = None
    """Weight of the anomalous class in the focal loss (None: unweighted)."""
    detection_question: DetectionQuestion = field(default_factory=DetectionQuestion)
    """The question whose Yes/No logits give the image anomaly score."""

    def __post_init__(self):
        if isinstance(self.detection_question, dict):
            self.detection_question = DetectionQuestion(**self.detection_question)
        if not 0.0 < float(self.exemplar_retention) <= 1.0:
            raise ValueError(
                f"exemplar_retention={self.exemplar_retention} is outside (0, 1]: it is the fraction of "
                "exemplar tokens kept (paper: 0.2; 1.0 keeps all)."
            )
        if self.fusion_init_last_weight is not None and not 0.0 < self.fusion_init_last_weight < 1.0:
            raise ValueError(f"fusion_init_last_weight={self.fusion_init_last_weight} must be in (0, 1).")
        if self.detection_question.defect_answer not in ("Yes", "No"):
            raise ValueError(
                f"detection_question.defect_answer={self.detection_question.defect_answer!r}: "
                "allowed are 'Yes' and 'No'."
            )
        if self.residual_scores and not self.in_context_residuals:
            raise ValueError("residual_scores=True adds the in-context residual distances to the scores: it needs "
                             "in_context_residuals=True.")
        if self.exemplar_shifts not in (0, 3, 8):
            raise ValueError(f"exemplar_shifts={self.exemplar_shifts}: allowed are 0 (off), 3 and 8 half-patch shifts.")
        if self.exemplar_shifts and not self.in_context_residuals:
            raise ValueError("exemplar_shifts adds shifted exemplar patches to the in-context residuals' bank: it "
                             "needs in_context_residuals=True.")
        if self.query_shifts not in (0, 3):
            raise ValueError(f"query_shifts={self.query_shifts}: allowed are 0 (off) and 3 half-patch shifts.")
        if self.query_shifts and not self.residual_scores:
            raise ValueError("query_shifts draws the pixel map's residual evidence on a half-patch lattice: it needs "
                             "residual_scores=True.")
        if not 0.0 <= float(self.map_attention_weight):
            raise ValueError(f"map_attention_weight={self.map_attention_weight} is negative: it weighs the attention "
                             "map's logit in the map (1.0: as it is; 0: the residual evidence alone).")
        if not 0.0 <= float(self.image_score_map_weight) <= 1.0:
            raise ValueError(f"image_score_map_weight={self.image_score_map_weight} is outside [0, 1]: it weighs the "
                             "pixel map's maximum against the answer's probability in the image score (0: the "
                             "answer alone, as in the paper).")
        if not self.anomaly_words:
            raise ValueError("anomaly_words is empty: the pixel map needs at least one anomaly word.")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "IADGPTSettings":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown IADGPT settings {unknown}; allowed: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, vision_depth: int, text_depth: int) -> "IADGPTSettings":
        """Fill default layers for this model's depths and check every layer exists."""
        fusion = evenly_spaced_layers(vision_depth) if self.vision_fusion_layers is None else self.vision_fusion_layers
        attention = evenly_spaced_layers(text_depth) if self.attention_map_layers is None else self.attention_map_layers
        check_layers("vision_fusion_layers", fusion, vision_depth, "vision blocks", allow_empty=True)
        check_layers("attention_map_layers", attention, text_depth, "LLM layers", allow_empty=False)
        return dataclasses.replace(self, vision_fusion_layers=list(fusion), attention_map_layers=list(attention))


def evenly_spaced_layers(depth: int, count: int = 4) -> list[int]:
    """`count` layers spaced evenly and ending at the last: 32 -> [8, 16, 24, 32]."""
    return sorted({max(1, round(depth * (i + 1) / count)) for i in range(count)})


def check_layers(name: str, layers: list[int], depth: int, what: str, allow_empty: bool) -> None:
    if not layers and not allow_empty:
        raise ValueError(f"{name} is empty: choose at least one of the model's {depth} {what} (1..{depth}).")
    bad = [layer for layer in layers if not isinstance(layer, int) or not 1 <= layer <= depth]
    if bad:
        raise ValueError(
            f"{name}={list(layers)}: {bad} not in 1..{depth}; this model has {depth} {what}, counted from 1."
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}={list(layers)} repeats a layer.")
