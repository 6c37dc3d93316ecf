"""`python -m llama_jax.guard --checkpoint DIR --user TEXT [--agent TEXT]`: a Llama Guard verdict as JSON.

Judges the user's message, or with --agent the agent's reply to it. Prints {"safe", "categories", "p_unsafe",
"raw", "malformed"}; exit status 0 whatever the verdict, 1 on bad input (one line on stderr).
"""

import argparse
import json
import sys

from llama_jax.errors import LlamaJaxError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llama_jax.guard", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a Llama Guard checkpoint (llama_jax, Hugging Face or Meta)")
    p.add_argument("--user", required=True, help="the user's message")
    p.add_argument("--agent", default=None, help="the agent's reply (then the reply is judged)")
    p.add_argument("--version", type=int, default=None, choices=(1, 2, 3),
                   help="built-in prompt format (default: 3 for a Llama 3 vocabulary, else 1)")
    p.add_argument("--no-template", action="store_true", help="use the built-in format even if the checkpoint "
                   "has a chat template")
    p.add_argument("--category", action="append", default=None, metavar="NAME",
                   help="a custom category (repeat; numbered in order), replacing the defaults")
    p.add_argument("--exclude", action="append", default=[], metavar="CODE", help="leave out a category, e.g. S6")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--dtype", default=None, help="cast the weights and compute, e.g. bfloat16")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from llama_jax.guard.guard import Guard

        conversation = [{"role": "user", "content": args.user}]
        if args.agent is not None:
            conversation.append({"role": "assistant", "content": args.agent})
        guard = Guard.load(args.checkpoint, version=args.version, use_template=False if args.no_template else None,
                           dtype=args.dtype)
        [verdict] = guard.classify([conversation], categories=args.category, excluded=args.exclude,
                                   max_new_tokens=args.max_new_tokens)
    except (LlamaJaxError, OSError) as e:  # our errors name the file / value; no traceback from inside jax
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(verdict.to_dict(), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    from llama_jax.cpu.platform import cpu_unless_accelerator

    cpu_unless_accelerator()  # libtpu installed on a host without a TPU: no TPU probe (llama_jax/cpu/platform.py)
    sys.exit(main())
