"""Tiny Hugging Face checkpoints, built on the spot, for every architecture lepton supports.

    path = make_checkpoint(tmp_path, "llama", num_key_value_heads=1, tie_word_embeddings=True)
    hf = load_hf_model(path)        # the transformers reference, float32, eager attention

A checkpoint folder holds config.json, model.safetensors (save_pretrained, safe serialization)
and tokenizer files: a byte-level BPE for the decoders (round-trips any text, has a chat
template) and a WordPiece for BERT. Every parameter is perturbed after transformers' init, so
norm weights are not all ones and biases not all zeros: a weight loaded into the wrong place
changes the outputs.

The ``tiny_checkpoint`` fixture caches folders per test session: ``tiny_checkpoint("qwen2")``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

transformers.utils.logging.disable_progress_bar()

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A language model predicts the next token from the previous ones.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers like 12345 and 67890 appear in text, as do symbols: @#$%^&*().",
    "这是一个示例文本。我们喜欢机器学习。",
    "Le chat est sur la table, et le chien dort dans le jardin.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
]

# Short names (any case) and HF architecture names both work.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
    "bertforsequenceclassification": "BertForSequenceClassification",
}
DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "GPT2LMHeadModel")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LABELS = {0: "negative", 1: "neutral", 2: "positive"}

_LLAMA_LIKE = dict(hidden_size=256, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-6,
                   initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DEFAULTS = {
    "LlamaForCausalLM": dict(_LLAMA_LIKE),
    "MistralForCausalLM": dict(_LLAMA_LIKE, sliding_window=None),
    "Qwen2ForCausalLM": dict(_LLAMA_LIKE),
    "Qwen3ForCausalLM": dict(_LLAMA_LIKE),
    "GPT2LMHeadModel": dict(n_embd=128, n_layer=2, n_head=2, n_positions=256, initializer_range=0.1,
                            bos_token_id=2, eos_token_id=2, pad_token_id=0),
    "BertModel": dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, type_vocab_size=2, initializer_range=0.1, pad_token_id=0),
}
_DEFAULTS["BertForSequenceClassification"] = dict(_DEFAULTS["BertModel"], id2label=LABELS,
                                                  label2id={v: k for k, v in LABELS.items()})


def architecture_name(arch: str) -> str:
    """'llama' / 'Llama' / 'LlamaForCausalLM' -> 'LlamaForCausalLM'."""
    if arch in ARCHITECTURES.values():
        return arch
    key = arch.lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown test architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[key]


def make_bpe_tokenizer(max_length: int = 256):
    """Byte-level BPE, 400 tokens: <pad>=0 <s>=1 </s>=2 <unk>=3, chat markers 4-6, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # <|endoftext|> is there so that transformers' Qwen2Tokenizer (picked for model_type qwen2)
    # finds its unk token and adds nothing past the model's vocabulary.
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=max_length)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_wordpiece_tokenizer(max_length: int = 128):
    """BERT-style WordPiece: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, '[CLS] A [SEP]' framing."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)


def tiny_config(arch: str, vocab_size: int, **overrides):
    """The transformers config object of a tiny model (defaults above, then ``overrides``)."""
    name = architecture_name(arch)
    kwargs = dict(_DEFAULTS[name], vocab_size=vocab_size)
    kwargs.update(overrides)
    config_cls = getattr(transformers, {"GPT2LMHeadModel": "GPT2Config"}.get(
        name, name.replace("ForCausalLM", "").replace("ForSequenceClassification", "").replace("Model", "")
        + "Config"))
    config = config_cls(**kwargs)
    config.architectures = [name]
    return config


def make_checkpoint(tmp_path, arch: str, *, seed: int = 0, perturb: float = 0.05,
                    dtype: torch.dtype = torch.float32, **config_overrides) -> Path:
    """Build a random tiny ``arch`` model, save it with its tokenizer into a new folder of tmp_path.

    ``config_overrides`` go to the transformers config (e.g. num_key_value_heads=1, head_dim=80,
    tie_word_embeddings=True, rope_parameters={...}, sliding_window=8); ``vocab_size`` defaults to
    the tokenizer's size. Returns the folder.
    """
    name = architecture_name(arch)
    is_bert = name.startswith("Bert")
    tokenizer = make_wordpiece_tokenizer() if is_bert else make_bpe_tokenizer()
    config_overrides.setdefault("vocab_size", len(tokenizer))
    config = tiny_config(name, **config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    model = model.to(dtype)
    slug = json.dumps(config_overrides, sort_keys=True, default=str)
    folder = Path(tmp_path) / f"{name}-{abs(hash((slug, seed, str(dtype)))):x}"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_hf_model(path, dtype: torch.dtype = torch.float32):
    """The transformers reference of a checkpoint folder: eager attention, eval mode."""
    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def checkpoint_factory(root: Path):
    """build(arch, **config_overrides) -> a checkpoint folder under root, each built once."""
    cache: dict[str, Path] = {}

    def build(arch: str, **overrides) -> Path:
        key = architecture_name(arch) + json.dumps(overrides, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = make_checkpoint(root, arch, **overrides)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory fixture: tiny_checkpoint(arch, **config_overrides) -> folder, built once per session."""
    return checkpoint_factory(tmp_path_factory.mktemp("tiny_checkpoints"))
