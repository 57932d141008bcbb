"""``lepton serve MODEL``: flags (named as in ``vllm serve``), model loading with progress, uvicorn.

Shutdown on SIGTERM / SIGINT: uvicorn stops accepting connections, gives in-flight requests
GRACE_SECONDS to finish, then cancels them (their streams abort and free their blocks); the
engine loop is stopped last. The process exits well within 10 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from lepton.entrypoints.cli.io import add_engine_arguments, engine_kwargs, positive_int

GRACE_SECONDS = 4


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients use in 'model' (default: the model folder's name)")
    parser.add_argument("--api-key", action="append", default=None,
                        help="accepted Bearer key (repeatable; also LEPTON_API_KEY, comma-separated)")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template file to use instead")
    add_engine_arguments(parser)
    parser.add_argument("--max-pending", type=positive_int, default=1024, help="queued requests before 429")
    parser.add_argument("--max-body-bytes", type=positive_int, default=10 << 20, help="request body limit (413)")
    parser.add_argument("--max-prompts", type=positive_int, default=256, help="prompts per request (413)")
    parser.add_argument("--max-n", type=positive_int, default=16)
    parser.add_argument("--max-logprobs", type=positive_int, default=20)
    parser.add_argument("--max-stop", type=positive_int, default=16)
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def _api_keys(args) -> list[str]:
    """The accepted keys: every --api-key, then LEPTON_API_KEY's comma-separated ones. An empty
    key (``--api-key ""`` from an unset shell variable, or a blank LEPTON_API_KEY) is refused:
    taken as "no key" it would silently serve without authentication."""
    keys = []
    for key in args.api_key or []:
        if not key.strip():
            raise ValueError("--api-key is empty (an unset shell variable?); give a key, or leave the "
                             "option out to serve without authentication")
        keys.append(key.strip())
    env = os.environ.get("LEPTON_API_KEY")
    if env is not None:
        env_keys = [k.strip() for k in env.split(",")]
        if not all(env_keys):
            raise ValueError("LEPTON_API_KEY is set but holds an empty key; set it to comma-separated "
                             "keys, or unset it to serve without authentication")
        keys += env_keys
    return keys


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lepton.engine.engine import Engine
    from lepton.entrypoints.server.api_server import build_app

    try:   # before the model loads: a bad key setting fails at once
        api_keys = _api_keys(args)
    except ValueError as err:
        print(f"lepton serve: {err}", file=sys.stderr)
        return 2
    chat_template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        except OSError as err:
            print(f"lepton serve: cannot read --chat-template: {err.strerror}", file=sys.stderr)
            return 2
    print(f"lepton: loading {args.model} ...", flush=True)
    progress = logging.StreamHandler(sys.stdout)   # the loader reports each shard as it is read
    progress.setFormatter(logging.Formatter("lepton: %(message)s"))
    loader_log = logging.getLogger("lepton.model_executor.loader")
    loader_log.addHandler(progress)
    loader_log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        engine = Engine(args.model, **engine_kwargs(args))
        app = build_app(engine, served_model_name=args.served_model_name, api_keys=api_keys,
                        chat_template=chat_template, max_body_bytes=args.max_body_bytes,
                        max_pending=args.max_pending, max_prompts=args.max_prompts, max_n=args.max_n,
                        max_logprobs=args.max_logprobs, max_stop=args.max_stop)
    except (ValueError, FileNotFoundError) as err:
        print(f"lepton serve: {err}", file=sys.stderr)
        return 1
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    packed = [m.packed for m in engine.model.modules() if getattr(m, "packed", None) is not None]
    packed += [h for h in [getattr(engine.model, "lm_head_packed", None)] if h is not None]
    weights += sum(4 * p.out_features * p.in_features for p in packed)   # prepacked: float32
    cache_note = (f", KV cache {engine.num_kv_blocks} blocks of {engine.config.block_size} tokens"
                  if engine.num_kv_blocks else "")
    print(f"lepton: loaded in {time.perf_counter() - start:.1f} s on {engine.device} ({engine.dtype}), "
          f"weights {_gib(weights)}{cache_note}", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=GRACE_SECONDS, access_log=False)
    server = _Server(config)
    server.ready_line = f"lepton: ready at http://{args.host}:{args.port} (OpenAI API under /v1)"
    server.run()
    return 0


class _Server:
    """uvicorn.Server that prints one ready line once the socket is listening."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            ready_line = ""

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    print(self.ready_line, flush=True)

        return Server(config)
