"""A tiny LLaVA built from config, for tests and the demo (no weights can be downloaded).

CLIP vision tower + Llama decoder, a word-level tokenizer trained in-process over
the synthetic data's vocabulary and our prompt formats, and a `LlavaProcessor`
with a chat template that keeps text and images in prompt order. It is saved in
the ordinary `save_pretrained` layout, so `load_model` reads it by the same code
path as a real checkpoint. Untrained: weights are random but fixed by the seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mia_dpo.demo.synthetic import COLOURS, COUNT_WORDS, SHAPES
from mia_dpo.models.prompting import INTERLEAVED_CHAT_TEMPLATE
from mia_dpo.prompts import DEFAULT_PIP_PHRASINGS, IMAGE_TAG

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# Fixed ids: the model config and the tokenizer must agree on them.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE_TAG)
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index(IMAGE_TAG)


# Words beyond the synthetic questions, so short free-form answers stay readable.
_EXTRA_WORDS = (
    "USER ASSISTANT yes no a an the and or of to it this that not none unknown answer "
    "image images picture pictures photo colour color shape shapes count number left right "
    "top bottom center centre middle background inset small large one two three four five "
    "six seven eight nine zero there is are which what how many"
)
_PUNCTUATION = ":,?.!-'\"()/;"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Whitespace separates words and is dropped; every punctuation mark becomes its own
    # token, so "Image1:" is "Image1" ":" and "square?" is "square" "?".
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )


def _corpus() -> list[str]:
    """Every text the tiny model is expected to read or write."""
    questions = [f"What colour is the {s}?" for s in SHAPES]
    questions += [f"How many {s}s are there?" for s in SHAPES]
    questions.append("Which shape is it?")
    texts = questions + list(COLOURS) + list(SHAPES) + list(COUNT_WORDS)
    texts += [" ".join(f"Image{k}: image{k}" for k in range(1, 10)), "In in"]
    texts += [p.format(question="") for p in DEFAULT_PIP_PHRASINGS]
    texts += [_EXTRA_WORDS, " ".join(_PUNCTUATION), " ".join(str(d) for d in range(10))]
    return texts


def build_vocab() -> dict[str, int]:
    """Word -> id: the special tokens first, then every corpus word in lower, upper and
    capitalised case (sequence prompts lower-case the question's first letter, grid
    prompts keep it), sorted so the ids never depend on set order."""
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in _corpus():
        for word, _span in pre.pre_tokenize_str(text):
            words.update({word, word.lower(), word.upper(), word.capitalize()})
    words.difference_update(SPECIAL_TOKENS)
    return {w: i for i, w in enumerate([*SPECIAL_TOKENS, *sorted(words)])}


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = build_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    # Words are joined with spaces; the Replace steps then glue punctuation back on
    # ("Image2 ," -> "Image2,"). WordPiece's own cleanup is off: it also rewrites words.
    glue = [decoders.Replace(f" {p}", p) for p in ":,?.!"]
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=False), *glue])
    # No post-processor: the chat template writes the BOS itself
    # (see INTERLEAVED_CHAT_TEMPLATE).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TAG},
        model_max_length=2048,
        padding_side="left",
    )


def build_tiny_model(
    out_dir: Path,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    text_layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    vision_layers: int = 3,
    vision_hidden: int = 96,
) -> Path:
    """Write a random-weight tiny LLaVA (model + processor) to `out_dir`; return it.

    The same arguments give the same weights. With the "default" feature strategy
    the CLS token is dropped, so each image is (image_size // patch_size)**2 tokens.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tokenizer = build_tokenizer()
    grid = image_size // patch_size
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        # The last layer: a 3-layer tower has little to spare for LLaVA's usual -2.
        vision_feature_layer=-1,
        image_seq_length=grid * grid,
    )
    # fork_rng: a fixed seed here must not reset the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS token that "default" then drops: +1 - 1 = grid**2 tokens.
        num_additional_image_tokens=1,
        chat_template=INTERLEAVED_CHAT_TEMPLATE,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    processor.save_pretrained(out_dir)
    return out_dir
