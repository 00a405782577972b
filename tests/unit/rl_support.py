"""What the RL objective tests share: a tiny policy, a batch of two prompts, a reward that
pays for length (the tokenizer they take is the `tokenizer` fixture of conftest.py)."""

from __future__ import annotations

import torch

from graftlm.models import Decoder, ModelConfig


def policy(tokenizer):
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                                pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.train()


def prompt_batch(tokenizer):
    prompts = ["copy: 1 2", "copy: 3 4"]
    return {"prompt_ids": [tokenizer.encode(p) for p in prompts], "prompts": prompts,
            "rows": [{"answer": "1 2", "source": "t.jsonl:1"}, {"answer": "3 4", "source": "t.jsonl:2"}]}


def length_reward(completions, prompts, rows):
    return [float(len(c)) for c in completions]


class CopyPrompts:
    """`n` prompt rows ("copy: i"), a data set the trainer's loader takes."""

    def __init__(self, tokenizer, n: int):
        self.items = [{"prompt_ids": tokenizer.encode(f"copy: {i}"), "prompt_text": f"copy: {i}", "row": {}}
                      for i in range(n)]

    @staticmethod
    def collate(examples):
        from graftlm.objectives.rollout import collate_prompts
        return collate_prompts(examples)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
