"""`graft serve`: the OpenAI-compatible server for a base model and its LoRA adapters."""

from __future__ import annotations

import sys

from graftlm.adapters_cli import add_allow_other_base, named_adapter
from graftlm.errors import GraftError
from graftlm.placement import add_placement_arguments, placement


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server: one base model, many LoRA adapters",
                              description="Serve /v1/completions, /v1/chat/completions and /v1/models; "
                                          "load and unload adapters at run time.")
    p.add_argument("--model", required=True, help="base model directory (Hugging Face layout)")
    p.add_argument("--adapter", action="append", type=named_adapter, default=[], metavar="[NAME=]DIR",
                   help="load a PEFT adapter at start (repeatable); requests name it NAME, else as its "
                        "directory (runs/lora/final -> lora)")
    add_allow_other_base(p)
    p.add_argument("--adapter-root", metavar="DIR",
                   help='directory under which clients may load adapters: POST /v1/adapters with '
                        'the JSON body {"name": NAME, "path": PATH}, PATH relative to DIR; '
                        "DELETE /v1/adapters/NAME returns once the requests still using it have "
                        "finished (new requests for it get 404 at once)")
    p.add_argument("--served-model-name", help="the base model's id (default: the directory name; for a run's "
                        "final/ directory, the run's name: runs/sft/final -> sft)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-batch", type=int, default=16, help="rows per decode step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step before serving (tens of seconds): faster "
                        "decoding of base-model requests (adapter requests decode eagerly); "
                        "adapters only with --adapter, not --adapter-root")
    add_placement_arguments(p)
    p.set_defaults(handler=serve)


def serve(args) -> int:
    import uvicorn

    from graftlm.serve import build_backend, create_app
    from graftlm.serve.registry import AdapterRequestError, check_adapter_name
    for flag in ("max_batch", "max_queue", "max_body_bytes"):
        if getattr(args, flag) <= 0:
            raise GraftError(f"--{flag.replace('_', '-')} must be positive")
    for name, path in args.adapter:  # before the model loads: a bad name is the operator's, not a client's
        try:
            check_adapter_name(name)
        except AdapterRequestError as e:
            raise GraftError(f"--adapter {name}={path}: {e.message}") from None
    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise GraftError("--adapter: a name is given twice")
    backend = build_backend(args.model, dict(args.adapter), args.adapter_root, args.max_batch,
                            args.max_queue, args.served_model_name, *placement(args), compile=args.compile,
                            allow_other_base=args.allow_other_base)
    app = create_app(backend, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    adapters = ", ".join(names) or "none"
    if args.adapter_root:
        adapters += f"; more from {args.adapter_root}"

    def ready(url: str) -> None:
        print(f"serving {backend.registry.base_name} on {url} (adapters: {adapters})", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = _server_class(uvicorn)(config, ready)
    backend.scheduler.start()
    try:
        server.run()
    finally:
        backend.scheduler.stop()
    return 0


def _server_class(uvicorn):
    """uvicorn's Server, calling `ready(url)` once it accepts requests: at log level
    warning, uvicorn itself says nothing when it is up. (uvicorn is imported only to serve.)"""

    class Server(uvicorn.Server):
        def __init__(self, config, ready):
            super().__init__(config)
            self.ready = ready

        async def startup(self, sockets=None):
            await super().startup(sockets)  # returns once listening; it exits when it cannot bind
            port = self.servers[0].sockets[0].getsockname()[1]  # the port bound, for --port 0 too
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            self.ready(f"http://{host}:{port}")

    return Server
