"""``lepton chat``: an interactive conversation with a causal LM, replies streamed as they come.

    lepton chat --model PATH [--system TEXT] [--chat-template FILE] [sampling flags]

Each stdin line is a user turn. The engine's input processor applies the chat template and
validates the turn; the reply's new text is written to stdout as every step produces it
(Engine.add_processed / step with RequestOutputKind.DELTA), then a newline. ``/reset`` starts
over (keeping --system), ``/exit`` or end of input ends. Ctrl-C during a reply stops that reply.
Piped input works the same as a terminal, minus the prompt and the banner, so stdout holds only
the replies.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

from lepton.entrypoints.cli.io import (CLIError, add_engine_arguments, add_sampling_arguments, load_engine,
                                       sampling_params)

EXIT_COMMANDS = ("/exit", "/quit")


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a causal LM interactively (replies stream as they come)",
                          description="Chat with a causal LM: one user turn per stdin line; "
                                      "/reset starts over, /exit or end of input ends.")
    chat.add_argument("--model", required=True, help="model folder or hub id")
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    chat.add_argument("--chat-template", default=None,
                      help="a Jinja chat template file (default: the tokenizer's)")
    add_sampling_arguments(chat, max_tokens=None)
    add_engine_arguments(chat)
    chat.set_defaults(func=run_chat)


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as err:
        raise CLIError(f"cannot read the chat template {path}: {err.strerror or err}") from None


class ChatSession:
    """The conversation so far and the engine that continues it."""

    def __init__(self, engine, params, system: str | None, template: str | None):
        self.engine, self.params, self.template = engine, params, template
        self.opening = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.opening)
        self._ids = itertools.count()

    def reset(self) -> None:
        self.messages = list(self.opening)

    def reply(self, text: str, out=None) -> str:
        """Add a user turn, stream the assistant's reply to ``out``, keep both; the reply's text.
        ValueError (the conversation unchanged) when the turn cannot be served."""
        engine, out = self.engine, out or sys.stdout
        conversation = self.messages + [{"role": "user", "content": text}]
        prompt = engine.input_processor.chat(conversation, self.template)[0]
        params = self.params
        if params.max_tokens is not None:
            # A long conversation gets the room it has left rather than a refusal. With no room the
            # input processor refuses the prompt itself; 1 only keeps SamplingParams valid till then.
            room = engine.max_model_len - len(prompt.token_ids)
            params = dataclasses.replace(params, max_tokens=max(1, min(params.max_tokens, room)))
        request_id = f"chat-{next(self._ids)}"
        try:
            request = engine.input_processor.process(request_id, prompt, params, label="the conversation")
        except ValueError as err:   # only the conversation's length can fail a templated turn here
            raise ValueError(f"{err}; /reset to start over") from None
        engine.add_processed(request)
        parts: list[str] = []
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    delta = output.outputs[0].text
                    if delta:
                        parts.append(delta)
                        out.write(delta)
                        out.flush()
        except KeyboardInterrupt:   # stop this reply, keep the session
            engine.abort(request_id)
        out.write("\n")
        out.flush()
        reply = "".join(parts)
        self.messages = conversation + [{"role": "assistant", "content": reply}]
        return reply


def _lines(interactive: bool):
    """User lines until end of input (a terminal gets a prompt and line editing)."""
    while True:
        if interactive:
            try:
                yield input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line.rstrip("\r\n")


def run_chat(args: argparse.Namespace) -> int:
    from lepton.sampling_params import RequestOutputKind

    template = _read_template(args.chat_template)
    params = sampling_params(args, output_kind=RequestOutputKind.DELTA)
    engine = load_engine(args)
    engine.input_processor.require_generative("chat")
    if template is None and not getattr(engine.tokenizer, "chat_template", None):
        raise CLIError("the model's tokenizer has no chat template; pass --chat-template FILE")
    session = ChatSession(engine, params, args.system, template)
    interactive = sys.stdin.isatty()
    if interactive:
        print("lepton chat: /reset starts over, /exit (or Ctrl-D) ends", file=sys.stderr)
    for line in _lines(interactive):
        command = line.strip()
        if command in EXIT_COMMANDS:
            break
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
        elif command:
            try:
                session.reply(line)
            except ValueError as err:
                print(f"lepton chat: {err}", file=sys.stderr)
    return 0
