"""Llama Guard 1, 2 and 3: prompts (format.py), reading the answer (verdict.py), the classifier (guard.py).

    from llama_jax.guard import Guard, format_prompt
    Guard.load("Llama-Guard-3-8B").classify([[{"role": "user", "content": "..."}]])

`python -m llama_jax.guard --checkpoint DIR --user TEXT [--agent TEXT]` prints the verdict as JSON.
Imported lazily: `format_prompt` and `parse_verdict` need no jax.
"""

from llama_jax.guard.format import DEFAULT_CATEGORIES, format_prompt, template_prompt
from llama_jax.guard.verdict import Verdict, parse_verdict

__all__ = ["DEFAULT_CATEGORIES", "Guard", "Verdict", "format_prompt", "parse_verdict", "template_prompt"]


def __getattr__(name):
    if name == "Guard":
        from llama_jax.guard.guard import Guard

        return Guard
    raise AttributeError(name)
