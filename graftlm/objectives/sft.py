"""Supervised fine-tuning: masked next-token cross-entropy over the assistant's tokens.

Design choices:
- The loss is a sum over trained target tokens and the count is their number, so the
  trainer's division by the step's total count makes gradient accumulation exactly a
  larger batch (every trained token weighs the same, whatever micro-batch it is in).
- Which tokens are trained is decided by the renderer (`data/render.py`): the batch
  carries `loss_mask` [B, T] marking inputs trained as targets. This module never
  looks at roles or templates.
- Packed rows (`document_ids`) never predict across a document boundary: the target of
  the last token of one document would be the first token of the next.
- `sft.packing` (off by default, as in TRL) packs the rendered train rows, with their
  loss masks, into sequences of `max_length` by best-fit (`data/packing.py`):
  `document_ids` keep attention within a row and `position_ids` restart, so the summed
  loss and token count equal the unpacked ones. Rows are packed once and the loader
  shuffles the sequences; `batch_size` then counts sequences. Validation stays
  unpacked, so `val_loss` and `eval_batches` mean the same with packing on or off.
  Packing efficiency (rows per sequence, padding fraction) goes to the run's log and
  `summary.json` (`DataSplits.stats`).
- `model_logprobs` is the one place that turns (model, ids, targets) into per-token
  log-probabilities; DPO, GRPO, PPO and eval all call it.
"""

from __future__ import annotations

import torch

from graftlm.data.formats import RowCounts, TooManyBadRows, load_examples
from graftlm.errors import GraftError
from graftlm.objectives import DataSplits, ObjectiveSpec
from graftlm.objectives.configs import HELP, FineTuneData, SFTConfig
from graftlm.objectives.logprobs import IGNORE_INDEX, shift_targets


def model_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                   position_ids: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets[b, t] | input_ids[b, :t+1]) as float32 [B, T]; mask IGNORE_INDEX yourself.

    The model computes them inside its forward (chunked), where DDP and FSDP2 expect
    every parameter to be used.
    """
    return model(input_ids, position_ids=position_ids, document_ids=document_ids, targets=targets)


def packed_targets(batch: dict) -> torch.Tensor:
    """Next-token targets of a (possibly packed) batch, masked by `loss_mask`."""
    input_ids = batch["input_ids"]
    loss_mask = batch.get("loss_mask")
    targets = shift_targets(input_ids, loss_mask)
    document_ids = batch.get("document_ids")
    if document_ids is not None:
        crosses = document_ids[:, 1:] != document_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


def load_splits(cfg, section: FineTuneData, objective: str) -> tuple[list[dict], list[dict], RowCounts]:
    """(train, val) normalised rows, and what reading them found (bad rows skipped, over
    every file read); val is `val_data`, or a seeded `val_fraction` of the data."""
    counts = RowCounts()
    rows = _load_rows(cfg, cfg.data, section, objective, counts)
    if section.val_data:
        return rows, _load_rows(cfg, section.val_data, section, objective, counts), counts
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = int(len(rows) * section.val_fraction)
    if held == 0 or len(rows) - held < 1:
        return rows, [], counts
    return [rows[i] for i in order[held:]], [rows[i] for i in order[:held]], counts


def _load_rows(cfg, data, section: FineTuneData, objective: str, total: RowCounts) -> list[dict]:
    try:
        rows, counts = load_examples(data, objective, errors=section.errors,
                                     max_bad_fraction=section.max_bad_fraction)
    except TooManyBadRows as e:
        # Name the flags that change the policy, under the command's own section.
        flag = f"--{cfg.objective}"
        raise GraftError(f"{e} (raise the share with {flag}.max_bad_fraction, or stop at the first bad "
                         f"row with {flag}.errors raise)") from None
    total.add(counts)
    return rows


def left_out(read: RowCounts, renderer=None, lost_validation: str | None = None) -> dict:
    """What the run will not train on as given: bad rows skipped, rows cut at or dropped
    for the length limit, a held-out validation share lost whole. Printed when the run
    starts and kept in summary.json (under "data"), so that no row is left out silently.
    Empty when nothing was."""
    stats = {"validation_lost": lost_validation} if lost_validation else {}
    if read.bad:
        stats["bad_rows_skipped"] = {"bad": read.bad, "of": read.rows, "first": read.errors[0]}
    if renderer is not None:
        counts = {k: v for k, v in renderer.counts.to_dict().items() if k != "rows" and v}
        if counts:
            stats["length_limit"] = {"max_length": renderer.config.max_length, "of": renderer.counts.rows, **counts}
    return stats


def render_splits(cfg, section: FineTuneData, renderer, render, train_rows: list, val_rows: list,
                  what: str) -> tuple[list, list, str | None]:
    """(train, validation, warning): both splits rendered by `render`, rows with nothing left
    to train left out (counted). None left of the training rows, or of a `val_data` file,
    is one error that says how many went where and which flags keep them; none left of a
    held-out share is the warning (the run goes on without validation, and says so)."""
    train, lost = _rendered(renderer, render, train_rows)
    if not train:
        raise GraftError(f"{cfg.data}: no {what} to train left of {_why(cfg, renderer, lost)}")
    val, lost = _rendered(renderer, render, val_rows)
    if val or not val_rows:
        return train, val, None
    if section.val_data:
        raise GraftError(f"{section.val_data}: no validation {what} left of {_why(cfg, renderer, lost)}")
    return train, val, (f"no held-out {what} left for validation of {_why(cfg, renderer, lost)}: the run has "
                        f"no validation (--{cfg.objective}.val-data names a file of its own)")


def _rendered(renderer, render, rows: list) -> tuple[list, dict]:
    """`rows` rendered, and what the renderer's counts gained on them."""
    before = renderer.counts.to_dict()
    rendered = [r for r in map(render, rows) if r is not None]
    return rendered, {k: v - before[k] for k, v in renderer.counts.to_dict().items()}


def _why(cfg, renderer, lost: dict) -> str:
    """'N read: how many were too long or had nothing to train, and the flags that keep them'."""
    flag, reasons = f"--{cfg.objective}", []
    if lost["dropped_too_long"]:
        keep = f", or {flag}.overflow truncate keeps their start" if renderer.config.overflow == "drop" else ""
        reasons.append(f"{lost['dropped_too_long']} longer than {renderer.config.max_length} tokens "
                       f"({flag}.max-length raises the limit{keep})")
    if lost["dropped_untrained"]:
        reasons.append(f"{lost['dropped_untrained']} with no token to train, even whole (an empty reply, or none "
                       f"that {flag}.train-on trains)")
    return f"{lost['rows']} read" + (": " + "; ".join(reasons) if reasons else "")


def renderer_for(cfg, section: FineTuneData, tokenizer):
    from graftlm.data.render import RenderConfig, Renderer

    from graftlm.runs import loaded_context

    if tokenizer is None:
        raise GraftError("fine-tuning needs a tokenizer: pass --tokenizer DIR or a model directory with tokenizer.json")
    max_length = section.max_length or cfg.train.seq_len_for(cfg.objective)
    # Rows past a loaded model's context are cut there (or dropped), and counted in the
    # run's data stats ("length_limit"), rather than failing inside its forward.
    context = loaded_context(cfg)
    if context is not None:
        max_length = min(max_length, context)
    return Renderer(tokenizer, RenderConfig(max_length=max_length, overflow=section.overflow,
                                            train_on=section.train_on))


class RenderedRows:
    """SFT rows as token ids + loss masks; `collate` right-pads a micro-batch."""

    def __init__(self, rows, pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {"input_ids": row.input_ids, "loss_mask": row.loss_mask}

    def collate(self, samples: list[dict]) -> dict:
        from graftlm.objectives.dpo import pad_right

        return {"input_ids": pad_right([s["input_ids"] for s in samples], self.pad_id),
                "loss_mask": pad_right([s["loss_mask"] for s in samples], 0).bool(),
                "lengths": torch.tensor([len(s["input_ids"]) for s in samples])}


class PackedRows:
    """Rendered rows packed into fixed-length sequences; `collate` stacks a micro-batch."""

    def __init__(self, sequences: list[dict]):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        seq = self.sequences[index]
        item = {key: torch.from_numpy(seq[key]) for key in ("input_ids", "loss_mask", "position_ids", "document_ids")}
        item["lengths"] = torch.tensor(int(seq["length"]))  # tokens without padding, for throughput
        return item

    def collate(self, samples: list[dict]) -> dict:
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def pack_rendered(rows, seq_len: int, pad_id: int) -> tuple[PackedRows, dict]:
    """(packed data set, packing stats) of rendered rows."""
    from graftlm.data.packing import pack_rows, packing_stats

    sequences = pack_rows(rows, seq_len, pad_id)
    return PackedRows(sequences), packing_stats(sequences)


def rendered_bytes_per_token(rows, tokenizer) -> float | None:
    """UTF-8 bytes per trained token, for bits per byte of the validation loss."""
    tokens = sum(sum(r.loss_mask[1:]) for r in rows)
    if not tokens:
        return None
    text_bytes = sum(len(tokenizer.decode([t for t, m in zip(r.input_ids[1:], r.loss_mask[1:]) if m])
                         .encode("utf-8")) for r in rows)
    return text_bytes / tokens


class SFTObjective:
    name = "sft"

    def __init__(self, config: SFTConfig | None = None):
        self.config = config or SFTConfig()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        targets = packed_targets(batch)
        logp = model_logprobs(model, batch["input_ids"], targets, batch.get("position_ids"),
                              batch.get("document_ids"))
        trained = targets != IGNORE_INDEX
        # Multiplying (not indexing) keeps every parameter in the graph even when a
        # micro-batch has no trained token, so distributed ranks stay in step.
        total = -(logp * trained).sum()
        count = trained.sum()
        metrics = {"trained_tokens": int(count)}
        if "lengths" in batch:  # the trainer's throughput counts tokens, not padding
            metrics["tokens"] = int(batch["lengths"].sum())
        return total, count, metrics


def build_dataset(cfg, tokenizer) -> DataSplits:
    section = cfg.sft
    renderer = renderer_for(cfg, section, tokenizer)
    train_rows, val_rows, read = load_splits(cfg, section, "sft")
    rendered, val, lost_validation = render_splits(cfg, section, renderer, renderer.render, train_rows, val_rows,
                                                   "row")
    identity = {"data": cfg.data, "rows": len(rendered), "render": renderer.counts.to_dict()}
    train, stats = RenderedRows(rendered, tokenizer.pad_id), left_out(read, renderer, lost_validation)
    if section.packing:
        train, stats["packing"] = pack_rendered(rendered, renderer.config.max_length, tokenizer.pad_id)
        identity["packing"] = True
    return DataSplits(train=train, val=RenderedRows(val, tokenizer.pad_id) if val else None,
                      val_bytes_per_token=rendered_bytes_per_token(val, tokenizer) if val else None,
                      vocab_size=tokenizer.vocab_size, identity=identity, stats=stats)


SPEC = ObjectiveSpec(name="sft", help=HELP["sft"],
                     config_cls=SFTConfig, build_dataset=build_dataset,
                     build_objective=lambda cfg, model: SFTObjective(cfg.sft))
