"""The IADGPT additions to a Qwen2.5-VL config, stored as `config.iadgpt` in the checkpoint.

A plain Qwen2.5-VL checkpoint (e.g. `Qwen/Qwen2.5-VL-7B-Instruct`) has no such entry; it then gets
the paper's defaults scaled to its depth: four evenly spaced layers, which for the 7B model are the
paper's vision blocks 8/16/24/32 of 32 and LLM layers 7/14/21/28 of 28.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
class ResidualSettings:
    """Beyond the paper: the query compared with the normal exemplars patch by patch (InCTRLv2's
    in-context residuals), as extra evidence for the language model, the scores and the pixel map
    (`iadgpt.model.residuals`). All off by default, which is the paper's model; the quickstart turns
    every one on (what each brings is measured in docs/model.md). The learned parts start at zero,
    so turning them on leaves a pretrained model's outputs unchanged until it is trained."""

    tokens: bool = False
    """Add to every query visual token a learned embedding of its residual to the nearest
    normal-exemplar token and of its token- and patch-level cosine distances to the nearest exemplar
    token / patches, so a defect reaches the language model as a token unlike any exemplar's.
    Samples without exemplars are left alone."""
    scores: bool = False
    """Also add the residual distances straight to the anomaly scores as learned evidence, in logit
    space (InCTRL adds its residual score to its holistic score). Image: r, linear in the query
    tokens' largest and mean distances, moves the Yes/No margin by r where the detection question is
    answered (so the score, the score loss and the generated answer use it). Pixel map: per vision
    patch, sigmoid(logit(attention map) + r_patch), r_patch linear in the patch's and its token's
    distances (`ResidualEvidence`). Learned by the score / language-model loss (image) and the
    focal + Dice loss (map). Needs `tokens`."""
    shifted_exemplars: bool = False
    """Also encode the normal exemplars moved by half a vision patch (right, down and diagonally) and
    add those patches to the bank each query patch's nearest-exemplar distance is taken over
    (PatchCore's overlapping patches, for a ViT's fixed patch grid), so a product that sits at another
    offset modulo the patch size does not look anomalous at every patch. The copies are encoded
    without gradients and never enter the prompt: they cost vision-tower forward passes only.
    Needs `tokens`."""
    shifted_query: bool = False
    """Also encode a query whose pixel map is drawn moved by half a vision patch (right, down and
    diagonally); each half-patch cell of the map gets the mean residual evidence of the four patches,
    one per grid, that cover it. The map's evidence then comes from overlapping windows instead of a
    fixed grid that cuts defects across, and the map is twice as fine. The copies are encoded
    without gradients, only for the map; the image score and the language model's input are
    unchanged (`lattice_evidence`). Needs `scores`."""
    map_attention: bool = True
    """With `scores`, whether the attention map enters the map of a query with exemplars:
    sigmoid(logit(attention map) + evidence) when true, sigmoid(evidence) when false. False leaves
    the map to the residual evidence, which compares the query with the exemplars patch by patch on
    one scale for every image; the attention map, normalised per image, still draws (and is trained
    on) the maps of queries without exemplars."""
    image_score_map_weight: float = 0.0
    """The inspection's image score fuses the answer's probability p with the largest value m of the
    query's pixel map, in logit space: sigmoid((1 - a) logit(p) + a logit(m)), a this weight in
    [0, 1] (InCTRLv2 Eq. 9 adds the largest patch residual to its holistic score; with `scores` the
    map holds the residual evidence). 0 is the paper's score (p alone); 1 scores the image by its
    worst pixel, as PatchCore does. A defect that covers a few patches moves the answer's logit less
    than it moves its own patches' evidence, which the maximum keeps. Applied where the pixel map is
    drawn (`Inspector.inspect`, hence the detection benchmark); training and the generated Yes/No
    answer do not use it."""

    def __post_init__(self):
        for name in ("tokens", "scores", "shifted_exemplars", "shifted_query", "map_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"residuals.{name}={getattr(self, name)!r}: expected true or false.")
        if self.scores and not self.tokens:
            raise ValueError("residuals.scores adds the in-context residual distances to the scores: it needs "
                             "residuals.tokens=true.")
        if self.shifted_exemplars and not self.tokens:
            raise ValueError("residuals.shifted_exemplars adds shifted exemplar patches to the in-context "
                             "residuals' bank: it needs residuals.tokens=true.")
        if self.shifted_query and not self.scores:
            raise ValueError("residuals.shifted_query draws the pixel map's residual evidence on a half-patch "
                             "lattice: it needs residuals.scores=true.")
        if not 0.0 <= float(self.image_score_map_weight) <= 1.0:
            raise ValueError(f"residuals.image_score_map_weight={self.image_score_map_weight} is outside [0, 1]: it "
                             "weighs the pixel map's maximum against the answer's probability in the image score "
                             "(0: the answer alone, as in the paper).")


@dataclass
class IADGPTSettings:
    """What IADGPT adds to Qwen2.5-VL. Layer numbers count from 1, as in the paper.

    The flat settings are the paper's; `residuals` groups what goes beyond it."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {}  # filled below from LEGACY_KEYS, for a config's error

    vision_fusion_layers: list[int] | None = None
    """Vision blocks whose outputs are fused (softmax-weighted sum) before the patch merger.
    None: four evenly spaced blocks ending at the last (paper: 8, 16, 24, 32 of 32). []: no fusion."""
    fusion_init_last_weight: float | None = None
    """Initial softmax weight of the last fused block; the others share the rest equally.
    None: equal weights. Close to 1 keeps a pretrained model's behaviour at the start."""
    exemplar_retention: float = 0.2
    """Fraction of each non-reference exemplar's visual tokens kept (paper: 20%), in (0, 1]: the
    redundant visual tokens of the normal exemplars are dropped (never the query image's).
    1.0 keeps every token (no compression)."""
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
    residuals: ResidualSettings = field(default_factory=ResidualSettings)
    """Beyond the paper: the query compared with the exemplars patch by patch (see ResidualSettings)."""

    def __post_init__(self):
        if isinstance(self.detection_question, dict):
            self.detection_question = DetectionQuestion(**self.detection_question)
        if isinstance(self.residuals, dict):
            self.residuals = ResidualSettings(**self.residuals)
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
        if not self.anomaly_words:
            raise ValueError("anomaly_words is empty: the pixel map needs at least one anomaly word.")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, *overrides: dict[str, Any] | None) -> "IADGPTSettings":
        """Settings from a mapping (a checkpoint's `config.iadgpt`, a config's `iadgpt` section), with
        `overrides` merged over it key by key (a group such as `residuals` is merged, not replaced).
        Mappings in the flat layout of earlier releases are read too (`upgrade_settings_dict`)."""
        values = merge_settings_dicts(values, *overrides)
        _check_keys(cls, values, "")
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


LEGACY_KEYS = {
    "in_context_residuals": "residuals.tokens",
    "residual_scores": "residuals.scores",
    "exemplar_shifts": "residuals.shifted_exemplars",
    "query_shifts": "residuals.shifted_query",
    "map_attention_weight": "residuals.map_attention",
    "image_score_map_weight": "residuals.image_score_map_weight",
    "compress_exemplars": "exemplar_retention",
}
"""Flat settings of earlier releases and where they now live."""
IADGPTSettings.RENAMED_KEYS = {
    **LEGACY_KEYS, "compress_exemplars": "exemplar_retention (1.0 keeps every exemplar token)",
    "exemplar_shifts": "residuals.shifted_exemplars (true for 3 shifts)",
    "query_shifts": "residuals.shifted_query (true for 3 shifts)",
    "map_attention_weight": "residuals.map_attention (true for 1.0, false for 0.0)"}


def _legacy_value(key: str, value: Any) -> Any:
    """An earlier release's value of `key` in its new place's terms; values that were never shipped are refused."""
    allowed = {"exemplar_shifts": {0: False, 3: True}, "query_shifts": {0: False, 3: True},
               "map_attention_weight": {0.0: False, 1.0: True}}.get(key)
    if allowed is None:
        return value
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{key}={value!r} (a setting of earlier releases, now {LEGACY_KEYS[key]}): only "
                         f"{sorted(allowed)} can be read, as {list(allowed.values())}.")
    return allowed[value]


def upgrade_settings_dict(values: dict[str, Any] | None) -> dict[str, Any]:
    """`values` in the current layout. Checkpoints and configs written before the beyond-the-paper
    settings became the `residuals` group keep them flat (`LEGACY_KEYS`); they are moved into the group,
    and `compress_exemplars: false` becomes `exemplar_retention: 1.0` (keep every token)."""
    values = dict(values or {})
    residuals = dict(values.get("residuals") or {})
    for key, new in LEGACY_KEYS.items():
        if key not in values:
            continue
        value = _legacy_value(key, values.pop(key))
        if key == "compress_exemplars":
            if value is False:
                values["exemplar_retention"] = 1.0
        else:
            residuals[new.split(".", 1)[1]] = value
    if residuals or "residuals" in values:
        values["residuals"] = residuals
    return values


def merge_settings_dicts(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """The settings mappings merged left to right, each upgraded first; a nested group (`residuals`,
    `detection_question`) is merged key by key, anything else (lists included) replaced."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in upgrade_settings_dict(layer).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                value = {**merged[key], **value}
            merged[key] = value
    return merged


def _check_keys(cls, values: dict[str, Any], where: str) -> None:
    """Refuse unknown keys by name, in `cls` and its nested setting groups."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"Unknown IADGPT settings {[where + key for key in unknown]}; allowed in "
                         f"{where.rstrip('.') or 'iadgpt'}: {sorted(fields)}.")
    for key, value in values.items():
        nested = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and dataclasses.is_dataclass(nested):
            _check_keys(nested, value, f"{where}{key}.")
