"""``lepton serve MODEL``: flags (named as in ``vllm serve``), model loading with progress, uvicorn.

Shutdown on SIGTERM / SIGINT: uvicorn stops accepting connections, and in-flight requests get
--timeout-graceful-shutdown seconds (GRACE_SECONDS) to finish; then the drain (drain.py) ends the
rest cleanly: streams with an error event and ``[DONE]``, other requests with a JSON 503, their
engine work aborted. uvicorn's own deadline comes DRAIN_MARGIN_SECONDS later, as a backstop.
The engine loop is stopped last. With the defaults the process exits well within 10 s.

Connection limits (connections.py, middleware.py), each with a flag: request headers must
arrive within --timeout-header seconds, a body within --timeout-body (408 past either), an idle
kept-alive connection closes after --timeout-keep-alive, and connections beyond
--max-connections are answered 503 at once.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time

from lepton.entrypoints.cli.io import add_engine_arguments, engine_kwargs, positive_int
from lepton.entrypoints.server.tool_calls import PARSERS

GRACE_SECONDS = 4
DRAIN_MARGIN_SECONDS = 2   # uvicorn's deadline, after ours: time for the clean endings to go out


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


positive_float.__name__ = "number > 0"   # argparse names the type in "invalid <name> value"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients use in 'model' (default: the model folder's name)")
    parser.add_argument("--api-key", action="append", default=None,
                        help="accepted Bearer key (repeatable; also LEPTON_API_KEY, comma-separated)")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template file to use instead")
    parser.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                        help='how to read tool calls from answers, for tool_choice "auto" (default: "auto" '
                             "is refused; \"required\" and named functions need no parser)")
    add_engine_arguments(parser)
    parser.add_argument("--max-pending", type=positive_int, default=1024, help="queued requests before 429")
    parser.add_argument("--max-body-bytes", type=positive_int, default=10 << 20, help="request body limit (413)")
    parser.add_argument("--max-prompts", type=positive_int, default=256, help="prompts per request (413)")
    parser.add_argument("--max-prompt-chars", type=positive_int, default=2 << 20,
                        help="characters of text one request may have tokenized, all its prompts or "
                             "messages together; checked before tokenizing (413; default %(default)d)")
    parser.add_argument("--max-stream-buffer-tokens", type=positive_int, default=1024,
                        help="output tokens a stream may have waiting for its client to read them; past "
                             "that the request is aborted (default %(default)d)")
    parser.add_argument("--max-n", type=positive_int, default=16)
    parser.add_argument("--max-logprobs", type=positive_int, default=20)
    parser.add_argument("--max-stop", type=positive_int, default=16)
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    add_isolation_arguments(parser)
    add_connection_arguments(parser)


def add_isolation_arguments(parser: argparse.ArgumentParser) -> None:
    """What one user can learn of another's prompts (README, "Prefix cache and privacy")."""
    group = parser.add_argument_group("isolation")
    group.add_argument("--cache-salt-by-api-key", action="store_true",
                       help="give each API key its own prefix-cache partition (needs --api-key)")
    group.add_argument("--metrics-public", action="store_true",
                       help="serve /metrics without a key even when --api-key is set")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connections")
    group.add_argument("--timeout-header", type=positive_float, default=10.0,
                       help="seconds for a request's headers to arrive (408, then the connection closes; "
                            "default %(default)g)")
    group.add_argument("--timeout-body", type=positive_float, default=30.0,
                       help="seconds for a request's body to arrive after its headers (408; default %(default)g)")
    group.add_argument("--timeout-keep-alive", type=positive_float, default=5.0,
                       help="seconds an idle kept-alive connection stays open (default %(default)g)")
    group.add_argument("--max-connections", type=positive_int, default=1024,
                       help="open connections at most; more are answered 503 at once (default %(default)d)")
    group.add_argument("--timeout-graceful-shutdown", type=positive_float, default=GRACE_SECONDS,
                       help="after SIGTERM, seconds in-flight requests get to finish before they are "
                            "ended with an error (default %(default)g)")


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
    from lepton.entrypoints.server.connections import limited_protocol

    try:   # before the model loads: a bad key setting fails at once
        api_keys = _api_keys(args)
        if args.cache_salt_by_api_key and not api_keys:
            raise ValueError("--cache-salt-by-api-key needs --api-key (or LEPTON_API_KEY): without keys "
                             "there is nothing to salt by")
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
    from lepton.model_executor.parallel.launch import run_worker_from_env, torchrun_env

    launch = torchrun_env()
    if launch is not None and launch.rank != 0:   # torchrun: rank 0 serves HTTP, the others mirror it
        print(f"lepton: rank {launch.rank} of {launch.world_size}: loading its shard of {args.model}", flush=True)
        run_worker_from_env(launch, args.model, engine_kwargs(args))
        return 0
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
                        metrics_public=args.metrics_public, cache_salt_by_api_key=args.cache_salt_by_api_key,
                        body_timeout=args.timeout_body, tool_call_parser=args.tool_call_parser,
                        max_pending=args.max_pending,
                        max_prompts=args.max_prompts, max_n=args.max_n, max_logprobs=args.max_logprobs,
                        max_stop=args.max_stop, max_prompt_chars=args.max_prompt_chars,
                        max_stream_buffer_tokens=args.max_stream_buffer_tokens)
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
    protocol = limited_protocol(header_timeout=args.timeout_header, max_connections=args.max_connections)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, http=protocol,
                            timeout_keep_alive=args.timeout_keep_alive, access_log=False,
                            timeout_graceful_shutdown=args.timeout_graceful_shutdown + DRAIN_MARGIN_SECONDS)
    server = _Server(config, app.state.drain, args.timeout_graceful_shutdown)
    server.ready_line = f"lepton: ready at http://{args.host}:{args.port} (OpenAI API under /v1)"
    # What startup built (the model, torch, the app) lives as long as the process: frozen, the
    # cyclic GC never walks it again. Else each oldest-generation collection walks it all while
    # holding the GIL, a 50-150 ms pause of every stream (as vLLM's server does too).
    gc.collect()
    gc.freeze()
    server.run()
    engine.shutdown()   # tensor parallel: the worker ranks end with the server
    return 0


class _Server:
    """uvicorn.Server that prints one ready line once the socket is listening, and starts the
    app's drain as its shutdown begins (SIGTERM, SIGINT)."""

    def __new__(cls, config, drain, drain_timeout: float):
        import uvicorn

        class Server(uvicorn.Server):
            ready_line = ""

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    print(self.ready_line, flush=True)

            async def shutdown(self, sockets=None):
                drain.begin(drain_timeout)
                await super().shutdown(sockets)

        return Server(config)
