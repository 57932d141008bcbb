"""Tokenizer loading (transformers' AutoTokenizer, never remote code) and the chat template."""

from __future__ import annotations

import functools
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
    backend = _plain_backend(tokenizer)
    if backend is not None:
        # What transformers' fast tokenizer runs underneath, without its Python pass over every
        # token afterwards (regrouping the lists, a copy): for a 1 MB prompt that pass holds the
        # GIL for tens of milliseconds, and a server's engine thread waits meanwhile.
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which nothing
        # here reads: half the time, and freeing the encoding (under the GIL) takes 1 ms, not 60.
        batch = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        enc = batch([text], add_special_tokens=add_special_tokens)[0]
        return enc.ids, (enc.type_ids if "token_type_ids" in tokenizer.model_input_names else None)
    # No attention mask: nothing uses it, and building it is another list as long as the text's
    # tokens, made while holding the GIL (a server tokenizes off its event loop, not off the GIL).
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)
    return list(enc["input_ids"]), (list(enc["token_type_ids"]) if "token_type_ids" in enc else None)


# The arguments of transformers' apply_chat_template: chat_template_kwargs may not set them.
TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "sanitize_control_tokens"})


def apply_chat_template(tokenizer, conversation: list[dict], chat_template: str | None = None,
                        add_generation_prompt: bool = True, *, continue_final_message: bool = False,
                        template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[int]:
    """A conversation [{"role", "content"}, ...] -> prompt token ids, via the tokenizer's template.

    continue_final_message: the last message is left open (no end-of-turn after it), so the model
    continues it; template_kwargs: more variables for the template (e.g. enable_thinking); tools:
    OpenAI's tool definitions, the template's ``tools`` variable."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model folder has none")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
                         "pass chat_template=... or use generate() with a plain prompt")
    if not isinstance(conversation, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
        raise ValueError("a conversation must be a list of {'role': ..., 'content': ...} dicts")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true: "
                         "the first continues the last message, the second starts a new one")
    reserved = set(template_kwargs or ()) & TEMPLATE_ARGUMENTS
    if reserved:
        raise ValueError(f"chat_template_kwargs cannot set {sorted(reserved)}: they are arguments of "
                         "the template call, not template variables")
    text = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, tools=tools,
                                         **(template_kwargs or {}))
    # The template writes the special tokens (bos, role markers) itself.
    return encode(tokenizer, text, add_special_tokens=False)[0]


# The methods between a fast tokenizer's __call__ and its Rust backend's encode_batch (those that
# a transformers release has): a class that overrides none of them adds nothing of its own.
_ENCODE_PATH = ("__call__", "_call_one", "encode_plus", "_encode_plus", "_batch_encode_plus", "_convert_encoding")


def _plain_backend(tokenizer):
    """The Rust tokenizer under ``tokenizer`` when calling it directly gives the same ids: a
    transformers fast tokenizer that overrides nothing on the way, whose backend has no
    truncation or padding set (transformers turns both off for a plain call) and splits special
    tokens as the wrapper says. None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not _plain_fast_class(type(tokenizer)):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if bool(getattr(backend, "encode_special_tokens", False)) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


@functools.lru_cache(maxsize=8)
def _plain_fast_class(cls) -> bool:
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return False
    return issubclass(cls, PreTrainedTokenizerFast) and all(
        getattr(cls, name, None) is getattr(PreTrainedTokenizerFast, name, None) for name in _ENCODE_PATH)
