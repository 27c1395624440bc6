"""Tiny Hugging Face fixtures built in code: no download, CPU seconds.

``tokenizer()`` is a ``tokenizers`` WordLevel model over 96 words wrapped in
``PreTrainedTokenizerFast``; ``tiny_gpt2(seed)`` a 2-layer GPT-2 (vocabulary 100, width 16, no
dropout); ``dataset(n)`` ``n`` tokenized sentences of 8 words with ``labels = input_ids``;
``args(tmp, **kw)`` quiet CPU ``TrainingArguments`` (sequential order, constant learning rate,
no clipping, nothing saved or reported unless asked). Import only after
``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainingArguments
from transformers.utils import logging

logging.set_verbosity_error()

WORDS = [f"w{i}" for i in range(96)]
B, T = 4, 8


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tiny_gpt2(seed: int = 0, attn: str = "sdpa") -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=100, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg)


class Sentences(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(WORDS), (n, T), generator=g).tolist()
        text = [" ".join(WORDS[i] for i in row) for row in idx]
        enc = tokenizer()(text, return_tensors="pt")
        self.ids = enc["input_ids"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def batches(self, b: int = B):
        """The batches the Trainer draws in sequential order."""
        for s in range(0, len(self), b):
            ids = self.ids[s : s + b]
            yield {"input_ids": ids, "labels": ids}


def args(tmp, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp), per_device_train_batch_size=B, max_steps=3, learning_rate=0.1,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def twin(model):
    """An independent copy with the same parameters (the hand-written run's model)."""
    return copy.deepcopy(model)


def max_diff(a, b) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]
