"""`graft generate` and `graft chat`: the engine from the command line.

`generate` completes one or more prompts in one batch and prints each completion.
`chat` is a REPL on stdin: each line is a user turn, the conversation is rendered with
the tokenizer's chat template (add_generation_prompt) and the reply streams token by
token; EOF (Ctrl-D) or `/exit` ends it, `/reset` starts the conversation over, `/help`
lists these (a line starting with `/` is a command, never sent to the model). Both read a Hugging Face model directory, whose
`tokenizer.json` text prompts need, and optionally an adapter on it (`--adapter DIR`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from graftlm.adapters_cli import add_allow_other_base
from graftlm.errors import GraftError
from graftlm.placement import add_placement_arguments, placement


def register(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="complete prompts with a model (batched)")
    gen.add_argument("--model", required=True, help="Hugging Face model directory")
    add_placement_arguments(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text; repeat for a batch")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user turn in the chat template")
    _add_sampling_arguments(gen, max_new_tokens=128, temperature=0.0)
    gen.set_defaults(handler=generate_command)

    chat = subparsers.add_parser("chat", help="talk to a model on the terminal (streams)")
    chat.add_argument("--model", required=True, help="Hugging Face model directory")
    add_placement_arguments(chat)
    chat.add_argument("--system", default=None, help="system message")
    _add_sampling_arguments(chat, max_new_tokens=512, temperature=0.7)
    chat.set_defaults(handler=chat_command)
    for parser in (gen, chat):
        parser.add_argument("--adapter", metavar="DIR", action="append",
                            help="a LoRA / QLoRA / DoRA adapter (PEFT layout) on --model, its base (one; "
                                 "several on one base: graft serve)")
        add_allow_other_base(parser)
        parser.add_argument("--compile", action="store_true",
                            help="compile the decode step (torch.compile, once at the first "
                                 "token, tens of seconds): faster decoding after that")


def _add_sampling_arguments(parser, max_new_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"0: greedy (default {temperature:g})")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], help="stop string; repeatable")


def _sampling_params(args):
    from graftlm.engine import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop), seed=args.seed)


def _one_adapter(given: list[str] | None) -> str | None:
    """The one --adapter (a second used to replace the first without a word)."""
    if given and len(given) > 1:
        raise GraftError(f"--adapter given {len(given)} times ({', '.join(given)}): this command runs one adapter; "
                         "several on one base, chosen per request, are `graft serve --adapter NAME=DIR ...`")
    return given[0] if given else None


def _load_engine(args):
    from graftlm.engine import Engine, check_generative
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer

    model_dir = args.model
    adapter = _one_adapter(args.adapter)
    if adapter and args.compile:
        # The compiled step computes the base alone: every step would run eagerly after a
        # compile of tens of seconds.
        raise GraftError("--compile decodes the base model only, not an adapter: merge the adapter into its "
                         "base with `graft merge` and compile the merged model")
    device, dtype = placement(args)
    check_generative(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)  # checks the directory, one-line errors
    if adapter:
        from graftlm.adapters import load_adapter
        load_adapter(model, adapter, allow_other_base=args.allow_other_base)
    if not (Path(model_dir) / "tokenizer.json").exists():
        raise GraftError(f"{model_dir}: no tokenizer.json, so text prompts cannot be encoded")
    if args.compile:
        print("compiling the decode step at the first token (once; tens of seconds)", file=sys.stderr)
    return Engine(model, load_tokenizer(model_dir), compile=args.compile)


def generate_command(args) -> int:
    params = _sampling_params(args)  # check the options before loading a model
    engine = _load_engine(args)
    prompts = args.prompt
    if args.chat:
        tok = engine.tokenizer
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}],
                                                      add_generation_prompt=True))
                   for p in prompts]
    prompts = [engine.encode(p) for p in prompts]
    # Refused as serve refuses max_tokens past the context, rather than cut short at it
    # unsaid; a prompt that alone fills the context is the engine's error.
    longest, context = max(map(len, prompts)), engine.model.config.max_seq_len
    if longest < context < longest + params.max_new_tokens:
        raise GraftError(f"--max-new-tokens {params.max_new_tokens} + the longest prompt's {longest} tokens "
                         f"exceeds the model's context of {context} (at most {context - longest} new tokens fit)")
    completions = engine.generate(prompts, params)
    for i, c in enumerate(completions):
        if len(completions) > 1:
            print(f"=== [{i}] ({c.finish_reason}, {len(c.token_ids)} tokens)")
        print(c.text)
    return 0


CHAT_HELP = "/reset starts the conversation over, /exit or Ctrl-D ends it, /help shows this"


def chat_command(args) -> int:
    params = _sampling_params(args)
    engine = _load_engine(args)
    tok, max_len = engine.tokenizer, engine.model.config.max_seq_len
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {args.model}{f' + adapter {args.adapter[0]}' if args.adapter else ''}: {CHAT_HELP}",
              file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if line == "/exit":
            break
        if line.startswith("/"):
            if line == "/reset":
                turns = []
            print(CHAT_HELP if line == "/help" else "(conversation cleared)" if line == "/reset" else
                  f"unknown command {line.split()[0]}: {CHAT_HELP}", file=sys.stderr)
            continue
        if not line:
            continue
        turns.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(system + turns, add_generation_prompt=True))
        # Forget the oldest turns when the conversation outgrows the model's context.
        while len(ids) + min(params.max_new_tokens, 16) >= max_len and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            ids = tok.encode(tok.apply_chat_template(system + turns, add_generation_prompt=True))
        reply = []
        for events in engine.stream([ids], params):
            for event in events:
                reply.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        turns.append({"role": "assistant", "content": "".join(reply)})
    return 0
