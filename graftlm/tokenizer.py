"""Tokenizers: load `tokenizer.json` (HF `tokenizers`), train byte-level BPE, chat templates.

Chat templates are Jinja, rendered the way `transformers` renders them (a sandboxed
environment with `raise_exception` and `tojson`), so a model's own template gives the
same text here as in `transformers`. Models trained from scratch get a ChatML template
and special tokens for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from graftlm.errors import GraftError, read_json, read_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML, the default for models trained from scratch. Each turn ends with <|im_end|>,
# which the model learns and generation stops on.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template around it."""

    backend: object
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    add_bos: bool = False  # prepend BOS when encoding a whole document
    path: Path | None = None
    # EOS ids of the generation_config.json beside tokenizer.json (a model directory's):
    # transformers' generate stops on them, e.g. Llama 3.1's <|eom_id|> and <|eot_id|>.
    generation_eos_ids: tuple[int, ...] = ()
    _template_cache: dict = field(default_factory=dict, repr=False)

    # -- ids ------------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a generation: EOS, the chat end-of-turn token, and the EOS
        ids of the model's generation_config.json."""
        ids = [self.eos_id, self.token_id(IM_END), self.token_id("<|eot_id|>"),
               self.token_id("<|end_of_text|>"), *self.generation_eos_ids]
        return sorted({i for i in ids if i is not None and 0 <= i < self.vocab_size})

    # -- text <-> ids ---------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            **kwargs) -> str:
        template = self.chat_template or DEFAULT_CHAT_TEMPLATE
        compiled = self._template_cache.get(template)
        if compiled is None:
            compiled = self._template_cache[template] = _compile_template(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                               **kwargs)

    # -- files ------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": None,
            "add_bos_token": self.add_bos, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": self.chat_template or DEFAULT_CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                     ("pad_token", self.pad_token)) if v}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return out


def _raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _generation_tag_extension():
    """`{% generation %}...{% endgeneration %}` (TRL's assistant markers) render their body.

    graftlm finds assistant spans by rendering prefixes, so the markers need no meaning
    here; they only must not break templates that carry them.
    """
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


def _compile_template(template: str):
    # The same environment transformers uses: sandboxed, so a template cannot reach
    # Python objects, with trim_blocks / lstrip_blocks and the two helper functions.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_tag_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def read_generation_config(directory: str | Path) -> dict:
    """A model directory's generation_config.json ({} when it has none)."""
    path = Path(directory) / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def generation_eos_ids(generation: dict, where: str | Path = "generation_config.json") -> list[int]:
    """The `eos_token_id` of a generation config (an id, a list of ids, or none) as a list."""
    value = generation.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise GraftError(f"{where}: field 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return ids


def _post_processor_adds_bos(backend, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (a TemplateProcessing, how
    Llama 3's tokenizer adds <|begin_of_text|>), as transformers' encoding then does."""
    if bos_id is None or backend.post_processor is None:
        return False
    return backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` and `tokenizer_config.json` from a directory.

    BOS is added to whole documents as transformers adds it: as tokenizer_config.json's
    `add_bos_token` says when it says so (transformers then rewrites the post-processor),
    else when tokenizer.json's post-processor adds it."""
    from tokenizers import Tokenizer as Backend

    directory = Path(path)
    tok_file = directory / "tokenizer.json"
    if directory.is_file():
        hint = (f": pass its directory {directory.parent}/" if (directory.parent / "tokenizer.json").is_file()
                else ", not a directory with tokenizer.json")
        raise GraftError(f"{directory}: is a file{hint}")
    if not tok_file.exists():
        from graftlm.models.hf import run_directory_hint
        raise GraftError(f"{directory}: no tokenizer.json{run_directory_hint(directory)}")
    try:
        backend = Backend.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise GraftError(f"{tok_file}: not a valid tokenizer file ({e})") from None
    config = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        config = read_json(config_file)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.exists():
        template = read_text(jinja_file)
    bos_token = _token_content(config.get("bos_token"))
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:
        add_bos = _post_processor_adds_bos(backend, None if bos_token is None else backend.token_to_id(bos_token))
    generation_file = directory / "generation_config.json"
    return Tokenizer(
        backend=backend,
        bos_token=bos_token,
        eos_token=_token_content(config.get("eos_token")),
        pad_token=_token_content(config.get("pad_token")),
        chat_template=template,
        add_bos=add_bos,
        path=directory,
        generation_eos_ids=tuple(generation_eos_ids(read_generation_config(directory), generation_file)),
    )


def train_tokenizer(texts: Iterator[str], vocab_size: int,
                    special_tokens: list[str] | None = None) -> Tokenizer:
    """Train byte-level BPE on an iterator of texts (uses every core)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    special_tokens = special_tokens or DEFAULT_SPECIAL_TOKENS
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens) + 1:
        raise GraftError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least "
                         f"{len(alphabet) + len(special_tokens) + 1}")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                     chat_template=DEFAULT_CHAT_TEMPLATE)
