"""Batched generation with a KV cache: the one place that decodes.

Design choices:
- Three layers. `Sequence` is one row's state (prompt, sampling params, its own
  random generator, output so far, stop logic, text released so far). `Batch` holds the
  running rows and their shared `KVCache`: `add` prefills new rows and merges them in,
  `step` decodes one token for every row, finished rows leave the batch at once.
  `Engine.generate` / `Engine.stream` are thin loops over one `Batch`.
- Continuous batching (the server) drives a `Batch` directly: between two `step()`
  calls it may `add()` requests (each with its own `SamplingParams`, adapter and key)
  and `remove()` keys (cancelled clients). New rows are prefilled alone, then both
  caches are copied right-aligned into a fresh cache, so every row writes its next key
  at the same slot. Events carry the request's `key`, so the caller never tracks rows:

      batch = Batch(engine, row_adapters=True)        # forwards use row_adapters()
      events = batch.add([Request(ids, params, key=seq_id, adapter="a1")])
      while batch:                                    # between steps: add / remove
          events = batch.step()                       # one TokenEvent per row
- Rows are LEFT-padded: `cache.key_valid` marks real slots and each row's position ids
  count only its real tokens, so a row gives the same tokens in a padded batch as alone
  (up to float rounding in the batched matmuls). Leading slots that no row uses any
  more are trimmed when rows leave, so the cache does not grow without bound.
- Each row samples with its own `torch.Generator` (seeded from `SamplingParams.seed`,
  `row_seed(seed, i)` for the i-th prompt sharing one params object), so a row's samples do not
  depend on which other rows share the batch. Greedy rows are one batched argmax; the
  others sample in one batched pass too (`graftlm.sampling`), each from a uniform number
  its own generator draws; top-k uses `topk` and top-p sorts only when it is on.
- Stop: any of `stop_ids` (default: the tokenizer's `stop_ids`, else the config's EOS
  ids, and the EOS ids of the model's generation_config.json) or any `stop` string; the
  stop token stays in `token_ids` (as in transformers), the text ends before the stop
  token / stop string. While streaming, text that may be the start of a stop string (or
  half a UTF-8 character) is held back until it is not.
- Every forward runs under `torch.inference_mode` and asks for the last position's
  logits only. With `adapters`, each forward runs inside
  `graftlm.adapters.row_adapters(model, names of the rows in this forward)`.
- `Engine(compile=True)` decodes with `torch.compile(model.decode_step)` over
  `DecodeSlot` views of the cache (written slots plus the new one); with dynamic
  shapes one graph serves every step, batch size and capacity (batch 1 is its own
  graph). Inductor's `freezing` folds the weights into the graph as constants, prepacked
  for oneDNN / MKL (most of the gain over eager; it copies the weights once), and
  `cpp_wrapper` calls the kernels from C++, not Python.
  In bf16 / fp16 on the CPU, inductor also benchmarks its own generated GEMMs against
  oneDNN's per shape (`max_autotune`): at batch 1 they stream the weights about 1.5x
  faster (`CompiledDecodeStep._gemm_options`), for about twice the compile time.
  Prefills stay eager (one per request). Frozen weights: inference only. With adapters
  loaded, the compiled step computes the base alone (their layers disabled while it
  runs) for steps whose rows all ask for no adapter; a step with an adapter row runs
  eagerly (per-row routing is Python data: a graph for every mix of rows).
- RL rollouts (`--grpo.sampling.compile`): `CompiledDecodeStep(model, live_weights=True)`,
  kept for the run and given to each rollout's `Engine(..., compiled_decode=...)`, reads
  the weights, as they train, at every call (no freezing), active adapter included: eager,
  ~70 operators per block a token bound a GPU's sampling (1B: ~10 ms vs 0.5 ms of reads).
"""

from __future__ import annotations

import hashlib
import sys
import types
import weakref
from dataclasses import dataclass, replace
from typing import Hashable, Iterator, Sequence as Seq

import torch

from graftlm.errors import GraftError
from graftlm.models.transformer import DecodeSlot, KVCache
from graftlm.sampling import sample_tokens
from graftlm.tokenizer import generation_eos_ids


def row_seed(seed: int, i: int) -> int:
    """The seed of row `i` of many sampled with one `seed` (prompts sharing one params
    object, a server request's `n` choices): row 0 samples with `seed` itself (one row
    equals a lone generation with that seed); later rows with a hash of (seed, i), so
    that nearby seeds share no samples (with `seed + i`, seeds 1 and 2 with three rows
    each would share two)."""
    if i == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{i}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@dataclass
class SamplingParams:
    """How one row is sampled and when it stops. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop: Seq[str] = ()
    stop_ids: Seq[int] | None = None  # None: the tokenizer's / config's EOS ids; () for none
    seed: int | None = None  # None: drawn from torch's global generator

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                  ("temperature", self.temperature >= 0, "0 or more"),
                  ("top_k", self.top_k >= 0, "0 (off) or more"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]")]
        for name, ok, want in checks:
            if not ok:
                raise GraftError(f"sampling field '{name}': must be {want}, got {getattr(self, name)!r}")
        if any(not s for s in self.stop):
            raise GraftError("sampling field 'stop': stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Request:
    """One prompt to add to a `Batch`; `key` names it in the events it produces."""

    prompt_ids: list[int]
    params: SamplingParams
    key: Hashable = None
    adapter: str | None = None


@dataclass
class TokenEvent:
    """One new token of one row. `text` is the text released by it (may be "")."""

    key: Hashable
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the row's last token


@dataclass
class Completion:
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


class Sequence:
    """One row: its prompt, output so far, random generator and stop logic."""

    def __init__(self, request: Request, limit: int, stop_ids: frozenset[int], tokenizer,
                 want_text: bool):
        self.key, self.adapter, self.params = request.key, request.adapter, request.params
        self.prompt_ids = list(request.prompt_ids)
        self.limit = limit  # max new tokens, capped by the model's context
        self.stop_ids = stop_ids
        self.tokenizer = tokenizer
        # Text is decoded every step only when someone reads it (stream) or stop strings
        # need it; otherwise once at the end.
        self.track_text = tokenizer is not None and (want_text or bool(self.params.stop))
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self.released = 0  # characters of `text` already handed out
        self.generator = None
        if not self.params.greedy:
            seed = self.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def remaining(self) -> int:
        return self.limit - len(self.output)

    def append(self, token: int) -> TokenEvent:
        self.output.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.limit:
            self.finish_reason = "length"
        released = ""
        if self.track_text:
            self._update_text()
            released = self._release()
        return TokenEvent(self.key, token, released, self.finish_reason)

    def content_ids(self) -> list[int]:
        """Output ids that make the text: without a final stop token."""
        stopped_by_id = self.output and self.output[-1] in self.stop_ids
        return self.output[:-1] if stopped_by_id else self.output

    def _update_text(self) -> None:
        old_len = len(self.text)
        self.text = self.tokenizer.decode(self.content_ids())
        longest = max((len(s) for s in self.params.stop), default=0)
        start = max(0, min(old_len, self.released) - longest)
        cut = min((i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def _release(self) -> str:
        end = len(self.text)
        if self.finish_reason is None:
            end = len(self.text.rstrip("\ufffd"))  # maybe half a UTF-8 character so far
            for stop in self.params.stop:  # the text may be the start of a stop string
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[end - n:end] == stop[:n]:
                        end -= n
                        break
        end = max(end, self.released)
        piece, self.released = self.text[self.released:end], end
        return piece

    def completion(self) -> Completion:
        if self.tokenizer is not None and not self.track_text:
            self.text = self.tokenizer.decode(self.content_ids())
        text = self.text if self.tokenizer is not None else None
        return Completion(list(self.output), text, self.finish_reason or "length",
                          len(self.prompt_ids))


class Batch:
    """The running rows of a generation and their shared KV cache."""

    def __init__(self, engine: "Engine", row_adapters: bool = False, want_text: bool = True):
        self.engine = engine
        self.row_adapters = row_adapters  # run forwards inside adapters.row_adapters
        self.want_text = want_text
        self.rows: list[Sequence] = []
        self.cache: KVCache | None = None
        self.next_input: torch.Tensor | None = None  # [B, 1] the token each row feeds next
        self.positions: torch.Tensor | None = None  # [B] position id of that token

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: list[Request]) -> list[TokenEvent]:
        """Prefill `requests` (one forward), sample their first token, join the batch."""
        return self.add_sequences([self.engine.new_sequence(r, self.want_text) for r in requests])

    # Batch's own tensors are made under inference mode too: a compiled decode step
    # guards on whether its inputs are inference tensors, and mixing would recompile.
    @torch.inference_mode()
    def add_sequences(self, rows: list[Sequence]) -> list[TokenEvent]:
        if not rows:
            return []
        engine = self.engine
        prompt_len = max(len(r.prompt_ids) for r in rows)
        capacity = prompt_len + max(r.remaining for r in rows)
        cache = KVCache.allocate(engine.model.config, len(rows), capacity, engine.device, engine.dtype)
        ids = torch.full((len(rows), prompt_len), engine.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, prompt_len - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
        ids = ids.to(engine.device)
        real = torch.arange(prompt_len, device=engine.device)[None, :] >= \
            torch.tensor([prompt_len - len(r.prompt_ids) for r in rows], device=engine.device)[:, None]
        cache.key_valid[:, :prompt_len] = real
        cache.key_valid[:, prompt_len:] = True  # every later slot is written by every row
        positions = (real.cumsum(1) - 1).clamp(min=0)
        logits = engine.forward(ids, positions, cache, rows if self.row_adapters else None)
        tokens, next_input = engine.sample(logits, rows)
        events = [row.append(t) for row, t in zip(rows, tokens)]
        new_positions = positions[:, -1] + 1
        if self.rows:
            self._merge(rows, cache, next_input, new_positions)
        else:
            self.rows, self.cache, self.next_input, self.positions = rows, cache, next_input, new_positions
        self._drop_finished()
        return events

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Decode one token for every row; rows that finish leave the batch."""
        if not self.rows:
            return []
        engine = self.engine
        logits = engine.forward(self.next_input, self.positions[:, None], self.cache,
                                self.rows if self.row_adapters else None)
        self.positions += 1
        tokens, self.next_input = engine.sample(logits, self.rows)
        events = [row.append(t) for row, t in zip(self.rows, tokens)]
        self._drop_finished()
        return events

    @torch.inference_mode()
    def remove(self, keys) -> None:
        """Drop the rows of `keys` (e.g. cancelled requests); unknown keys are ignored."""
        keys = set(keys)
        self._keep([i for i, r in enumerate(self.rows) if r.key not in keys])

    # -- cache bookkeeping ------------------------------------------------------------

    def _drop_finished(self) -> None:
        if any(r.finish_reason is not None for r in self.rows):
            self._keep([i for i, r in enumerate(self.rows) if r.finish_reason is None])

    def _keep(self, kept: list[int]) -> None:
        if len(kept) == len(self.rows):
            return
        if not kept:
            self.rows, self.cache, self.next_input, self.positions = [], None, None, None
            return
        index = torch.tensor(kept, device=self.engine.device)
        self.rows = [self.rows[i] for i in kept]
        c = self.cache
        # Slots before every remaining row's first real token are dead: trim them before
        # selecting the rows, so that the rows' one copy holds only live slots.
        first = int(c.key_valid[index, :c.length].int().argmax(1).min())
        if first > 0:
            c.keys = [k[:, :, first:] for k in c.keys]
            c.values = [v[:, :, first:] for v in c.values]
            c.key_valid = c.key_valid[:, first:]
            c.length -= first
        c.select_rows(index)
        self.next_input = self.next_input.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

    def _merge(self, rows, cache: KVCache, next_input, positions) -> None:
        """Copy both caches, right-aligned, into one new cache with room for every row."""
        old = self.cache
        length = max(old.length, cache.length)
        everyone = self.rows + rows
        # One slot more than the rows will write, as in `add_sequences` (whose rows have
        # not sampled yet): the written slots plus the next are then never the whole
        # buffer, whose contiguity a compiled decode step would specialize on.
        capacity = length + max(r.remaining for r in everyone) + 1
        merged = KVCache.allocate(self.engine.model.config, len(everyone), capacity,
                                  self.engine.device, self.engine.dtype)
        merged.key_valid.fill_(True)
        start = 0
        for part in (old, cache):
            n, offset = part.key_valid.shape[0], length - part.length
            rows_slice = slice(start, start + n)
            merged.key_valid[rows_slice, :offset] = False
            merged.key_valid[rows_slice, offset:length] = part.key_valid[:, :part.length]
            for dst, src in zip(merged.keys + merged.values, part.keys + part.values):
                # The padding slots are masked, but torch.empty may hold NaN there and
                # attention's 0 * NaN would still reach the row: zero them.
                dst[rows_slice, :, :offset] = 0
                dst[rows_slice, :, offset:length] = src[:, :, :part.length]
            start += n
        merged.length = length
        self.rows, self.cache = everyone, merged
        self.next_input = torch.cat([self.next_input, next_input])
        self.positions = torch.cat([self.positions, positions])


class Engine:
    """Generation over a `Decoder` (and optionally its tokenizer).

        engine = Engine(load_model(d), load_tokenizer(d))
        [c] = engine.generate(["Once upon"], SamplingParams(temperature=0, max_new_tokens=32))
        c.token_ids, c.text, c.finish_reason
        for events in engine.stream(prompts, params): ...   # TokenEvent per row per step

    `device` / `dtype` move the model (in place) before generating. `compile=True`
    compiles the decode step at its first use (tens of seconds; once for batch 1 and
    once for larger batches): for a model whose weights no longer change. With
    adapters (loaded before its first generation), only steps whose rows (per-row
    `adapters`) all ask for none run compiled.
    """

    def __init__(self, model, tokenizer=None, device=None, dtype=None, compile: bool = False,
                 compiled_decode: CompiledDecodeStep | None = None):
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        # The embedding's dtype is the compute dtype (a quantized base keeps it too).
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        model.reset_rope(self.device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        if tokenizer is not None:
            self.pad_id, stops = tokenizer.pad_id, tokenizer.stop_ids or cfg.eos_ids
        else:
            self.pad_id, stops = cfg.pad_token_id or 0, cfg.eos_ids
        # transformers' generate stops on the generation config's EOS ids, which may list
        # more than config.json and the tokenizer (Llama 3.1's <|eom_id|>).
        generation = generation_eos_ids(getattr(model, "generation_config", None) or {})
        self.default_stop_ids = sorted({i for i in [*stops, *generation] if 0 <= i < cfg.vocab_size})
        # A caller's compiled step (RL rollouts keep one for the run), else one of its own.
        self.compiled_decode = compiled_decode or (CompiledDecodeStep(model) if compile else None)

    def warm_up(self) -> None:
        """Compile the decode step's graphs (batch 1 and larger batches) now rather than
        at the first requests (a server does this before it listens)."""
        greedy = SamplingParams(max_new_tokens=2, temperature=0, stop_ids=())
        for rows in (1, 2):
            # Rows that name no adapter: the compiled step serves them with adapters loaded too.
            self.generate([[self.pad_id]] * rows, greedy, adapters=[None] * rows)

    # -- the high-level API -----------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[str | None] | None = None) -> list[Completion]:
        """Complete every prompt (token id lists or strings); results in prompt order."""
        batch, rows = self._start(prompts, params, adapters, want_text=False)
        batch.add_sequences(rows)
        while batch:
            batch.step()
        return [row.completion() for row in rows]

    def stream(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
               adapters: list[str | None] | None = None) -> Iterator[list[TokenEvent]]:
        """Yield, per step, one `TokenEvent` per running row; `key` is the prompt index."""
        batch, rows = self._start(prompts, params, adapters, want_text=True)
        yield batch.add_sequences(rows)
        while batch:
            yield batch.step()

    def _start(self, prompts, params, adapters, want_text) -> tuple[Batch, list[Sequence]]:
        if isinstance(prompts, (str, bytes)) or not prompts:
            raise GraftError("prompts: expected a non-empty list of strings or token id lists")
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            # One params object for many prompts: a seed per row, so rows differ.
            params = [params if params.seed is None else replace(params, seed=row_seed(params.seed, i))
                      for i in range(len(prompts))]
        if len(params) != len(prompts) or (adapters is not None and len(adapters) != len(prompts)):
            raise GraftError("generate: params and adapters need one entry per prompt")
        rows = [self.new_sequence(Request(self.encode(p), sp, key=i,
                                          adapter=adapters[i] if adapters else None), want_text)
                for i, (p, sp) in enumerate(zip(prompts, params))]
        return Batch(self, row_adapters=adapters is not None, want_text=want_text), rows

    # -- the step API (used by Batch; a scheduler may call it too) ----------------------

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GraftError("a text prompt needs a tokenizer (the model directory has no tokenizer.json)")
            return self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
        return [int(t) for t in prompt]

    def new_sequence(self, request: Request, want_text: bool) -> Sequence:
        n, max_len = len(request.prompt_ids), self.model.config.max_seq_len
        if n == 0:
            raise GraftError(f"prompt {request.key}: is empty")
        if n >= max_len:
            raise GraftError(f"prompt {request.key}: {n} tokens leave no room in the model's "
                             f"context of {max_len}")
        vocab = self.model.config.vocab_size
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise GraftError(f"prompt {request.key}: token ids must be in [0, {vocab})")
        params = request.params
        if params.stop and self.tokenizer is None:
            raise GraftError("sampling field 'stop': stop strings need a tokenizer")
        stop_ids = frozenset(self.default_stop_ids if params.stop_ids is None else params.stop_ids)
        limit = min(params.max_new_tokens, max_len - n)
        return Sequence(request, limit, stop_ids, self.tokenizer, want_text)

    @torch.inference_mode()
    def forward(self, ids, positions, cache, rows=None) -> torch.Tensor:
        """Last-position logits [B, V] for `ids` [B, T] written into `cache`."""
        # A one-token prompt's prefill stays eager too: a single slot would be a graph of
        # its own (dimensions of size 1 are specialized).
        if (self.compiled_decode is not None and ids.shape[1] == 1 and cache.length > 0
                and self.compiled_decode.serves(rows)):
            logits = self.compiled_decode(ids, positions, DecodeSlot.next_of(cache))
            cache.length += 1
            return logits
        if rows is None:
            return self.model(ids, position_ids=positions, cache=cache, last_token_only=True)[:, -1]
        from graftlm.adapters import row_adapters
        with row_adapters(self.model, [r.adapter for r in rows]):
            return self.model(ids, position_ids=positions, cache=cache, last_token_only=True)[:, -1]

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[Sequence]) -> tuple[list[int], torch.Tensor]:
        """One token per row: (python ints, a [B, 1] tensor to feed next)."""
        chosen = logits.argmax(-1)
        if all(r.generator is None for r in rows):
            return chosen.tolist(), chosen[:, None]
        sampled = [i for i, row in enumerate(rows) if row.generator is not None]
        params = [rows[i].params for i in sampled]
        chosen[sampled] = sample_tokens(logits[sampled], [p.temperature for p in params], [p.top_k for p in params],
                                        [p.top_p for p in params], [rows[i].generator for i in sampled])
        return chosen.tolist(), chosen[:, None]


def check_generative(model_dir) -> None:
    """Refuse a reward model directory (`graft reward`) before loading it as a decoder,
    whose error (no lm_head.weight) would not say what the directory is."""
    from graftlm.models.heads import is_scalar_model_dir

    if is_scalar_model_dir(model_dir):
        raise GraftError(f"{model_dir}: a reward model (graft reward) scores text and cannot generate; "
                         f"score preference pairs with: graft eval --model {model_dir} --data PAIRS.jsonl")


class CompiledDecodeStep:
    """`model.decode_step` through `torch.compile`, with the inductor settings that make
    it fast (see the module's docstring); called as `model.decode_step` is. `live_weights`:
    no freezing, the parameters stay graph inputs, read at every call (RL rollouts)."""

    def __init__(self, model, live_weights: bool = False):
        self.module = _DecodeStep(model)
        self.live_weights = live_weights
        self._adapter_layers: list | None = None  # see `adapter_layers`
        self.compiled = torch.compile(self.module, dynamic=True, fullgraph=True)
        self.inductor_options = {"freezing": not live_weights, "cpp_wrapper": True, **self._gemm_options()}
        # Dynamo keeps the graphs on the code object, and inductor keeps every module it
        # generated (frozen weights are their globals) past the engine's life: both go with it.
        self._generated: list = []  # inductor's modules made by this engine's compiles
        weakref.finalize(self, _forget_graphs, self.module.forward.__code__, self._generated)

    @property
    def adapter_layers(self) -> list:
        """The model's adapter layers, found at the first decode step and kept: a walk of
        every module costs ~70 us of a 3 ms step. The graph is traced then too, so the
        adapters a compiled engine serves are those loaded before its first generation
        (a server loads its own before warming up)."""
        if self._adapter_layers is None:
            from graftlm.adapters.inject import adapter_layers
            self._adapter_layers = adapter_layers(self.module.model)
        return self._adapter_layers

    def serves(self, rows) -> bool:
        """Whether a decode step of `rows` (None: no per-row adapters) runs compiled: the
        graph computes the base, so not when a row, or the model's active adapter, adds one;
        with live weights, the model as it is: rows without per-row adapters. Never under a
        dispatch mode (the trainer's tensor-memory tracker): dynamo cannot trace through one."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is not None:
            return False
        if self.live_weights:
            return rows is None
        if rows is None:
            return not any(layer.adapter_names for layer in self.adapter_layers)
        return all(row.adapter is None for row in rows)

    def __call__(self, input_ids, position_ids, slot: DecodeSlot) -> torch.Tensor:
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as shapes_config
        from torch._inductor.codecache import PyCodeCache

        from graftlm.adapters.inject import layers_set

        known = len(PyCodeCache.modules)
        # Set while tracing and compiling, i.e. at the call: dynamo must already treat the
        # parameters as constants for inductor to freeze them (a compile `options` entry
        # reaches inductor only). Scoped, so training's compiled blocks never freeze.
        # Without duck shaping, a batch or slot count that happens to equal another size
        # at the first call (the kv heads, the other) stays its own dynamic dimension.
        # Adapter layers are disabled while the graph runs, unless live (see `serves`).
        base_only = [] if self.live_weights else self.adapter_layers
        with inductor_config.patch(**self.inductor_options), \
                shapes_config.patch(use_duck_shape=False), \
                layers_set(base_only, "disabled", True):
            logits = self.compiled(input_ids, position_ids, slot)
        if len(PyCodeCache.modules) != known:  # this call compiled a graph
            self._generated.extend(PyCodeCache.modules[known:])
        return logits

    def _gemm_options(self) -> dict:
        """bf16 / fp16 on the CPU: let inductor generate the matrix products (its C++ GEMM
        template) where its benchmark finds them faster than oneDNN's. At batch 1 a decode
        step's products are matrix-vector products that oneDNN runs at about half the
        memory bandwidth (57 calls, each with a fixed cost). Measured on the generation
        benchmark's 30M model: bf16 step 4.7 -> 3.1 ms at batch 1, 9.8 -> 5.9 ms at
        batch 8, for about twice the compile time (the benchmarking of each shape). Not
        in float32: MKL's products are already near the bandwidth there (6.9 -> 6.6 ms
        at batch 1) and the template's pick was slower at batch 8 (14.4 -> 15.7 ms)."""
        weight = next(self.module.parameters())
        if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
            return {}
        # Its tables of benchmarked choices (dozens of lines per shape) are not printed:
        # a user sees "compiling...", then text.
        return {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "autotune_num_choices_displayed": 0}


def _forget_graphs(code, generated: list) -> None:
    from torch._dynamo.eval_frame import remove_from_cache
    from torch._inductor.codecache import PyCodeCache

    remove_from_cache(code)
    mine = {id(module) for module in generated}
    PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in mine]
    for module in generated:  # inductor also registers them as modules of the process
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
    generated.clear()


class _DecodeStep(torch.nn.Module):
    """Compiled as a module, not as the bound method: inductor freezes the parameters
    of the module it compiles."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # A code object of its own for this engine's `forward`: dynamo keeps compiled
        # graphs per code object, so engines sharing one would pile graphs up to
        # dynamo's recompile limit and then fail.
        shared = type(self).forward
        own = types.FunctionType(shared.__code__.replace(), shared.__globals__, shared.__name__)
        self.forward = types.MethodType(own, self)

    def forward(self, input_ids, position_ids, slot):
        return self.model.decode_step(input_ids, position_ids, slot)

