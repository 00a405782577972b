"""The parts of held-out evaluation (`graftlm.eval.evaluate`), one kind of work each.

- `kinds`: which kind of data the rows are (text, chat, answers, pairs) and `--as`.
- `rows`: where every row went: read, bad, left out and why, cut to the context.
- `text`: text rows' loss and bits per byte, in context-length windows.
- `chat`: chat rows rendered as SFT renders them, and their assistant-token loss.
- `few_shot_chat`: chat rows after the few-shot examples' turns.
- `answers`: prompts with answers: greedy generation, exact_match and reward.
- `pairs`: preference pairs' log-prob margins, and a reward model's wins.
- `variants`: the model each row of the table is scored on (QLoRA on its own 4-bit copy).
"""
