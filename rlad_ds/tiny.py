"""Tiny tokenizers and models built locally (no hub): used by the tests, the demo and the benchmarks.

The tokenizer is character level, built with the `tokenizers` library and wrapped as a transformers
fast tokenizer with a ChatML-style chat template, so every code path that loads a real HF model dir
(`AutoTokenizer.from_pretrained`, `apply_chat_template`, `AutoModelForCausalLM.from_pretrained`) is
exercised unchanged.
"""

from __future__ import annotations

import string

PAD, BOS, EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"
PRINTABLE = string.printable[:-2]  # every printable ASCII character, minus \x0b and \x0c
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(alphabet: str = PRINTABLE):
    """A character-level fast tokenizer over `alphabet` with pad / im_start / im_end specials."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS] + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, additional_special_tokens=[BOS]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 4096,
    tie_embeddings: bool = False,
):
    """A transformers config for a tiny `qwen3` or `llama` causal LM."""
    from transformers import LlamaConfig, Qwen3Config

    classes = {"qwen3": Qwen3Config, "llama": LlamaConfig}
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(classes)}")
    return classes[arch](
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate or 2 * hidden,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
