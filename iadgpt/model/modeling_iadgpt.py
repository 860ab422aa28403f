"""IADGPT: Qwen2.5-VL with layer fusion, exemplar compression, Yes/No image scores and attention maps.

`IADGPTForConditionalGeneration` is a `Qwen2_5_VLForConditionalGeneration`: it loads any Qwen2.5-VL
checkpoint (hub name or local folder) and saves to one Hugging Face folder whose `config.json`
carries the IADGPT settings under `iadgpt`. Without compression and pixel maps its forward *is*
Qwen2.5-VL's forward. With them, the prefill runs the same steps (embed, encode images, scatter,
3-D M-RoPE positions on the full sequence) and then runs the language model on the kept tokens
only, which equals the full sequence with the dropped exemplar tokens masked out as keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .attention_maps import REQUEST_KWARG, AttentionMapRecorder, AttentionMapRequest, padded_positions
from .compression import compress_exemplar_tokens
from .fusion import VisualLayerFusion
from .losses import pixel_losses
from .residuals import (
    DISTANCE_FEATURES,
    HALF_PATCH_SHIFTS,
    InContextResidual,
    ResidualEvidence,
    lattice_evidence,
    patch_grid,
    patches_per_token,
    pixels_per_image,
    residual_features,
    shifted_image_pixels,
)
from .settings import IADGPTSettings

# Roles of the images of one sample (argument `image_roles`, one entry per image in the batch).
ROLE_EXEMPLAR = 0  # a normal reference: compressible, the first one of a sample is the reference
ROLE_QUERY = 1  # the image being inspected: never compressed, the pixel map is drawn on it
ROLE_OTHER = 2  # any other image (abnormal reference, stage-2 group member): left as it is


@dataclass
class IADGPTOutput(CausalLMOutputWithPast):
    """Qwen2.5-VL's output plus the IADGPT parts.

    lm_loss / focal_loss / dice_loss / score_loss: the loss parts
        (`loss` = lm + pixel_loss_weight * (focal + dice) + score_loss_weight * score).
    anomaly_maps / normal_maps: per sample, the `[h, w]` mean attention of the anomaly / normal
        words to the query image's tokens (h, w: the query's merged token grid).
    pixel_scores: per sample, `[h, w]` probability that a token is anomalous, from the two maps;
        with the residual evidence (setting `residuals.scores`) `[h * m, w * m]`, per vision patch
        (m: spatial_merge_size).
    residual_logits: `[B]` image-level residual evidence (setting `residuals.scores`; 0 for samples
        without exemplars), already in the Yes/No logits where the detection question is answered
        (half to each, so `image_anomaly_score`, the score loss and generation all use it).
    kept_tokens: `[B, L]` bool, which input tokens the language model saw (None: all).
    """

    lm_loss: torch.Tensor | None = None
    focal_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    score_loss: torch.Tensor | None = None
    anomaly_maps: list[torch.Tensor] | None = None
    normal_maps: list[torch.Tensor] | None = None
    pixel_scores: list[torch.Tensor] | None = None
    residual_logits: torch.Tensor | None = None
    kept_tokens: torch.Tensor | None = None


@dataclass
class IADGPTVisionOutput(BaseModelOutputWithPooling):
    """The vision tower's output with what the in-context residuals need beside the merged tokens, as
    Qwen3-VL's vision output carries its deepstack features. generate() encodes the images before the
    prefill and hands this object back to `forward` (`mm_encoder_outputs`), so these travel with it.

    patches_per_token: per image, `[tokens, unit, C]` the vision patches the merger folds into each
        visual token (the residuals' patch bank and patch distances).
    pixels_per_image: per image, its `pixel_values` rows and `[3]` grid, to encode it shifted by half a
        patch (`residuals.shifted_exemplars` / `shifted_query`); None without those settings.
    """

    patches_per_token: tuple[torch.Tensor, ...] | None = None
    pixels_per_image: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class _EncodedImages:
    """The batch's images as the language model's forward gets them."""

    embeds: list[torch.Tensor] | tuple
    """Per image, its visual tokens `[n, d]`."""
    patches: tuple[torch.Tensor, ...] | None
    """Per image, `[n, unit, C]` each token's vision patches (IADGPTVisionOutput), or None."""
    pixels: list[tuple[torch.Tensor, torch.Tensor]] | None
    """Per image, its pixels and grid, or None (IADGPTVisionOutput)."""
    grid_thw: torch.Tensor | None
    """`[images, 3]` their grids."""


@dataclass
class _Asked:
    """What a call of `forward` asked for beyond Qwen2.5-VL's forward (see its docstring)."""

    image_roles: list[int] | torch.Tensor | None
    compress: bool
    """Compress the exemplars (settings and call agree)."""
    strict_compression: bool
    """The call demanded compression: a sample without exemplars is an error."""
    map_samples: list[bool] | None
    """Per sample, whether its pixel map is drawn; None: no maps."""
    pixel_masks: list | torch.Tensor | None
    anomaly_word_mask: torch.Tensor | None
    normal_word_mask: torch.Tensor | None
    prefix: "ReferencePrefix | None" = None
    """The reference prefix every sample starts with (its cache stands in for its tokens)."""


@dataclass
class _Evidence:
    """The residual evidence of one forward (`residuals.scores`), by global image index of the query images."""

    patch: dict[int, torch.Tensor] = field(default_factory=dict)
    """[n, unit] evidence of each query image's patches."""
    image: dict[int, torch.Tensor] = field(default_factory=dict)
    """Each query image's image evidence."""
    shifted: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    """The patch evidence of each query image's shifted copies (`residuals.shifted_query`)."""
    residual_logits: torch.Tensor | None = None
    """Per sample, the image evidence of its query (0 without one); None without evidence."""


@dataclass
class _TokenLayout:
    """Where things sit in the batch's (uncompressed) token sequence."""

    keep: torch.Tensor
    """[B, L] bool: the tokens the language model runs on (exemplar compression drops the others)."""
    query_mask: torch.Tensor
    """[B, L] bool: the query image's visual tokens of the samples that get a pixel map."""
    query_end: torch.Tensor
    """[B]: where the query image ends (the map's word rows come after it)."""
    query_grid: list[tuple[int, int] | None]
    """Per sample, the query's token grid (h, w), or None without a map."""
    map_evidence: list[torch.Tensor | None]
    """Per sample, the query's residual evidence map, or None."""


@dataclass
class _CompactedPrefix:
    """After a compressed prefill: how to turn generate()'s full-length mask into the cache's."""

    full_length: int
    compact_mask: torch.Tensor

    def decode_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.compact_mask.to(attention_mask), attention_mask[:, self.full_length:]], dim=1)


@dataclass
class ReferencePrefix:
    """A reference set's share of a few-shot prompt, computed once for every query of a product
    (`IADGPTForConditionalGeneration.encode_reference_prefix`): everything before the query image.

    Causal attention makes that part independent of what follows, so its key/value cache serves
    every query; the references' encoded images serve the in-context residuals (their tokens,
    patches and shifted copies) and the M-RoPE positions (their grids), which stay those of the
    full uncompressed sequence.
    """

    input_ids: torch.Tensor
    """`[P]` the prefix's tokens (uncompressed)."""
    mm_token_type_ids: torch.Tensor
    """`[P]` 1 on image tokens."""
    grid_thw: torch.Tensor
    """`[n, 3]` the reference images' grids."""
    roles: list[int]
    """ROLE_EXEMPLAR for the normal references, ROLE_OTHER for abnormal ones."""
    encoded: IADGPTVisionOutput | BaseModelOutputWithPooling
    """The reference images' vision output (pooler_output split per image)."""
    shifted_exemplars: dict[int, torch.Tensor]
    """By reference index: the patches of that exemplar's half-patch-shifted copies
    (`residuals.shifted_exemplars`), for the patch bank."""
    keep: torch.Tensor
    """`[P]` bool: the prefix tokens the language model keeps (exemplar compression)."""
    cache: object
    """The language model's key/value cache of the kept prefix tokens, batch 1 (a transformers Cache)."""

    @property
    def kept_length(self) -> int:
        return int(self.keep.sum())

    def cache_for(self, batch: int):
        """A copy of the cache for a batch of `batch` queries (the stored one stays the prefix's)."""
        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


def word_variants(word: str) -> list[str]:
    """Spellings a word takes in a prompt: as written or capitalised, with or without a leading space."""
    forms = {word, word.capitalize(), word.lower()}
    return sorted({prefix + form for form in forms for prefix in ("", " ")})


def find_word_tokens(input_ids: torch.Tensor, sequences: list[tuple[int, ...]]) -> torch.Tensor:
    """[B, L] bool: the last token of every occurrence of any of the token sequences."""
    found = torch.zeros_like(input_ids, dtype=torch.bool)
    length = input_ids.shape[1]
    for seq in sequences:
        m = len(seq)
        if m == 0 or m > length:
            continue
        windows = input_ids.unfold(1, m, 1)  # [B, L - m + 1, m]
        hit = (windows == torch.tensor(seq, device=input_ids.device)).all(-1)
        found[:, m - 1:] |= hit
    return found


def image_spans(input_ids: torch.Tensor, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per sample, the [start, end) spans of contiguous image-pad tokens, in order."""
    spans = []
    is_image = input_ids == image_token_id
    for row in is_image:
        edges = torch.diff(row.to(torch.int8), prepend=row.new_zeros(1, dtype=torch.int8),
                           append=row.new_zeros(1, dtype=torch.int8))
        starts = torch.nonzero(edges == 1).flatten().tolist()
        ends = torch.nonzero(edges == -1).flatten().tolist()
        spans.append(list(zip(starts, ends)))
    return spans


def default_image_roles(images_per_sample: list[int]) -> list[int]:
    """The last image of a sample is the query; the images before it are its normal exemplars."""
    roles = []
    for n in images_per_sample:
        roles.extend([ROLE_EXEMPLAR] * (n - 1) + [ROLE_QUERY] * (n > 0))
    return roles


def compact_sequences(keep: torch.Tensor, left_padded: bool, tensors: dict[str, torch.Tensor | None],
                      seq_dim: dict[str, int]) -> dict[str, torch.Tensor | None]:
    """Remove the dropped tokens of every row and re-pad rows to the longest kept row.

    The padding keeps the input's side (left for generation, right for training); the filler
    slots are dropped tokens, which the caller masks out of attention and labels.
    """
    width = int(keep.sum(-1).max().item())
    # Stable sort moves kept tokens to the end (left padding) or the front (right padding), in order.
    key = keep.to(torch.int8) if left_padded else (~keep).to(torch.int8)
    order = torch.sort(key, dim=-1, stable=True).indices
    order = order[:, -width:] if left_padded else order[:, :width]
    out = {}
    for name, tensor in tensors.items():
        if tensor is None:
            out[name] = None
            continue
        dim = seq_dim.get(name, 1)
        index = order
        if dim == 2:  # position ids [P, B, L]
            index = order[None].expand(tensor.shape[0], -1, -1)
        elif tensor.dim() == 3:  # embeddings [B, L, D]
            index = order[:, :, None].expand(-1, -1, tensor.shape[2])
        out[name] = torch.gather(tensor, dim, index)
    out["_order"] = order
    return out


def with_text_positions(positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[4, B, L]` position ids for the language model: a text row, then the three M-RoPE rows.

    The M-RoPE rows (`positions[-3:]`: the full sequence's, so a pruned row's kept tokens keep
    their positions) set the rotary embeddings. The text row only says where sequences start:
    transformers reads it to detect packed sequences (flash-attention 2's varlen path without a
    padding mask; masks built without an attention mask), where a jump in the positions starts a
    new sequence; generate() passes the full sequence's there, which jumps where exemplar tokens
    were dropped, and older transformers read the temporal M-RoPE row when there is no text row.
    Counting each row's attended tokens 0, 1, 2, ... (padding 0, as generate() does) keeps a pruned
    row one sequence.
    """
    text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return torch.cat([text[None].to(positions.dtype), positions[-3:]], dim=0)


class IADGPTForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL turned few-shot industrial inspector (see module docstring)."""

    # Released Qwen2.5-VL checkpoints name their weights `model.layers.*` / `visual.*`; transformers
    # renames them on load only for classes it knows, so the subclass registers the same renaming
    # (and saves in the released layout, loadable by any transformers version).

    def __init__(self, config):
        super().__init__(config)
        settings = IADGPTSettings.from_dict(getattr(config, "iadgpt", None)).resolved(
            config.vision_config.depth, config.text_config.num_hidden_layers
        )
        # Saved checkpoints state their layers explicitly, whatever the defaults become.
        config.iadgpt = settings.to_dict()
        self.iadgpt = settings
        if settings.vision_fusion_layers:
            fusion = VisualLayerFusion(settings.vision_fusion_layers, settings.fusion_init_last_weight)
            self.model.visual.layer_fusion = fusion
            fusion.attach(self.model.visual)
        if settings.residuals.tokens:
            self.in_context_residual = InContextResidual(config.text_config.hidden_size)
            # generate() encodes the images and drops image_grid_thw before the prefill, so the
            # encoder output itself carries each visual token's patches to the residuals.
            self.model.visual.register_forward_hook(self._vision_output_with_patches, with_kwargs=True)
        if settings.residuals.scores:
            self.residual_evidence = ResidualEvidence()
        self.attention_map_recorder = AttentionMapRecorder(
            self.model.language_model.layers, settings.attention_map_layers
        )
        self.word_token_ids: dict[str, list[tuple[int, ...]]] | None = None
        self.yes_no_token_ids: tuple[int, int] | None = None
        self.detection_prompt_end_ids: tuple[int, ...] | None = None
        self._compacted_prefix: _CompactedPrefix | None = None

    def _vision_output_with_patches(self, visual, args, kwargs, output):
        """The vision tower's output as an IADGPTVisionOutput: each token's patches, and with the shifted
        settings each image's pixels."""
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid_thw is None or not isinstance(output, BaseModelOutputWithPooling):
            return output
        pixels = None
        if self.iadgpt.residuals.shifted_exemplars or self.iadgpt.residuals.shifted_query:
            pixel_values = kwargs.get("hidden_states", args[0] if args else None)
            pixels = list(zip(pixels_per_image(pixel_values, grid_thw), grid_thw))
        known = {k: v for k, v in output.items() if k in IADGPTVisionOutput.__dataclass_fields__}
        return IADGPTVisionOutput(
            **known, patches_per_token=patches_per_token(output.last_hidden_state, grid_thw, self.config.vision_config),
            pixels_per_image=pixels)

    @torch.no_grad()
    def encode_shifted_copies(self, exemplars: list[tuple[torch.Tensor, torch.Tensor]],
                              queries: list[tuple[torch.Tensor, torch.Tensor]] = ()
                              ) -> tuple[list[torch.Tensor], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Half-patch-shifted copies of images (their `pixel_values` rows and `[3]` grid), in one
        vision-tower call: of the exemplars with `residuals.shifted_exemplars` (returned per exemplar as the
        `[shifts * n, unit, C]` vision patches of all its copies, for the patch bank) and of the
        queries with `residuals.shifted_query` (returned per query as `(tokens [n, d], patches [n, unit, C])`
        per copy, in HALF_PATCH_SHIFTS order, for the map's half-patch lattice).

        In training every forward makes this call (on a tiny blank image when there is nothing to
        shift), so every rank runs the vision tower equally often (ZeRO-3 gathers collectively).
        """
        visual = self.model.visual
        vision = self.config.vision_config
        exemplar_shifts = HALF_PATCH_SHIFTS if self.iadgpt.residuals.shifted_exemplars else ()
        exemplars = list(exemplars) if exemplar_shifts else []
        queries = list(queries) if self.iadgpt.residuals.shifted_query else []
        pieces = [shifted_image_pixels(torch.cat([p for p, _ in images]), torch.stack([g for _, g in images]), vision,
                                       shifts)
                  for images, shifts in ((exemplars, exemplar_shifts), (queries, HALF_PATCH_SHIFTS)) if images]
        if not pieces:
            if self.training:
                merge = vision.spatial_merge_size
                blank = torch.zeros(merge * merge, visual.patch_embed.proj.weight[0].numel(), device=visual.device,
                                    dtype=visual.dtype)
                visual(blank, grid_thw=torch.tensor([[1, merge, merge]], device=visual.device))
            return [], []
        grid_thw = torch.cat([grids for _, grids in pieces])
        encoded = visual(torch.cat([pixels for pixels, _ in pieces]).type(visual.dtype), grid_thw=grid_thw)
        unit = vision.spatial_merge_size ** 2
        tokens = encoded.pooler_output.split((grid_thw.prod(-1) // unit).tolist())
        copies = list(zip(tokens, encoded.patches_per_token))
        per_exemplar, step = len(exemplar_shifts), len(HALF_PATCH_SHIFTS)
        exemplar_copies = [torch.cat([patches for _, patches in copies[i * per_exemplar:(i + 1) * per_exemplar]])
                           for i in range(len(exemplars))]
        first_query = len(exemplars) * per_exemplar
        query_copies = [copies[first_query + i * step:first_query + (i + 1) * step] for i in range(len(queries))]
        return exemplar_copies, query_copies

    @torch.no_grad()
    def encode_reference_prefix(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                                image_grid_thw: torch.Tensor | None = None,
                                mm_token_type_ids: torch.Tensor | None = None,
                                image_roles: list[int] | None = None) -> ReferencePrefix:
        """A prompt's part before the query image, computed once (see ReferencePrefix).

        `input_ids` `[1, P]` (or `[P]`) are the prompt's tokens up to the query image, `pixel_values` /
        `image_grid_thw` the reference images in them; `image_roles` per image ROLE_EXEMPLAR (default)
        or ROLE_OTHER (abnormal references). The prefix runs through the same forward as a whole
        prompt does, so its compression and positions are the whole prompt's.
        """
        if self.training:
            raise ValueError("encode_reference_prefix serves inference: call model.eval() first.")
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if input_ids.shape[0] != 1:
            raise ValueError(f"a reference prefix is one prompt's; got a batch of {input_ids.shape[0]}")
        count = 0 if image_grid_thw is None else int(image_grid_thw.shape[0])
        roles = [ROLE_EXEMPLAR] * count if image_roles is None else [int(r) for r in image_roles]
        if len(roles) != count or ROLE_QUERY in roles:
            raise ValueError(f"{count} reference images need as many roles, exemplar or other (no query): {roles}")
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).to(torch.int32)
        encoded = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True) if count else None
        out = self(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_grid_thw=image_grid_thw,
                   mm_token_type_ids=mm_token_type_ids, image_roles=torch.tensor(roles) if count else None,
                   mm_encoder_outputs={"image": encoded} if count else None, use_cache=True, logits_to_keep=1)
        keep = out.kept_tokens[0] if out.kept_tokens is not None else torch.ones_like(input_ids[0], dtype=torch.bool)
        shifted = {}
        if count and self.iadgpt.residuals.shifted_exemplars:
            exemplars = [i for i, role in enumerate(roles) if role == ROLE_EXEMPLAR]
            copies, _ = self.encode_shifted_copies([encoded.pixels_per_image[i] for i in exemplars])
            shifted = dict(zip(exemplars, copies))
        return ReferencePrefix(input_ids=input_ids[0], mm_token_type_ids=mm_token_type_ids[0],
                               grid_thw=image_grid_thw if count else input_ids.new_zeros(0, 3), roles=roles,
                               encoded=encoded, shifted_exemplars=shifted, keep=keep, cache=out.cache)

    def cache_state(self) -> tuple:
        """What continuing on a kept cache needs besides it, which the forward that filled the cache left
        on the model: the compacted prefix's mask (exemplar compression) and the prompt's rope deltas.
        A caller that runs other prompts in between restores it with `restore_cache_state`."""
        return self._compacted_prefix, self.model.rope_deltas

    def restore_cache_state(self, state: tuple) -> None:
        self._compacted_prefix, self.model.rope_deltas = state

    def forward_on_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> IADGPTOutput:
        """Text tokens `[B, n]` after a kept cache (a decoding step, a conversation's next turn):
        `attention_mask` is the whole sequence's (uncompressed) mask, these tokens included, so their
        positions continue the whole sequence's as generate() continues them (the M-RoPE rows offset
        by the prompt's rope deltas, which the forward that filled the cache left on the model)."""
        text = (attention_mask.long().cumsum(-1) - 1)[:, -input_ids.shape[1]:]
        deltas = self.model.rope_deltas.to(text.device)
        positions = torch.cat([text[None], (text + deltas)[None].expand(3, -1, -1)], dim=0)
        return self(input_ids=input_ids, attention_mask=attention_mask, cache=cache, position_ids=positions,
                    use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def continue_greedy(self, outputs: IADGPTOutput, attention_mask: torch.Tensor, max_new_tokens: int,
                        stop_token_ids: list[int] | None = None, streamer=None) -> torch.Tensor:
        """Greedy answer tokens `[B, n]` after a forward that kept its cache (`use_cache=True`), such as
        the scoring pass: the first from its last logits, each next one from a one-token step on the
        cache (`forward_on_cache`), so the prompt is never run again. `attention_mask` is that forward's
        whole (uncompressed) mask. A sample that reached a stop token (default: the generation
        config's EOS) is padded with it from then on. `streamer` (a transformers streamer, one
        sample) gets each token as it comes. The last token is not fed: the cache ends before it.
        """
        stop = stop_token_ids if stop_token_ids is not None else self.generation_config.eos_token_id
        stop = torch.tensor([stop] if isinstance(stop, int) else list(stop or []), device=attention_mask.device)
        cache, mask = outputs.cache, attention_mask
        token = outputs.logits[:, -1].argmax(-1)
        finished = torch.zeros_like(token, dtype=torch.bool)
        tokens = []
        for step in range(max_new_tokens):
            token = torch.where(finished, tokens[-1] if tokens else token, token)
            tokens.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            finished |= torch.isin(token, stop)
            if finished.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            token = self.forward_on_cache(token[:, None], mask, cache).logits[:, -1].argmax(-1)
        if streamer is not None:
            streamer.end()
        return torch.stack(tokens, dim=1)

    def _after_prefix(self, prefix: ReferencePrefix, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None,
                      queries: _EncodedImages):
        """The whole prompts of a batch whose samples are `prefix` then their own `input_ids` (one query
        image each): (input ids, attention mask, mm token types, the encoded images in prompt order,
        the image roles)."""
        batch = input_ids.shape[0]
        if len(queries.embeds) != batch:
            raise ValueError(f"After a reference prefix every sample holds one query image: {len(queries.embeds)} "
                             f"images for {batch} samples.")
        device = input_ids.device
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).to(torch.int32)
        full_ids = torch.cat([prefix.input_ids.to(device)[None].expand(batch, -1), input_ids], dim=1)
        full_types = torch.cat([prefix.mm_token_type_ids.to(device)[None].expand(batch, -1),
                                mm_token_type_ids.to(prefix.mm_token_type_ids.dtype)], dim=1)
        references = prefix.encoded
        own = {"embeds": list(references.pooler_output) if references is not None else [],
               "patches": getattr(references, "patches_per_token", None) if references is not None else [],
               "pixels": getattr(references, "pixels_per_image", None) if references is not None else []}

        def joined(name, per_query):
            if per_query is None or own[name] is None:
                return None
            return [item for b in range(batch) for item in (*own[name], per_query[b])]

        images = _EncodedImages(
            embeds=joined("embeds", list(queries.embeds)), patches=joined("patches", queries.patches),
            pixels=joined("pixels", queries.pixels),
            grid_thw=torch.cat([torch.cat([prefix.grid_thw.to(device), queries.grid_thw[b:b + 1]])
                                for b in range(batch)]))
        roles = torch.tensor([*prefix.roles, ROLE_QUERY] * batch)
        return full_ids, torch.ones_like(full_ids), full_types, images, roles

    @torch.no_grad()
    def initialize_weights(self):
        # transformers initialises the vision tower's modules with the tower's own `_init_weights`,
        # which knows nothing of the fusion weights: initialise them here when the checkpoint
        # (e.g. a released Qwen2.5-VL) does not hold them.
        fusion = getattr(self.model.visual, "layer_fusion", None)
        if fusion is not None and not getattr(fusion, "_is_hf_initialized", False):
            init.copy_(fusion.logits, fusion.initial_logits())
            fusion._is_hf_initialized = True
        residual = getattr(self, "in_context_residual", None)
        if residual is not None and not getattr(residual, "_is_hf_initialized", False):
            # Zero: the residual embeddings add nothing until training has learned them.
            init.zeros_(residual.residual_weight)
            init.zeros_(residual.distance_embedding)
            residual._is_hf_initialized = True
        evidence = getattr(self, "residual_evidence", None)
        if evidence is not None and not getattr(evidence, "_is_hf_initialized", False):
            for weight in evidence.parameters():  # zero: the scores start as without evidence
                init.zeros_(weight)
            evidence._is_hf_initialized = True
        super().initialize_weights()

    # -- words ----------------------------------------------------------------------------------
    def configure_words(self, tokenizer) -> None:
        """Learn this tokenizer's ids for the anomaly / normal words and for "Yes" / "No"."""
        def sequences(words):
            seqs = {tuple(tokenizer.encode(v, add_special_tokens=False)) for w in words for v in word_variants(w)}
            return sorted(s for s in seqs if s)

        self.word_token_ids = {"anomaly": sequences(self.iadgpt.anomaly_words),
                               "normal": sequences(self.iadgpt.normal_words)}
        ids = []
        for answer in ("Yes", "No"):
            encoded = tokenizer.encode(answer, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"The tokenizer splits {answer!r} into {len(encoded)} tokens; the image score "
                                 "needs it to be a single token.")
            ids.append(encoded[0])
        self.yes_no_token_ids = (ids[0], ids[1])
        # How a prompt asking the detection question ends (Qwen's chat template). Its first token is
        # left out: it may merge differently with the text before it.
        ending = self.iadgpt.detection_question.text + "<|im_end|>\n<|im_start|>assistant\n"
        self.detection_prompt_end_ids = tuple(tokenizer.encode(ending, add_special_tokens=False)[1:])

    def image_anomaly_score(self, answer_logits: torch.Tensor,
                            pixel_scores: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Probability of the answer that means "defective", from the Yes/No logits (Eq. 4); with
        `residuals.image_score_map_weight` a > 0, fused with each map's largest value m (InCTRLv2 Eq. 9):
        sigmoid((1 - a) logit(p) + a logit(m)).

        `answer_logits`: `[B, V]` logits at the answer position (with `residuals.scores`, they already
        hold the residual evidence: see `IADGPTOutput.residual_logits`). `pixel_scores`: the
        forward's `pixel_scores` (called with `pixel_maps=True`), needed when a > 0.
        """
        if self.yes_no_token_ids is None:
            raise RuntimeError("Call model.configure_words(tokenizer) (or load with iadgpt.load_model) first.")
        yes, no = self.yes_no_token_ids
        probs = answer_logits[:, [yes, no]].float().softmax(-1)
        answer = probs[:, 0] if self.iadgpt.detection_question.defect_answer == "Yes" else probs[:, 1]
        weight = float(self.iadgpt.residuals.image_score_map_weight)
        if weight == 0.0:
            return answer
        if pixel_scores is None or len(pixel_scores) != len(answer) or any(m is None for m in pixel_scores):
            raise ValueError(f"residuals.image_score_map_weight={weight} fuses the image score with the pixel map's maximum: "
                             "call the model with pixel_maps=True and pass its pixel_scores, one map per sample.")
        peak = torch.stack([m.float().amax() for m in pixel_scores]).to(answer.device)
        # eps: a saturated probability (exactly 0 or 1 in float32) must not give an infinite logit.
        return torch.sigmoid((1 - weight) * torch.logit(answer, eps=1e-6) + weight * torch.logit(peak, eps=1e-6))

    def _yes_no_answers(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, positions predicting their first answer token, those tokens), for the samples whose
        answer starts with "Yes" or "No"."""
        if self.yes_no_token_ids is None:
            raise RuntimeError("Call model.configure_words(tokenizer) (or load with iadgpt.load_model) first.")
        yes, no = self.yes_no_token_ids
        answered = labels != -100
        first = answered.int().argmax(1)
        rows = torch.arange(labels.shape[0], device=labels.device)
        token = labels[rows, first]
        usable = answered.any(1) & (first > 0) & ((token == yes) | (token == no))
        return rows[usable], first[usable] - 1, token[usable]

    def answer_score_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the ("Yes", "No") logit pair that predicts each sample's first answer
        token, over the samples whose first answer token is "Yes" or "No" (0 when there are none).

        `logits`: `[B, L, V]` for every position; `labels`: `[B, L]`, -100 outside the answers.
        """
        if logits.shape[1] != labels.shape[1]:
            raise ValueError("the score loss needs the logits of every position (logits_to_keep=0)")
        rows, positions, token = self._yes_no_answers(labels)
        if not len(rows):
            return logits[:, :1, :1].sum() * 0.0  # keeps the graph whole for every rank
        yes, no = self.yes_no_token_ids
        pair = logits[rows, positions][:, [yes, no]].float()
        return torch.nn.functional.cross_entropy(pair, (token == no).long())

    def _add_evidence_at_the_answer(self, logits: torch.Tensor, labels: torch.Tensor | None,
                                    input_ids: torch.Tensor, residual_logits: torch.Tensor) -> None:
        """Add the image evidence r where the detection question is answered, in place: r / 2 to the
        defect answer's logit and -r / 2 to the other's (their margin moves by r, and strong evidence
        either way picks that answer). With labels, at the position predicting each answer that
        starts with Yes or No; without (scoring, generation), at the last position of the prompts
        that end with the model's detection question. So the score, the score loss and the generated
        Yes/No agree."""
        yes, no = self.yes_no_token_ids
        defect, other = (yes, no) if self.iadgpt.detection_question.defect_answer == "Yes" else (no, yes)
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                return
            rows, positions, _ = self._yes_no_answers(labels)
        else:
            rows = self._asks_the_detection_question(input_ids).nonzero().flatten()
            positions = torch.full_like(rows, logits.shape[1] - 1)
        if len(rows):
            half = residual_logits[rows].to(logits.dtype) / 2
            for column, sign in ((defect, 1), (other, -1)):
                logits.index_put_((rows, positions, torch.full_like(rows, column)), sign * half, accumulate=True)

    def _asks_the_detection_question(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B]` whether each (left-padded) prompt ends with the detection question and the answer's start."""
        end = self.detection_prompt_end_ids
        if end is None:
            raise RuntimeError("Call model.configure_words(tokenizer) (or load with iadgpt.load_model) first.")
        if input_ids.shape[1] < len(end):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return (input_ids[:, -len(end):] == torch.tensor(end, device=input_ids.device)).all(1)

    # -- forward --------------------------------------------------------------------------------
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as Qwen2.5-VL's own forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None,
                logits_to_keep=0, mm_encoder_outputs=None, image_roles=None, compress_exemplars=None,
                pixel_maps=None, pixel_masks=None, anomaly_word_mask=None, normal_word_mask=None,
                dummy_pixel_values=None, dummy_image_grid_thw=None, reference_prefix=None, **kwargs):
        """Qwen2.5-VL's forward, plus:

        image_roles: `[num_images]` ROLE_EXEMPLAR / ROLE_QUERY / ROLE_OTHER per image in batch order
            (default: per sample, the last image is the query and the earlier ones are exemplars).
        compress_exemplars: None follows the settings (compression when `exemplar_retention` < 1; samples
            without exemplars are left alone); True requires every sample with images to have
            exemplars; False keeps every exemplar token for this call.
        pixel_maps: True computes the attention maps of every sample (each needs one query image
            and an anomaly word after it); default: those of the samples with a `pixel_masks` entry.
        pixel_masks: per sample an `[H, W]` 0/1 defect mask or None (no map and no pixel loss for
            that sample); a `[B, H, W]` tensor means every sample has one.
        dummy_pixel_values / dummy_image_grid_thw: in training, a batch without images runs the vision
            tower on this dummy image, times zero, so every rank runs the same modules (ZeRO-3 would hang).

        In training (`model.train()`) every batch runs the same modules in the same order and gives
        every trainable parameter a gradient, whatever its samples: see the comment on `uniform`.
        anomaly_word_mask / normal_word_mask: `[B, L]` bool word positions (default: found in
            `input_ids` from the configured words).
        reference_prefix: a `ReferencePrefix` (`encode_reference_prefix`) every sample starts with; then
            `input_ids` / `pixel_values` / `image_grid_thw` / `mm_token_type_ids` are only what follows
            it (the query image and the question, unpadded), and the outputs are those of the whole
            prompt, computed from the prefix's cache. Inference only.
        """
        if reference_prefix is not None:
            if self.training or labels is not None or pixel_masks is not None:
                raise ValueError("reference_prefix serves inference: no training, labels or pixel_masks with it.")
            if attention_mask is not None and not attention_mask.bool().all():
                raise ValueError("After a reference prefix every sample's part must have the same length (no "
                                 "padding): batch queries of the same image size together.")
            if image_roles is not None or mm_encoder_outputs is not None or cache is not None:
                raise ValueError("image_roles, mm_encoder_outputs and cache come from the reference prefix.")
        cached = cache is not None and cache.get_seq_length() > 0
        if cached:
            if self._compacted_prefix is not None and attention_mask is not None:
                attention_mask = self._compacted_prefix.decode_mask(attention_mask)
        else:
            self._compacted_prefix = None
        compress = compress_exemplars is not False and self.iadgpt.exemplar_retention < 1.0
        if pixel_maps is None:
            map_samples = [m is not None for m in pixel_masks] if pixel_masks is not None else []
        else:
            map_samples = [bool(pixel_maps)] * (input_ids.shape[0] if input_ids is not None else 1)
        want_maps = any(map_samples)
        # generate() encodes the images before the prefill and passes them as `mm_encoder_outputs`.
        encoded_images = (mm_encoder_outputs or {}).get("image")
        has_images = pixel_values is not None or encoded_images is not None
        residuals = self.iadgpt.residuals.tokens
        # In training every batch takes the same path through the same modules in the same order,
        # whatever its samples (caption, odd-one-out, detection with or without a mask, text only):
        # under ZeRO-3 every module call gathers its weights collectively and every gradient is
        # reduced in order, so a rank whose batch took another path would wait forever on the others.
        uniform = self.training and not cached and input_ids is not None
        if not uniform and reference_prefix is None and (cached or not has_images or input_ids is None
                                                          or not (compress or want_maps or residuals)):
            if want_maps and not cached:
                raise ValueError("Pixel maps need `input_ids` and `pixel_values` (a query image).")
            out = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
                second_per_grid_ts=second_per_grid_ts, logits_to_keep=logits_to_keep,
                mm_encoder_outputs=mm_encoder_outputs, **kwargs)
            # Only the fields IADGPTOutput knows: newer transformers add their own (e.g. image_outputs).
            result = IADGPTOutput(**{k: v for k, v in out.items() if k in IADGPTOutput.__dataclass_fields__},
                                  lm_loss=out.loss)
            if labels is not None and self.iadgpt.score_loss_weight > 0:
                result.score_loss = self.answer_score_loss(result.logits, labels)
                result.loss = result.loss + self.iadgpt.score_loss_weight * result.score_loss
            return result
        if pixel_values_videos is not None or (mm_encoder_outputs or {}).get("video") is not None:
            raise ValueError("Exemplar compression, in-context residuals and pixel maps work on images; videos are "
                             "not supported together with them (pass compress_exemplars=False, pixel_maps=False "
                             "and load with residuals.tokens=false).")
        if want_maps and not has_images:
            raise ValueError("Pixel maps need `input_ids` and `pixel_values` (a query image).")
        unused: list[torch.Tensor] = []  # outputs of modules this batch ran only to keep the ranks in step
        if encoded_images is None and pixel_values is not None:
            encoded_images = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        elif encoded_images is None and dummy_pixel_values is not None:
            # A batch without images runs the vision tower on the collator's dummy image (times zero).
            dummy = self.model.get_image_features(dummy_pixel_values, dummy_image_grid_thw, return_dict=True)
            unused.extend(dummy.pooler_output)
        images = _EncodedImages(
            embeds=encoded_images.pooler_output if encoded_images is not None else (),
            patches=getattr(encoded_images, "patches_per_token", None),
            pixels=getattr(encoded_images, "pixels_per_image", None), grid_thw=image_grid_thw)
        if reference_prefix is not None:
            input_ids, attention_mask, mm_token_type_ids, images, image_roles = self._after_prefix(
                reference_prefix, input_ids, mm_token_type_ids, images)
        asked = _Asked(image_roles=image_roles, compress=compress, strict_compression=compress_exemplars is True,
                       map_samples=map_samples if want_maps else None, pixel_masks=pixel_masks,
                       anomaly_word_mask=anomaly_word_mask, normal_word_mask=normal_word_mask,
                       prefix=reference_prefix)
        return self._inspect_forward(input_ids, attention_mask, position_ids, cache, labels, use_cache,
                                     mm_token_type_ids, logits_to_keep, images, asked, unused, **kwargs)

    def _inspect_forward(self, input_ids, attention_mask, position_ids, cache, labels, use_cache,
                         mm_token_type_ids, logits_to_keep, images: _EncodedImages, asked: _Asked,
                         unused: list[torch.Tensor], **kwargs):
        """The forward of `forward`'s docstring with the images already encoded. `unused` collects outputs
        of modules that ran only so that every rank runs the same ones (training): they join the loss
        times zero, so their backward runs too."""
        cfg = self.config
        image_embeds, image_grid_thw, map_samples = images.embeds, images.grid_thw, asked.map_samples
        want_maps = map_samples is not None
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # 1. Which image of which sample plays which role.
        spans = image_spans(input_ids, cfg.image_token_id)
        counts = [len(s) for s in spans]
        if sum(counts) != len(image_embeds):
            raise ValueError(f"The prompts hold {sum(counts)} images but {len(image_embeds)} were encoded.")
        roles = default_image_roles(counts) if asked.image_roles is None else [int(r) for r in asked.image_roles]
        if len(roles) != len(image_embeds):
            raise ValueError(f"image_roles has {len(roles)} entries for {len(image_embeds)} images.")
        evidence = _Evidence()
        if self.iadgpt.residuals.tokens:
            known_copies = {}
            if asked.prefix is not None:  # the references' shifted copies were encoded with the prefix
                per_sample = len(asked.prefix.roles) + 1
                known_copies = {b * per_sample + i: copies for b in range(batch)
                                for i, copies in asked.prefix.shifted_exemplars.items()}
            image_embeds, distances, shifted_distances = self._add_in_context_residuals(
                list(image_embeds), counts, roles, images.patches, images.pixels, map_samples, unused, known_copies)
            if self.iadgpt.residuals.scores:
                evidence = self._residual_evidence(distances, shifted_distances, batch, unused)

        # 2. Embed the text and scatter the images into it, exactly as Qwen2.5-VL does.
        inputs_embeds = self._embed_with_images(input_ids, image_embeds)

        # 3. 3-D M-RoPE positions on the full sequence: pruning must not renumber them.
        if position_ids is None:
            position_ids = self._mrope_positions(input_ids, attention_mask, image_grid_thw, mm_token_type_ids,
                                                 bool(len(image_embeds)))

        # 4. Which tokens the language model keeps (compression), where the query image sits (maps).
        layout = self._token_layout(input_ids, spans, roles, image_embeds, image_grid_thw, asked.compress,
                                    asked.strict_compression, map_samples, evidence)
        residual_logits = evidence.residual_logits

        # 5. Word rows for the pixel maps: prompt words after the query image (they can attend to it).
        rows = (None, None)
        if want_maps:
            rows = self._word_rows(input_ids, labels, layout.query_end, asked.anomaly_word_mask,
                                   asked.normal_word_mask, map_samples)

        # 6. Run the language model on the kept tokens only, the map layers recording the word rows.
        embeds, positions, attn, lab, query_mask, rows = self._compact(
            layout.keep, inputs_embeds, position_ids, attention_mask, labels, layout.query_mask, rows, use_cache)
        kept_tokens = None if layout.keep.all() else layout.keep
        request = self._map_request(rows, query_mask, attn) if want_maps else None
        positions = with_text_positions(positions, attn)
        if asked.prefix is not None:
            # The prefix's kept tokens are in its cache: run only what follows. Rows, columns and the
            # key mask of the map stay in the whole sequence's coordinates (see AttentionMapRequest).
            start = asked.prefix.kept_length
            if not torch.equal(layout.keep[:, :len(asked.prefix.keep)].cpu(),
                               asked.prefix.keep.cpu()[None].expand(batch, -1)):
                raise RuntimeError("The reference prefix was compressed differently from this forward's prefix.")
            embeds, positions, cache = embeds[:, start:], positions[..., start:], asked.prefix.cache_for(batch)
            if request is not None:
                request.key_offset = start
        if request is None and self.training:
            # No map asked for: the map layers still compute one attention row (times zero in the loss).
            first = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)
            request = AttentionMapRequest(row_index=first, row_valid=first.bool(), row_is_anomaly=first.bool(),
                                          col_index=first, key_padding=attn.bool())
        # The request rides along as a keyword argument: see AttentionMapRecorder (gradient checkpointing).
        outputs = self.model.language_model(
            inputs_embeds=embeds, attention_mask=attn, position_ids=positions,
            cache=cache, use_cache=use_cache, **{REQUEST_KWARG: request}, **kwargs)
        if request is not None and not want_maps:
            unused.extend(channel for n in self.iadgpt.attention_map_layers for channel in request.maps[n])

        hidden = outputs.last_hidden_state
        slice_ = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_, :])

        if residual_logits is not None:
            self._add_evidence_at_the_answer(logits, lab, input_ids, residual_logits)
        lm_loss = None
        if lab is not None:
            lm_loss = self.loss_function(logits=logits, labels=lab, vocab_size=cfg.text_config.vocab_size, **kwargs)
        result = IADGPTOutput(logits=logits, cache=outputs.cache, lm_loss=lm_loss,
                              loss=lm_loss, kept_tokens=kept_tokens, residual_logits=residual_logits)
        if lab is not None and self.iadgpt.score_loss_weight > 0:
            result.score_loss = self.answer_score_loss(logits, lab)
            result.loss = result.loss + self.iadgpt.score_loss_weight * result.score_loss
        if want_maps:
            self._attach_maps(result, request, layout.query_grid, asked.pixel_masks, layout.map_evidence)
        if evidence.patch and result.loss is not None:
            # Evidence a loss did not use (no map, or no score loss) still joins the graph: DDP and
            # ZeRO expect every parameter of a forward to get a gradient.
            result.loss = result.loss + 0.0 * (residual_logits.sum() + sum(t.sum() for t in evidence.patch.values()))
        if unused and result.loss is not None:
            result.loss = result.loss + 0.0 * sum(t.float().sum() for t in unused)
        return result

    def _compact(self, keep, inputs_embeds, position_ids, attention_mask, labels, query_mask, rows, use_cache):
        """The sequences without the tokens compression dropped (`keep`), positions unchanged: embeddings,
        M-RoPE positions, attention mask, labels, the query mask and the map's (anomaly, normal) word
        rows. Remembers the compacted prefix for generation."""
        attn = attention_mask * keep
        if keep.all():
            return inputs_embeds, position_ids, attn, labels, query_mask, rows
        anomaly_rows, normal_rows = rows
        seq = compact_sequences(
            keep, bool(attention_mask[:, -1].all()),
            {"embeds": inputs_embeds, "positions": position_ids, "attn": attn, "labels": labels, "query": query_mask,
             "anomaly": anomaly_rows, "normal": normal_rows},
            {"positions": 2})
        lab = seq["labels"]
        if lab is not None:
            lab = lab.masked_fill(seq["attn"] == 0, -100)
        if use_cache is not False:
            self._compacted_prefix = _CompactedPrefix(full_length=keep.shape[1], compact_mask=seq["attn"].detach())
        return seq["embeds"], seq["positions"], seq["attn"], lab, seq["query"], (seq["anomaly"], seq["normal"])

    @staticmethod
    def _map_request(rows, query_mask, attn) -> AttentionMapRequest:
        """What the map layers record: each sample's word rows (anomaly or normal) attending to its
        query image's tokens."""
        anomaly_rows, normal_rows = rows
        row_index, row_valid = padded_positions(anomaly_rows | normal_rows)
        col_index, _ = padded_positions(query_mask)
        return AttentionMapRequest(row_index=row_index, row_valid=row_valid,
                                   row_is_anomaly=torch.gather(anomaly_rows, 1, row_index), col_index=col_index,
                                   key_padding=attn.bool())

    def _token_layout(self, input_ids, spans, roles, image_embeds, image_grid_thw, compress: bool,
                      strict_compression: bool, map_samples, evidence: "_Evidence") -> "_TokenLayout":
        """Per sample: the tokens the language model keeps (exemplar compression), where the query
        image sits and its token grid (pixel maps), the query's evidence map; and each sample's image
        evidence, taken from its (last) query image, into `evidence.residual_logits`."""
        cfg = self.config
        batch, length = input_ids.shape
        want_maps = map_samples is not None
        layout = _TokenLayout(
            keep=torch.ones(batch, length, dtype=torch.bool, device=input_ids.device),
            query_mask=torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device),
            query_end=torch.zeros(batch, dtype=torch.long, device=input_ids.device),
            query_grid=[], map_evidence=[None] * batch)
        merge = cfg.vision_config.spatial_merge_size
        image_index = 0
        for b, sample_spans in enumerate(spans):
            sample_roles = roles[image_index:image_index + len(sample_spans)]
            globals_ = list(range(image_index, image_index + len(sample_spans)))
            image_index += len(sample_spans)
            exemplars = [(g, s) for g, s, r in zip(globals_, sample_spans, sample_roles) if r == ROLE_EXEMPLAR]
            queries = [(g, s) for g, s, r in zip(globals_, sample_spans, sample_roles) if r == ROLE_QUERY]
            scored = [g for g, _ in queries if g in evidence.image]
            if scored:  # a sample's evidence is that of its (last) query image
                evidence.residual_logits[b] = evidence.image[scored[-1]]
            if compress and exemplars:
                kept = compress_exemplar_tokens([image_embeds[g] for g, _ in exemplars], self.iadgpt.exemplar_retention)
                for (_, (start, end)), mask in zip(exemplars, kept):
                    layout.keep[b, start:end] = mask
            elif compress and strict_compression and sample_spans:
                raise ValueError(
                    f"Sample {b} has no normal exemplar image before its query image, but exemplar "
                    "compression was requested (compress_exemplars=True). Add exemplars or pass False.")
            if want_maps and not map_samples[b]:
                layout.query_grid.append(None)
            elif want_maps:
                if image_grid_thw is None:
                    raise ValueError("Pixel maps need image_grid_thw to know the query image's token grid.")
                if len(queries) != 1:
                    raise ValueError(f"Sample {b} has {len(queries)} query images; pixel maps need exactly one.")
                g, (start, end) = queries[0]
                layout.query_mask[b, start:end] = True
                layout.query_end[b] = end
                _, h, w = image_grid_thw[g].tolist()
                layout.query_grid.append((h // merge, w // merge))
                if g in evidence.patch:
                    layout.map_evidence[b] = self._evidence_map(evidence.patch[g], evidence.shifted.get(g), h // merge,
                                                                w // merge)
        return layout

    def _residual_evidence(self, distances, shifted_distances, batch: int, unused: list) -> "_Evidence":
        """The residual evidence (`residuals.scores`) of the query images with exemplars and of their
        shifted copies, in one call (see ResidualEvidence). Without such a query, training still runs
        the module on nothing, so that every rank runs it."""
        if distances:
            copies = [copy for g in shifted_distances for copy in shifted_distances[g]]
            per_patch, per_image = self.residual_evidence(*map(list, zip(*distances.values(), *copies)))
            copy_evidence = iter(per_patch[len(distances):])
            return _Evidence(
                patch=dict(zip(distances, per_patch)),
                image=dict(zip(distances, per_image)),  # the copies' image evidence is not used
                shifted={g: [next(copy_evidence) for _ in HALF_PATCH_SHIFTS] for g in shifted_distances},
                residual_logits=per_image.new_zeros(batch))  # per sample: filled in by _token_layout
        if self.training:
            nothing = self.residual_evidence.image_weight.new_zeros(1, len(DISTANCE_FEATURES))
            per_patch, per_image = self.residual_evidence([nothing], [nothing.new_zeros(1, 1)])
            unused.extend([*per_patch, per_image])
        return _Evidence()

    def _embed_with_images(self, input_ids, image_embeds) -> torch.Tensor:
        """Token embeddings with the images' visual tokens scattered in, as Qwen2.5-VL does."""
        inputs_embeds = self.model.get_input_embeddings()(input_ids)
        if len(image_embeds):
            flat_embeds = torch.cat(image_embeds, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = self.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                            image_features=flat_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, flat_embeds)
        return inputs_embeds

    def _mrope_positions(self, input_ids, attention_mask, image_grid_thw, mm_token_type_ids,
                         has_images: bool) -> torch.Tensor:
        """Qwen2.5-VL's 3-D M-RoPE positions of the full (uncompressed) sequence; remembers the rope
        deltas generation continues from."""
        if image_grid_thw is None and has_images:
            raise ValueError("image_grid_thw is needed to compute the M-RoPE positions of the images.")
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).to(torch.int32)
        position_ids, rope_deltas = self.model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        self.model.rope_deltas = rope_deltas
        return position_ids

    def _evidence_map(self, evidence: torch.Tensor, shifted: list[torch.Tensor] | None, height: int,
                      width: int) -> torch.Tensor:
        """The map's residual evidence from a query's `[n, unit]` per-patch evidence: on its patch grid
        `[height * m, width * m]`, or with its shifted copies' (`residuals.shifted_query`) on the half-patch
        lattice `[2 height m, 2 width m]`."""
        merge = self.config.vision_config.spatial_merge_size
        grid = patch_grid(evidence.float(), height, width, merge)
        if shifted is None:
            return grid
        grids = {(0, 0): grid}
        grids.update({shift: patch_grid(copy.float(), height, width, merge) for shift, copy in zip(HALF_PATCH_SHIFTS, shifted)})
        return lattice_evidence(grids)

    def _add_in_context_residuals(self, image_embeds: list[torch.Tensor], counts: list[int],
                                  roles: list[int], image_patches: list[torch.Tensor] | None,
                                  image_pixels: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                                  map_samples: list[bool] | None = None, unused: list[torch.Tensor] | None = None,
                                  known_copies: dict[int, torch.Tensor] | None = None):
        """Each query image's tokens plus their residual embeddings against all exemplar tokens and
        patches of its sample (`iadgpt.model.residuals`; with `residuals.shifted_exemplars`, the patch bank also
        holds the exemplars' shifted patches); samples without exemplars are left as they are.

        Returns (the image embeddings; by query image index, the `[n, 3]` distances and `[n, unit]`
        patch distances of each query image that had exemplars; with `residuals.shifted_query`, by the index of
        each such query whose sample's map is drawn (`map_samples`), the same for its shifted copies,
        in HALF_PATCH_SHIFTS order). In training, a batch without such a query runs the residual module on
        nothing and puts its output in `unused` (see `_inspect_forward`).
        """
        starts = [sum(counts[:i]) for i in range(len(counts))]
        samples = [range(start, start + count) for start, count in zip(starts, counts)]
        used = [b for b, m in enumerate(samples)
                if any(roles[g] == ROLE_EXEMPLAR for g in m) and any(roles[g] == ROLE_QUERY for g in m)]
        exemplar_copies: dict[int, torch.Tensor] = {}
        query_copies: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if self.iadgpt.residuals.shifted_exemplars or self.iadgpt.residuals.shifted_query:
            known_copies = known_copies or {}
            exemplars = [g for b in used for g in samples[b] if roles[g] == ROLE_EXEMPLAR and g not in known_copies]
            exemplars = exemplars if self.iadgpt.residuals.shifted_exemplars else []
            queries = [g for b in used if map_samples is not None and map_samples[b]
                       for g in samples[b] if roles[g] == ROLE_QUERY] if self.iadgpt.residuals.shifted_query else []
            if (exemplars or queries) and (image_pixels is None or len(image_pixels) != len(image_embeds)):
                raise ValueError("residuals.shifted_exemplars / shifted_query need the images' pixels, which this "
                                 "model's image encoder adds to its output (`pixels_per_image`): pass pixel_values, or "
                                 "mm_encoder_outputs straight from model.get_image_features(..., return_dict=True) "
                                 "of these images.")
            shifted_exemplars, shifted_queries = self.encode_shifted_copies([image_pixels[g] for g in exemplars],
                                                                            [image_pixels[g] for g in queries])
            exemplar_copies = {**known_copies, **dict(zip(exemplars, shifted_exemplars))}
            query_copies = dict(zip(queries, shifted_queries))
        if not used:
            if self.training and unused is not None:
                residual = self.in_context_residual
                unused.append(residual(residual.residual_weight.new_zeros(1, residual.residual_weight.shape[1]),
                                       residual.distance_embedding.new_zeros(1, len(DISTANCE_FEATURES))))
            return image_embeds, {}, {}
        patches = image_patches
        if patches is None or len(patches) != len(image_embeds):
            raise ValueError("In-context residuals need each image's vision patches, which this model's image encoder "
                             "adds to its output (`patches_per_token`): pass pixel_values, or mm_encoder_outputs "
                             "straight from model.get_image_features(..., return_dict=True) of these images "
                             "(generate() with num_beams > 1 or num_return_sequences > 1 is not supported).")
        queries, residuals, distances, patch_distances = [], [], [], []
        copy_distances: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for members in samples:
            exemplars = [g for g in members if roles[g] == ROLE_EXEMPLAR]
            if not exemplars:
                continue
            bank = torch.cat([image_embeds[g] for g in exemplars])
            patch_bank = torch.cat([patches[g] for g in exemplars] + [exemplar_copies[g] for g in exemplars
                                                                       if g in exemplar_copies])
            for g in members:
                if roles[g] == ROLE_QUERY:
                    residual, distance, patch_distance = residual_features(image_embeds[g], bank, patches[g],
                                                                           patch_bank)
                    queries.append(g)
                    residuals.append(residual)
                    distances.append(distance)
                    patch_distances.append(patch_distance)
                    if g in query_copies:
                        copy_distances[g] = [residual_features(tokens, bank, copy, patch_bank)[1:]
                                             for tokens, copy in query_copies[g]]
        # One call for the whole batch (see InContextResidual).
        added = self.in_context_residual(torch.cat(residuals), torch.cat(distances))
        for g, piece in zip(queries, added.split([r.shape[0] for r in residuals])):
            image_embeds[g] = image_embeds[g] + piece.to(image_embeds[g].dtype)
        return image_embeds, dict(zip(queries, zip(distances, patch_distances))), copy_distances

    def _word_rows(self, input_ids, labels, query_end, anomaly_word_mask, normal_word_mask, map_samples=None):
        if anomaly_word_mask is None or normal_word_mask is None:
            if self.word_token_ids is None:
                raise RuntimeError("Pixel maps need the word positions: call model.configure_words(tokenizer) "
                                   "(iadgpt.load_model does) or pass anomaly_word_mask / normal_word_mask.")
        if anomaly_word_mask is None:
            anomaly_word_mask = find_word_tokens(input_ids, self.word_token_ids["anomaly"])
        if normal_word_mask is None:
            normal_word_mask = find_word_tokens(input_ids, self.word_token_ids["normal"])
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        usable = positions >= query_end[:, None]
        if map_samples is not None:
            usable &= torch.tensor(map_samples, device=input_ids.device)[:, None]
        if labels is not None:
            usable &= labels == -100  # prompt words, not the supervised answer
        anomaly = anomaly_word_mask.bool() & usable
        normal = normal_word_mask.bool() & usable & ~anomaly
        wanted = map_samples if map_samples is not None else [True] * input_ids.shape[0]
        missing = [b for b in range(input_ids.shape[0]) if wanted[b] and not anomaly[b].any()]
        if missing:
            raise ValueError(
                f"Sample(s) {missing}: the prompt has no anomaly word after the query image, so there is no "
                f"attention to draw the pixel map from. Use one of {self.iadgpt.anomaly_words} in the question.")
        return anomaly, normal

    def anomaly_maps_from_attention_weights(self, attentions, input_ids: torch.Tensor,
                                            labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The anomaly maps computed the expensive way, from eager `output_attentions` weights.

        A reference for the attention-row maps: per sample (query = last image, no compression),
        the flattened mean over map layers, heads and anomaly-word rows of the attention weights.
        """
        spans = image_spans(input_ids, self.config.image_token_id)
        query_end = torch.tensor([s[-1][1] for s in spans], device=input_ids.device)
        anomaly_rows, _ = self._word_rows(input_ids, labels, query_end, None, None)
        maps = []
        for b, sample_spans in enumerate(spans):
            start, end = sample_spans[-1]
            rows = anomaly_rows[b].nonzero().flatten()
            per_layer = [attentions[n - 1][b][:, rows, start:end].float().mean(dim=(0, 1))
                         for n in self.iadgpt.attention_map_layers]
            maps.append(torch.stack(per_layer).mean(0))
        return maps

    def _attach_maps(self, result: IADGPTOutput, request: AttentionMapRequest, grids, pixel_masks,
                     evidence: list[torch.Tensor | None]) -> None:
        layers = self.iadgpt.attention_map_layers
        anomaly = torch.stack([request.maps[n][0] for n in layers]).mean(0)  # mean over layers (Eq. 5)
        normal = torch.stack([request.maps[n][1] for n in layers]).mean(0)
        has_normal = (request.row_valid & ~request.row_is_anomaly).any(-1)
        result.anomaly_maps, result.normal_maps, result.pixel_scores = [], [], []
        for b, grid in enumerate(grids):
            if grid is None:  # no map asked for this sample
                for maps in (result.anomaly_maps, result.normal_maps, result.pixel_scores):
                    maps.append(None)
                continue
            h, w = grid
            a = anomaly[b, : h * w].view(h, w)
            n = normal[b, : h * w].view(h, w)
            result.anomaly_maps.append(a)
            result.normal_maps.append(n)
            scores = pixel_anomaly_probability(a, n if has_normal[b] else None)
            if evidence[b] is not None:  # residual evidence, in logit space, per patch or half-patch cell
                cells = evidence[b].shape[0] // h
                fine = scores.repeat_interleave(cells, 0).repeat_interleave(cells, 1)
                scores = torch.sigmoid(float(self.iadgpt.residuals.map_attention) * torch.logit(fine, eps=1e-6) + evidence[b])
            result.pixel_scores.append(scores)
        if pixel_masks is None:
            return
        focal_terms, dice_terms = [], []
        for b, mask in enumerate(pixel_masks):
            if mask is None:
                continue
            focal, dice = pixel_losses(result.pixel_scores[b], mask.to(anomaly.device).float(),
                                       self.iadgpt.focal_gamma, self.iadgpt.focal_alpha)
            focal_terms.append(focal)
            dice_terms.append(dice)
        if not focal_terms:
            return
        result.focal_loss = torch.stack(focal_terms).mean()
        result.dice_loss = torch.stack(dice_terms).mean()
        pixel = self.iadgpt.pixel_loss_weight * (result.focal_loss + result.dice_loss)
        result.loss = pixel if result.loss is None else result.loss + pixel


def pixel_anomaly_probability(anomaly_map: torch.Tensor, normal_map: torch.Tensor | None) -> torch.Tensor:
    """Per token, p(anomalous) = a' / (a' + n') from the two attention channels.

    Each channel is first divided by its mean over the image, so both are on the scale "how much
    more than average this word looks at this token"; a missing normal channel counts as uniform.
    """
    a = anomaly_map.float()
    a = a / a.mean().clamp(min=1e-12)
    n = torch.ones_like(a) if normal_map is None else normal_map.float() / normal_map.float().mean().clamp(min=1e-12)
    return a / (a + n).clamp(min=1e-12)


register_checkpoint_conversion_mapping(
    "IADGPTForConditionalGeneration", get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"),
    overwrite=True)
