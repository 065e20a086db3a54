"""Run LLaMA-Factory's own data pipeline on a `mia-dpo export --format llamafactory`
folder. By hand, not in CI: LLaMA-Factory 0.9.x pins datasets<=4.0.0, trl<=0.24 and
peft<=0.18.1, so it cannot share our environment; its data code still imports with
our versions when installed beside them without its dependencies:

    pip download --no-deps llamafactory==0.9.5 -d /tmp/lf
    pip install --no-deps --target /tmp/lf/target /tmp/lf/llamafactory-0.9.5-*.whl \
        omegaconf antlr4-python3-runtime==4.9.3
    mkdir -p /tmp/lf/stub && touch /tmp/lf/stub/torchaudio.py   # imported, unused here
    PYTHONPATH=/tmp/lf/target:/tmp/lf/stub DISABLE_VERSION_CHECK=1 HF_HUB_OFFLINE=1 \
        python tests/export/llamafactory_check.py EXPORT_DIR MODEL_DIR

MODEL_DIR: a LLaVA checkpoint (`mia-dpo tiny-model --out DIR` makes one). It reads the
folder's dataset_info.json with LLaMA-Factory's parser, converts and tokenizes every
record for DPO with its `llava` template (which fails on any record whose `<image>`
count differs from its images), and prints how many pairs came through.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main(folder: str, model: str) -> int:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from transformers import AutoProcessor, AutoTokenizer

    names = list(json.loads((Path(folder) / "dataset_info.json").read_text()))
    model_args, data_args, training_args, _, _ = get_train_args({
        "model_name_or_path": model, "stage": "dpo", "do_train": True,
        "finetuning_type": "lora", "dataset": ",".join(names), "dataset_dir": folder,
        "template": "llava", "cutoff_len": 4096, "output_dir": tempfile.mkdtemp(),
        "overwrite_cache": True, "report_to": "none",
    })  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)
    processor = AutoProcessor.from_pretrained(model)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    module = get_dataset(
        template, model_args, data_args, training_args, stage="rm",
        tokenizer=tokenizer, processor=processor,
    )  # fmt: skip
    ds = module["train_dataset"]
    ok = sum(1 for r in ds if r["chosen_input_ids"] and r["rejected_input_ids"])
    print(f"llamafactory: {ok} of {ds.num_rows} pairs tokenized for DPO ({', '.join(names)})")
    return 0 if ok == ds.num_rows > 0 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
