"""Shared fixtures: tiny random models built from configs (no downloads) and small tasks."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

CORPUS = ["Is the number {n} even? Answer: yes no", "The capital of France is Paris.", "true false claim",
          "Q: What colour is the sky? A: blue green red", "entailment non-entailment premise hypothesis"]
ARCHS = ("llama", "gpt2", "roberta")
# the device the tiny models of `tiny_lm` run on: cpu in CI; LASER_LAB_TEST_DEVICE=cuda re-runs those tests on a GPU
TEST_DEVICE = os.environ.get("LASER_LAB_TEST_DEVICE", "cpu")


def make_tokenizer(dummy_prefix: bool = False):
    """A BPE tokenizer trained on ``CORPUS``: byte-level (GPT-2's kind), or with ``dummy_prefix`` one that, like
    Llama 2's SentencePiece one, puts "▁" before the text and for every space: " yes" alone is ['▁', '▁yes'], while
    "Answer: yes" ends in '▁yes'."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if dummy_prefix:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
        alphabet = ["▁"]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=alphabet)
    corpus = [c.format(n=n) for c in CORPUS for n in range(20)]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


def build_tiny(arch: str, tok, seed: int = 0):
    """A 2-layer, hidden-32 random model of ``arch`` (llama, gpt2, roberta)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, RobertaConfig,
                              RobertaForMaskedLM)

    torch.manual_seed(seed)
    v = len(tok)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return GPT2LMHeadModel(cfg)
    cfg = RobertaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=260, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return RobertaForMaskedLM(cfg)


# Every other architecture the README names, in memory (``build_other``): per-layer attention kinds mixed where the
# architecture has them, with an 8-token sliding window, so that a block run with the wrong kind shows.
OTHER_ARCHS = ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo", "gptj", "gpt_neox",
               "bert")


def build_other(arch: str, tok, seed: int = 0, window: int = 8):
    """A tiny random model of ``arch`` (one of ``OTHER_ARCHS``), eval mode; ``window``: its sliding window."""
    import transformers as tf

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    dec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, **ids)
    mixed = ["sliding_attention", "full_attention", "sliding_attention"]
    table = {
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(dec, sliding_window=window)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(dec, use_sliding_window=True, sliding_window=window,
                                                           layer_types=mixed[1::-1])),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(dec, head_dim=8)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(dec, head_dim=8)),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(dec, head_dim=8, sliding_window=window)),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                        dict(dec, head_dim=8, sliding_window=window, num_hidden_layers=3, layer_types=mixed)),
        "gemma3": (tf.Gemma3Config, tf.Gemma3ForConditionalGeneration,  # vision-language: a vision tower too
                   dict(text_config=dict(dec, head_dim=8, sliding_window=window, num_hidden_layers=3,
                                         layer_types=mixed),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=14),
                        mm_tokens_per_image=4)),
        "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, dec),
        "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256,
                                                         **ids)),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=2, num_attention_heads=4,
                                                                   max_position_embeddings=256, **ids)),
        "bert": (tf.BertConfig, tf.BertForMaskedLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=260, **ids)),
    }
    config, model, kwargs = table[arch]
    torch.manual_seed(seed)
    return model(config(**kwargs)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models, one folder per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    out = {}
    for arch in ARCHS:
        model = build_tiny(arch, tok)
        d = root / arch
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture
def tiny_lm(tiny_dirs):
    """Load a tiny model by architecture name (fresh copy per call), on ``LASER_LAB_TEST_DEVICE`` (default cpu)."""
    from laser_core import ModelSpec, load_model

    def _load(arch: str = "llama"):
        return load_model(ModelSpec(str(tiny_dirs[arch]), device=TEST_DEVICE))
    return _load


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a JSON Lines file at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_mc_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    return write_jsonl(path, [{"prompt": f"Is the number {k} even? Answer:", "choices": ["yes", "no"],
                               "answer": 0 if k % 2 == 0 else 1}
                              for k in rng.sample(range(10 * n), n)])  # distinct prompts: repeats would be dropped


@pytest.fixture
def mc_task(tmp_path) -> Path:
    return write_mc_jsonl(tmp_path / "even.jsonl")


@pytest.fixture
def search_pools(monkeypatch) -> list:
    """The prefix pools (``PrefixPool``) that searches make while the test runs, in order: a test reads what they hold
    (e.g. to let an evaluation fail once two layers' states are held)."""
    import laser_core.search as search
    from laser_core.prefix_states import PrefixPool
    pools: list = []

    class Recorded(PrefixPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)
    monkeypatch.setattr(search, "PrefixPool", Recorded)
    return pools


@pytest.fixture
def store(tmp_path):
    from laser_core import Store

    s = Store(tmp_path / "store")
    yield s
    s.close()
