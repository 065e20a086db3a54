"""Loading through the real-model path, image-token layout and image spans."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig

from mia_dpo.config import ModelConfig
from mia_dpo.demo.tiny import IMAGE_TOKEN_ID
from mia_dpo.errors import UserError
from mia_dpo.models.attention import decoder_layers
from mia_dpo.models.families import SUPPORTED, family_for
from mia_dpo.models.families import llava as llava_family
from mia_dpo.models.families.llava import Llava
from mia_dpo.models.loading import LoadedModel, check_model, load_model
from mia_dpo.models.prompting import chat_text
from mia_dpo.prompts import grid_prompt, sequence_prompt


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(ModelConfig(path=str(tiny_model_dir), attn_implementation="eager"))


def picture(rgb: tuple[int, int, int], size: tuple[int, int] = (80, 64)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_tiny_model_loads_like_a_real_one(lm: LoadedModel, tiny_model_dir: Path) -> None:
    assert lm.image_token_id == IMAGE_TOKEN_ID
    assert isinstance(lm.family, Llava)
    assert (lm.family.tokens_per_image, lm.family.grid) == (64, (8, 8))
    assert lm.num_layers == 4
    assert lm.num_layers == len(decoder_layers(lm.model)) == 4
    assert decoder_layers(lm.model) is lm.model.model.language_model.layers
    assert lm.device == torch.device("cpu")
    assert lm.dtype == torch.float32
    assert next(lm.model.parameters()).dtype == torch.float32
    assert not lm.model.training
    assert lm.tokenizer is lm.processor.tokenizer
    assert lm.tokenizer.padding_side == "left"
    assert lm.name == str(tiny_model_dir)
    assert lm.model.config.text_config._attn_implementation == "eager"


def test_three_image_prompt_gives_three_spans_in_order(lm: LoadedModel) -> None:
    prompt = sequence_prompt(3, 3, "What colour is the square?")
    images = [picture((200, 0, 0)), picture((0, 200, 0), (50, 50)), picture((0, 0, 200))]
    enc = lm.processor(text=[chat_text(lm.processor, prompt)], images=images, return_tensors="pt")
    assert enc["pixel_values"].shape == (3, 3, 64, 64)
    ids = enc["input_ids"][0]
    spans = [t.runs[0] for t in lm.family.image_tokens(ids, enc, range(3))]
    assert len(spans) == 3
    assert all(end - start == 64 for start, end in spans)
    # "ImageK :" stands right before the K-th span: the order survived tokenization
    for k, (start, _) in enumerate(spans, 1):
        assert lm.tokenizer.convert_ids_to_tokens(ids[start - 2 : start].tolist()) == [
            f"Image{k}",
            ":",
        ]


def test_forward_and_batched_generate(lm: LoadedModel) -> None:
    prompts = [sequence_prompt(2, 1, "Which shape is it?"), grid_prompt(2, "Which shape is it?")]
    images = [picture((200, 0, 0)), picture((0, 200, 0)), picture((0, 0, 200))]
    enc = lm.processor(
        text=[chat_text(lm.processor, p) for p in prompts],
        images=images,
        padding=True,
        return_tensors="pt",
    )
    mask = enc["attention_mask"]
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # the shorter prompt is padded on the left
    with torch.no_grad():
        out = lm.model(**enc)
        gen = lm.model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.logits.shape == (*enc["input_ids"].shape, len(lm.tokenizer))
    assert torch.isfinite(out.logits).all()
    assert gen.shape[0] == 2 and gen.shape[1] > enc["input_ids"].shape[1]
    assert torch.equal(gen[:, : enc["input_ids"].shape[1]], enc["input_ids"])


def copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_pickle_only_dir_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_without_weights(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(tiny_model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"convert them to safetensors or set model\.allow_pickle"):
        load_model(ModelConfig(path=str(model_dir)))


def test_pickle_dir_loads_when_allowed(
    tiny_model_dir: Path, tmp_path: Path, lm: LoadedModel
) -> None:
    model_dir = copy_without_weights(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(tiny_model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    pickled = load_model(ModelConfig(path=str(model_dir), allow_pickle=True))
    # (saved keys use LLaVA's original layout; compare the loaded modules instead)
    expected = lm.model.state_dict()
    state = pickled.model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize(
    "path", ["/no/such/model/dir", "./missing-model", "nobody-xyz/no-such-model"]
)
def test_unknown_path_names_model_path(path: str) -> None:
    with pytest.raises(UserError, match=r"^model\.path") as err:
        load_model(ModelConfig(path=path))
    assert "\n" not in str(err.value)


def test_empty_path_is_refused() -> None:
    with pytest.raises(UserError, match=r"model\.path is empty"):
        load_model(ModelConfig(path=""))


def test_a_llava_config_with_anyres_markers_is_refused(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.image_grid_pinpoints = [[336, 672]]  # a LLaVA-NeXT checkpoint typed "llava"
    with pytest.raises(UserError) as err:
        family_for(config, None, "m")
    assert str(err.value) == (
        "model.path: m (model type 'llava'): cannot map its image tokens to one fixed patch grid"
    )


def test_an_unknown_model_type_names_the_supported_ones(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.model_type = "qwen3_omni"
    with pytest.raises(UserError) as err:
        family_for(config, None, "m")
    assert str(err.value) == (
        f"model.path: m: model type 'qwen3_omni' has no model family here; supported: {SUPPORTED}"
    )
    assert {"llava", "llava_next", "qwen2_5_vl", "gemma3", "internvl", "mistral3"} <= set(
        SUPPORTED.split(", ")
    )


def test_layout_of_llava_15_shapes(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.vision_config.image_size, config.vision_config.patch_size = 336, 14
    fam = Llava(config, None, "m")
    assert (fam.image_token_id, fam.tokens_per_image, fam.grid) == (IMAGE_TOKEN_ID, 576, (24, 24))
    config.vision_feature_select_strategy = "full"  # CLS kept: one more token per image
    fam = Llava(config, None, "m")
    assert (fam.tokens_per_image, fam.grid) == (577, (24, 24))
    # the picture is the last 576 tokens: the CLS token belongs to no block
    (pic,) = fam.pictures([], {}, range(1))
    assert (pic.n_tokens, pic.view, pic.grid) == (577, (1, 577), (24, 24))


class CountingProcessor:
    image_seq_length = 100


def test_layout_refuses_processor_model_mismatch(tiny_model_dir: Path, lm: LoadedModel) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert Llava(config, lm.processor, "m").tokens_per_image == 64
    with pytest.raises(UserError, match=r"processor inserts 100 image tokens.*produces 64"):
        Llava(config, CountingProcessor(), "m")
    lm.processor.num_additional_image_tokens = 0  # as if saved without the CLS correction
    try:
        with pytest.raises(UserError, match="processor inserts 63 image tokens"):
            Llava(config, lm.processor, "m")
    finally:
        lm.processor.num_additional_image_tokens = 1


def test_device_and_dtype_resolution() -> None:
    from mia_dpo.models.loading import resolve_device, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    expected: Any = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


# Like some hub LLaVA templates: every image first, then all the text.
IMAGES_FIRST = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for p in m['content'] if p['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def test_template_that_moves_images_is_replaced_or_refused(tiny_model_dir) -> None:
    from transformers import AutoProcessor

    from mia_dpo.models.loading import choose_chat_template
    from mia_dpo.models.prompting import INTERLEAVED_CHAT_TEMPLATE, chat_text, keeps_image_order

    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    assert keeps_image_order(proc)
    proc.chat_template = IMAGES_FIRST
    assert not keeps_image_order(proc)
    with pytest.raises(UserError, match=r"model\.chat_template"):
        choose_chat_template(proc, "checkpoint", "m")
    choose_chat_template(proc, "auto", "m")
    assert proc.chat_template == INTERLEAVED_CHAT_TEMPLATE
    text = chat_text(proc, "Image1:<image>\nImage2:<image>\nIn Image2, what is it?")
    assert text.index("Image1:") < text.index("<image>") < text.index("Image2:")


def test_an_unreadable_weights_file_is_named(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_pretrained writes 0600 files; a container running as another uid cannot
    read them. (The tests run as root, who can read anything, so os.access is made
    to answer as that other uid would.)"""
    import os

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: not str(p).endswith(".safetensors") and real_access(p, mode)
    )
    with pytest.raises(UserError, match=r"cannot read model\.safetensors as uid \d+ \(permission"):
        load_model(ModelConfig(path=str(model_dir)))


def _full_strategy_copy(tiny_model_dir: Path, dest: Path) -> Path:
    """A model whose config arithmetic says 65 tokens per image (CLS kept: 'full') while
    its processor still inserts 64: the LLaVA-Interleave kind of mismatch."""
    shutil.copytree(tiny_model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_the_probe_refuses_what_config_arithmetic_accepts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the static processor check blind (as for processors whose count it cannot
    read), the two-image probe still sees what the processor really inserts."""
    path = _full_strategy_copy(tiny_model_dir, tmp_path / "m")
    monkeypatch.setattr(llava_family, "processor_tokens_per_image", lambda processor: None)
    with pytest.raises(UserError) as err:
        check_model(ModelConfig(path=str(path)))
    msg = str(err.value)
    assert msg.startswith(f"model.path: {path} (model type 'llava')")
    assert "has 64 tokens, image 1 needs 65" in msg and "\n" not in msg
    family = check_model(ModelConfig(path=str(tiny_model_dir)))  # the real one passes
    assert (family.tokens_per_image, family.grid) == (64, (8, 8))


def test_a_run_refuses_the_model_before_any_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`mia-dpo run` checks the model before planning: exit 2, one line, nothing stored."""
    from mia_dpo.demo.synthetic import write_synthetic

    path = _full_strategy_copy(tiny_model_dir, tmp_path / "m")
    data = write_synthetic(tmp_path / "src", 12, seed=0)
    cfg = {
        "stages": ["augment", "generate"],
        "input": {"path": str(data), "image_root": str(tmp_path / "src" / "images")},
        "store": {"backend": "local", "root": str(tmp_path / "store")},
        "model": {"path": str(path)},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIA_DPO_")}
    proc = subprocess.run(
        [sys.executable, "-m", "mia_dpo", "run", str(tmp_path / "run.yaml"), "--run-id", "r"],
        capture_output=True, text=True, env=env | {"HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mia-dpo: error: model.path:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "store" / "runs" / "r").exists()
