"""A tiny random-init Llama (hidden 64, 2 layers) and a word-level tokenizer saved beside it with save_pretrained:
the offline stand-in LM for tests and docs until a trained one ships (its answers are noise; its tokens are real)."""

from __future__ import annotations

from pathlib import Path

WORDS = ("which digit is this ? it is a the photo of answer question : zero one two three four five six seven "
         "eight nine cat coffee astronaut camera rocket moon . yes no colour red green blue").split()


def write_tiny_lm(out: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A LlamaForCausalLM + PreTrainedTokenizerFast directory at `out` (from_pretrained reloads both)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)
