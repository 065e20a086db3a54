"""The models `bench/score.py` measures, and the batch it feeds each of them.

Three kinds, all random weights built offline into a temporary folder:
- "demo": the demo's tiny LLaVA (`mia_dpo.demo.tiny`), at the size bench/score.py
  always used (8 decoder layers, hidden 256, 224 px images of 16 px patches);
- "real": LLaVA-1.5-7b's token shape (336 px images, 14 px patches: 576 tokens per
  image, 32 decoder layers), at a reduced width so a CPU can run it;
- one per model family the stage accepts, as the tests build them
  (`tests/families/factory.py`): the smallest size that keeps each architecture's rules.

The batch is the score stage's own: `teacher_forced` over (sample, images, response)
items, so any change to how the stage builds its inputs shows up here too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mia_dpo.config import ModelConfig
from mia_dpo.demo.tiny import build_tiny_model
from mia_dpo.errors import UserError
from mia_dpo.models.loading import LoadedModel, check_model
from mia_dpo.prompts import sequence_prompt
from mia_dpo.records import AugmentedSample, Response
from mia_dpo.stages.score import Item

# The factory lives under tests/; a script's sys.path starts at bench/, not the root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_IMAGES = 4
RESPONSE_LENGTHS = (40, 24, 32, 20)  # tokens, cycled over the batch: rows differ, so padding
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
_ANSWER = "the square is red and the circle is blue in the picture ."

# llava-1.5-7b: 32 decoder layers of width 4096 with 32 heads (head dim 128).
REAL_LAYERS = 32
REAL_IMAGE, REAL_PATCH = 336, 14
REAL_CONTEXT = 4096


@dataclass
class Spec:
    """One model to measure: a name for the table, a line saying what it is, a builder."""

    name: str
    about: str
    build: Callable[[Path], Path]


def demo_spec(layers: int, image_size: int) -> Spec:
    patch = 16 if image_size % 16 == 0 else 14
    tokens = (image_size // patch) ** 2

    def build(out: Path) -> Path:
        return build_tiny_model(
            out, seed=0, image_size=image_size, patch_size=patch, text_layers=layers,
            hidden=256, heads=8, vision_layers=2, vision_hidden=128,
        )  # fmt: skip

    about = f"demo tiny LLaVA: hidden 256, 8 heads, {layers} layers, {tokens} tokens/image"
    return Spec("demo", about, build)


def real_spec(hidden: int, heads: int) -> Spec:
    tokens = (REAL_IMAGE // REAL_PATCH) ** 2

    def build(out: Path) -> Path:
        # The vision tower only has to emit 576 features per image: two narrow layers do.
        path = build_tiny_model(
            out, seed=0, image_size=REAL_IMAGE, patch_size=REAL_PATCH, text_layers=REAL_LAYERS,
            hidden=hidden, heads=heads, vision_layers=2, vision_hidden=16 * heads,
        )  # fmt: skip
        # 4 x 576 image tokens overrun the demo's 2048-token context; llava-1.5 has 4096
        # (rotary positions need no table, so only the limits and the warning change)
        _set_json(path / "config.json", ("text_config", "max_position_embeddings"), REAL_CONTEXT)
        _set_json(path / "tokenizer_config.json", ("model_max_length",), REAL_CONTEXT)
        return path

    about = (
        f"LLaVA-1.5-7b token shape: {REAL_LAYERS} layers, {tokens} tokens/image; "
        f"width reduced to hidden {hidden}, {heads} heads (7b: 4096, 32)"
    )
    return Spec("real", about, build)


def _set_json(path: Path, keys: tuple[str, ...], value: object) -> None:
    data = json.loads(path.read_text())
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path.write_text(json.dumps(data, indent=2))


def family_specs() -> dict[str, Spec]:
    """Every family the factory builds; whether the stage accepts it is checked later."""
    from tests.families import factory

    specs = {}
    for name, builder in factory.FAMILIES.items():
        about = (
            f"{name} tiny test model: hidden {factory.HIDDEN}, {factory.HEADS} heads, "
            f"{factory.TEXT_LAYERS} layers"
        )
        specs[name] = Spec(name, about, builder)
    return specs


def select(words: list[str], layers: int, image_size: int, hidden: int, heads: int) -> list[Spec]:
    """`--models` words to specs, in the order given, without repeats.

    all = demo, every family, real; families = every family the factory builds."""
    named = {"demo": [demo_spec(layers, image_size)], "real": [real_spec(hidden, heads)]}
    # the factory only when asked for: a demo-only run should not depend on tests/
    families = family_specs() if set(words) - set(named) else {}
    named["families"] = list(families.values())
    named.update({k: [v] for k, v in families.items()})
    named["all"] = named["demo"] + named["families"] + named["real"]
    out: dict[str, Spec] = {}
    for word in words:
        if word not in named:
            raise SystemExit(f"--models: unknown {word!r}; known: {', '.join(named)}")
        out.update({s.name: s for s in named[word]})
    return list(out.values())


def refusal(model_dir: Path) -> str | None:
    """Why the stage would refuse this model (config and processor only), or None."""
    try:
        check_model(ModelConfig(path=str(model_dir)))
    except UserError as e:
        return str(e)
    return None


# The batch


def synthetic_images(item: int) -> list[Image.Image]:
    images = []
    for j in range(N_IMAGES):
        img = Image.new("RGB", (256, 256), "white")
        x = 20 + 40 * ((item + j) % 4)
        colour = _COLOURS[(item * N_IMAGES + j) % len(_COLOURS)]
        ImageDraw.Draw(img).rectangle([x, x, x + 80, x + 80], fill=colour)
        images.append(img)
    return images


def build_items(lm: LoadedModel, batch: int) -> list[Item]:
    """`batch` 4-image sequence samples, each with a response of a different length.

    Only what `teacher_forced` reads has to be real: the prompt, the images and the
    response's token ids (ordinary words of the model's own tokenizer)."""
    words = lm.tokenizer(_ANSWER, add_special_tokens=False)["input_ids"]
    items: list[Item] = []
    for i in range(batch):
        k = 1 + i % N_IMAGES
        sample = AugmentedSample(
            sample_id=f"bench{i}-sequence", source_id=f"bench{i}", source="bench",
            format="sequence", images=[f"bench/{i}/{j}.png" for j in range(N_IMAGES)],
            target_index=k, n_images=N_IMAGES,
            prompt=sequence_prompt(N_IMAGES, k, "What colour is the square?"),
            chosen="red", target_image=f"bench/{i}/{k - 1}.png",
        )  # fmt: skip
        n = RESPONSE_LENGTHS[i % len(RESPONSE_LENGTHS)]
        ids = [words[t % len(words)] for t in range(n)]
        response = Response(text=_ANSWER, token_ids=ids, logprobs=[-1.0] * n, ppl=2.718)
        items.append((sample, synthetic_images(i), response))
    return items
