"""Make the tiny local model used by tests, the demo and benchmarks, without any network access.

A random-weight Llama (hidden 128, 2 layers, 2 heads => head size 64, float32, 512 positions) saved as
safetensors, plus a byte-level BPE tokenizer trained on a small text shipped in this package. vLLM and
transformers load the directory offline. Random weights write nonsense, but deterministic nonsense: enough
to see that a weight update really changed the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

#: Written last; its presence (with the same seed and layout version) means the directory is complete.
MARKER = ".weightwatch-tiny-model.json"
LAYOUT_VERSION = 1

HIDDEN = 128
LAYERS = 2
HEADS = 2  # head size = HIDDEN / HEADS = 64 (vLLM's CPU attention supports 32/64/...)
INTERMEDIATE = 256
MAX_POSITIONS = 512
VOCAB_TARGET = 512

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus_text() -> str:
    """The local training text for the tokenizer (package data, no downloads)."""
    return resources.files("weightwatch.inference").joinpath("corpus/tiny.txt").read_text(encoding="utf-8")


def is_complete(out_dir: Path, seed: int) -> bool:
    marker = Path(out_dir) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("seed") == seed and info.get("layout") == LAYOUT_VERSION and (Path(out_dir) / "model.safetensors").is_file()


def _train_tokenizer(out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def _save_model(out_dir: Path, vocab_size: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    # A larger init than the default 0.02 so random logits are not near-uniform: greedy output then
    # depends visibly on the weights, which is what update tests check.
    config.initializer_range = 0.2
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    model.generation_config.save_pretrained(str(out_dir))


def make_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Create (or reuse, when already complete) the tiny model in ``out_dir``; returns the directory.

    The model is built in a sibling temporary directory and renamed into place, so a crash never
    leaves a half-written model that a later call would mistake for a complete one.
    """
    out_dir = Path(out_dir).resolve()
    if is_complete(out_dir, seed):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        vocab_size = _train_tokenizer(tmp)
        _save_model(tmp, vocab_size, seed)
        (tmp / MARKER).write_text(json.dumps({"seed": seed, "layout": LAYOUT_VERSION, "vocab_size": vocab_size}))
        if out_dir.exists():
            shutil.rmtree(out_dir)  # incomplete leftovers or another seed
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_complete(out_dir, seed):  # a concurrent maker won the race with the same result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
