"""`graft serve`: the OpenAI-compatible server for a base model and its LoRA adapters."""

from __future__ import annotations

import errno
import socket
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
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        paths = ", ".join(path for name, path in args.adapter if name == twice)
        raise GraftError(f"--adapter: the name '{twice}' is given twice ({paths}); "
                         "give each its own: --adapter NAME=DIR")
    # Bound before the model loads (seconds to minutes), so that a busy port fails at once,
    # and held until uvicorn listens on it, so that nothing can take it meanwhile.
    with _bind(args.host, args.port) as sock:
        backend = build_backend(args.model, dict(args.adapter), args.adapter_root, args.max_batch,
                                args.max_queue, args.served_model_name, *placement(args), compile=args.compile,
                                allow_other_base=args.allow_other_base)
        app = create_app(backend, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
        adapters = ", ".join(names) or "none"
        if args.adapter_root:
            adapters += f"; more from {args.adapter_root}"

        def ready(url: str) -> None:
            print(ready_line(backend, url, adapters), file=sys.stderr, flush=True)

        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
        server = _server_class(uvicorn)(config, ready)
        backend.scheduler.start()
        try:
            server.run(sockets=[sock])
        finally:
            backend.scheduler.stop()
    return 0


def ready_line(backend, url: str, adapters: str) -> str:
    base = backend.registry.base_name
    if backend.base_quantization == "nf4":
        base += " (in 4-bit NF4, shared with its QLoRA adapters)"
    return f"serving {base} on {url} (adapters: {adapters})"


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (as uvicorn binds one) but not yet listening."""
    if not 0 <= port <= 65535:
        raise GraftError(f"--port {port}: must be between 0 and 65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        # A busy or privileged port is the port's fault; anything else (an unknown name,
        # an address this machine does not have) is the host's.
        flag = f"--port {port}" if e.errno in (errno.EADDRINUSE, errno.EACCES) else f"--host {host}"
        raise GraftError(f"{flag}: {e.strerror[:1].lower()}{e.strerror[1:]} (binding {host}:{port})") from None
    return sock


def _server_class(uvicorn):
    """uvicorn's Server, calling `ready(url)` once it accepts requests: at log level
    warning, uvicorn itself says nothing when it is up. (uvicorn is imported only to serve.)"""

    class Server(uvicorn.Server):
        def __init__(self, config, ready):
            super().__init__(config)
            self.ready = ready

        async def startup(self, sockets=None):
            await super().startup(sockets)  # returns once listening
            port = self.servers[0].sockets[0].getsockname()[1]  # the port bound, for --port 0 too
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            self.ready(f"http://{host}:{port}")

    return Server
