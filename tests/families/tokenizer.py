"""A local word-level tokenizer for the tiny model families (no hub, no download).

Every family gets the same words (our prompt formats, colours, shapes, digits, the
role words of the chat templates) and its own special tokens (image placeholders,
delimiters, turn markers), so the processors find every token they look up by name.
The words come from the demo's own tiny LLaVA (`mia_dpo.demo.tiny.build_vocab`),
so the two tokenizers read our prompts the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from mia_dpo.demo import tiny

# Role and system-prompt words the hub chat templates write around our prompts
# (`<|im_start|>system\nYou are a helpful assistant.`, Gemma's `model` turn...).
_TEMPLATE_WORDS = (
    "system user assistant model You are a helpful Assistant User System "
    "USER ASSISTANT Question Answer"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """The special tokens of one family, as its hub tokenizer spells them."""

    bos: str | None
    eos: str
    pad: str
    unk: str = "<unk>"
    # Placeholders, delimiters and turn markers; each must stay one token.
    special: Sequence[str] = ()
    # Named attributes the processors read (`tokenizer.image_token`, `boi_token`...).
    named: Mapping[str, str] = field(default_factory=dict)
    # Llama-style tokenizers prepend a BOS to every encoding; Qwen-style ones do not.
    add_bos: bool = False


def _words() -> list[str]:
    """The demo tokenizer's words (its special tokens removed) plus template words."""
    words = set(tiny.build_vocab()) - set(tiny.SPECIAL_TOKENS)
    words.update(_TEMPLATE_WORDS.split())
    return sorted(words)


def build_tokenizer(spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with the family's specials first, then the words."""
    named = [spec.unk, spec.pad, spec.eos, *([spec.bos] if spec.bos else [])]
    specials = list(dict.fromkeys([*named, *spec.special, *spec.named.values()]))
    vocab = {token: i for i, token in enumerate(specials)}
    for word in _words():
        vocab.setdefault(word, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab, unk_token=spec.unk))
    backend.pre_tokenizer = tiny._pre_tokenizer()
    # Same decoding as the demo tokenizer: words joined by spaces, punctuation glued.
    glue = [decoders.Replace(f" {p}", p) for p in ":,?.!"]
    backend.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=False), *glue])
    # Added as special tokens so that `<|image_pad|>` or `[IMG]` is matched before the
    # punctuation pre-tokenizer could split it; they keep their vocabulary ids.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        extra_special_tokens=dict(spec.named),
        # Explicit either way, so the backend's post-processor is rebuilt to match.
        add_bos_token=spec.add_bos,
        add_eos_token=False,
        model_max_length=8192,
        padding_side="left",
    )
