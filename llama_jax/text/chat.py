"""Chat prompts: Llama 2 chat and Llama 3 instruct built as pieces, or the checkpoint's own Jinja template.

A prompt is a list of pieces: text (encoded as plain text, never parsed for control tokens) and ints (control
token ids). Built that way, a user who types "<|eot_id|>" cannot end a turn. A Jinja `chat_template` instead
renders one string with the control tokens written out, which the tokenizer then encodes with them recognised
(as transformers' apply_chat_template does); the template comes with downloaded files, so it runs in Jinja's
immutable sandbox.
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Union

from llama_jax.errors import LlamaJaxError, SamplingError, TokenizerError

if TYPE_CHECKING:  # only for annotations: base.py imports this module
    from llama_jax.text.base import Tokenizer

# {"role": "system" | "user" | "assistant" | "ipython" | "tool", "content": str}; Llama 3.2 Vision's content may
# instead be a list of parts: {"type": "image"} (an <|image|> token) and {"type": "text", "text": str}
Message = Dict[str, Any]
Piece = Union[str, int]  # chat prompts are built as text pieces and control-token ids

ROLES = ("system", "user", "assistant", "ipython", "tool")


def check_messages(messages: Sequence[Message]) -> None:
    """Raise SamplingError unless `messages` is a non-empty list of {"role", "content"} dicts."""
    if not messages:
        raise SamplingError("chat: messages is empty; expected [{'role': 'user', 'content': '...'}, ...]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SamplingError(f"chat: message {i} is {m!r}; expected a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SamplingError(f"chat: message {i} has role {m['role']!r}; expected system, user or assistant")
        if not isinstance(m["content"], str):
            check_parts(i, m["content"])


def check_parts(i: int, content) -> None:
    """A message's content as a list of parts: {"type": "image"} or {"type": "text", "text": str}."""
    if not isinstance(content, (list, tuple)):
        raise SamplingError(f"chat: message {i} has content {content!r:.60}; expected a string or a list of "
                            "parts ({'type': 'image'} or {'type': 'text', 'text': '...'})")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not (kind == "image" or (kind == "text" and isinstance(part.get("text"), str))):
            raise SamplingError(f"chat: message {i} part {j} is {part!r:.60}; expected {{'type': 'image'}} or "
                                "{'type': 'text', 'text': '...'}")


def num_images(messages: Sequence[Message]) -> int:
    """How many {"type": "image"} parts the messages hold (each becomes one <|image|> token)."""
    return sum(isinstance(p, dict) and p.get("type") == "image"
               for m in messages if not isinstance(m["content"], str) for p in m["content"])


def content_pieces(tok: "Tokenizer", lead: str, content) -> List[Piece]:
    """`lead` and a message's content -> pieces: a string stripped; a list of parts as Meta's Llama 3.2
    chat_format writes them: each text part as it is, each image part as the <|image|> token."""
    if isinstance(content, str):
        return [lead + content.strip()]
    pieces: List[Piece] = [lead]
    for part in content:
        if part["type"] == "image":
            image = tok.token_id("<|image|>")
            if image is None:
                raise TokenizerError(f"{getattr(tok, 'path', tok)}: the tokenizer has no <|image|> token, so a "
                                     "chat cannot hold an image; use a Llama 3.2 Vision checkpoint's tokenizer")
            pieces.append(image)
        else:
            pieces.append(part["text"])
    return pieces


def chat_pieces(tok: "Tokenizer", chat_format: str, messages: Sequence[Message],
                add_generation_prompt: bool) -> List[Piece]:
    """The built-in format's pieces ("llama3", "step" or "llama2") for `messages`."""
    build = {"llama3": llama3_pieces, "step": step_pieces}.get(chat_format, llama2_pieces)
    if chat_format != "llama3" and any(not isinstance(m["content"], str) for m in messages):
        raise SamplingError(f"chat: content as a list of parts (images) needs the Llama 3 chat format (Llama 3.2 "
                            f"Vision); this tokenizer's format is {chat_format!r}")
    return build(tok, messages, add_generation_prompt)


def llama3_pieces(tok: "Tokenizer", messages: Sequence[Message], add_generation_prompt: bool) -> List[Piece]:
    """Llama 3 instruct: <|begin_of_text|> then per message
    <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>, then an open assistant header."""
    start, end, eot = (tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    pieces: List[Piece] = [tok.bos_id] if tok.bos_id is not None else []
    for m in messages:
        pieces += [start, m["role"], end, *content_pieces(tok, "\n\n", m["content"]), eot]
    if add_generation_prompt:
        pieces += [start, "assistant", end, "\n\n"]
    return pieces


def llama2_pieces(tok: "Tokenizer", messages: Sequence[Message], add_generation_prompt: bool) -> List[Piece]:
    """Llama 2 chat: each exchange is <s>[INST] user [/INST] answer </s>; a system prompt is folded into the
    first user message between <<SYS>> markers. (The prompt always ends where the answer begins, so
    `add_generation_prompt` changes nothing here.)"""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pieces: List[Piece] = []
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise SamplingError(f"Llama 2 chat: message {i} has role {m['role']!r}; roles must alternate "
                                "user/assistant after an optional system message")
        content = m["content"].strip()
        if m["role"] == "user":
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
            pieces += ([tok.bos_id] if tok.bos_id is not None else []) + [f"[INST] {content} [/INST]"]
        else:
            pieces += [f" {content} "] + ([tok.eos_id] if tok.eos_id is not None else [])
    return pieces


def step_pieces(tok: "Tokenizer", messages: Sequence[Message], add_generation_prompt: bool) -> List[Piece]:
    """Code Llama 70B Instruct (Meta's codellama `dialog_prompt_tokens`): BOS, then per message the header
    " Source: role" (and "\nDestination: ..." where the message names one), "\n\n " + content unless empty, and
    <step>; then the open reply " Source: assistant\nDestination: user", "\n\n ". A conversation without a system
    message gets an empty one; user and assistant alternate after it, ending with the user."""
    step = tok.token_id("<step>")
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ""}] + list(messages)
    for i, m in enumerate(messages[1:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise SamplingError(f"Code Llama 70B chat: message {i + 1} has role {m['role']!r}; roles must "
                                "alternate user/assistant after an optional system message, ending with the user")
    if messages[-1]["role"] != "user":
        raise SamplingError(f"Code Llama 70B chat: the last message is {messages[-1]['role']!r}; expected 'user'")
    pieces: List[Piece] = [tok.bos_id] if tok.bos_id is not None else []
    for m in messages:
        header = f"Source: {m['role'].strip()}"
        if m.get("destination") is not None:
            header += f"\nDestination: {m['destination'].strip()}"
        pieces.append(" " + header)
        if m["content"]:
            pieces.append("\n\n " + m["content"].strip())
        pieces.append(step)
    return pieces + [" Source: assistant\nDestination: user", "\n\n "]


def render_template(template: str, messages: Sequence[Message], add_generation_prompt: bool,
                    tokens: Dict[str, str]) -> str:
    """Render a Hugging Face-style Jinja chat template in a sandbox, with transformers' extras
    (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII) and `tokens` (bos_token, ...)."""
    import jinja2

    from llama_jax.text.template_limits import LimitedSandbox, render_limited

    def raise_exception(message):  # the template refusing the messages, e.g. roles out of order
        raise SamplingError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:  # with a budget of steps and time (template_limits.py): nested loops and 9**(9**9) stop with one line
        return render_limited(env.from_string(template), messages=list(messages),
                              add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.TemplateError as e:  # a broken template file, not the user's messages
        raise TokenizerError(f"chat template failed to render: {e}") from None
    except LlamaJaxError:
        raise
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError, MemoryError) as e:
        raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {e}") from None
