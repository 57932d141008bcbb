"""Tokenizer loading (transformers' AutoTokenizer, never remote code) and the chat template."""

from __future__ import annotations

from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model",
                    "vocab.json", "spiece.model")


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has no tokenizer files (prompts must be token ids)."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a malformed folder
        raise ValueError(f"cannot load the tokenizer of {path}: {type(err).__name__}: {err}") from None


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[int] | None]:
    """text -> (input_ids, token_type_ids or None)."""
    # No attention mask: nothing uses it, and building it is another list as long as the text's
    # tokens, made while holding the GIL (a server tokenizes off its event loop, not off the GIL).
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)
    return list(enc["input_ids"]), (list(enc["token_type_ids"]) if "token_type_ids" in enc else None)


def apply_chat_template(tokenizer, conversation: list[dict], chat_template: str | None = None,
                        add_generation_prompt: bool = True) -> list[int]:
    """A conversation [{"role", "content"}, ...] -> prompt token ids, via the tokenizer's template."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model folder has none")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
                         "pass chat_template=... or use generate() with a plain prompt")
    if not isinstance(conversation, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
        raise ValueError("a conversation must be a list of {'role': ..., 'content': ...} dicts")
    text = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    # The template writes the special tokens (bos, role markers) itself.
    return encode(tokenizer, text, add_special_tokens=False)[0]
