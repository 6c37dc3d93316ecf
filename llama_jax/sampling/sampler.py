"""The notebook / command-line API: `Sampler` loads a checkpoint once and generates text from text.

    sampler = Sampler.load("runs/default")            # or a Hugging Face / Meta directory
    sampler.generate(["Once upon a time"], max_new_tokens=64, temperature=0.8, top_p=0.95)
    sampler.generate("The", strategy=Sample((Temperature(0.7), TopK(40))))
    sampler.chat([{"role": "user", "content": "Hi!"}])
    sampler.infill("def f(x):\n    ", "\n    return y\n")   # Code Llama fill-in-the-middle
    sampler.generate(["<|image|>Describe this image."], images=[["cat.jpg"]])   # Llama 3.2 Vision
    sampler.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                               {"type": "text", "text": "What is this?"}]}])

Every method takes either `strategy=` (an object from strategies.py) or the knobs of
`strategies.make_strategy` as keywords (temperature, top_k, top_p), over each method's own defaults.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.errors import ImageError, SamplingError
from llama_jax.cpu.decode_layout import is_per_layer, unstack_layers
from llama_jax.sampling.program import generate_ids
from llama_jax.sampling.strategies import Strategy, resolve_strategy
from llama_jax.sampling.stream import TextStream, decode_continuation
from llama_jax.sampling.vision import chat_images, encode_image_prompt, image_arrays, image_token_id

GENERATE_KNOBS = {"temperature": 0.8, "top_p": 0.95}  # defaults of generate / generate_ids
CHAT_KNOBS = {"temperature": 0.6, "top_p": 0.9}  # a chat reply: cooler, a narrower nucleus
INFILL_KNOBS = {"temperature": 0.6, "top_p": 0.9}  # Meta's text_infilling defaults


def _on_cpu(params) -> bool:
    leaf = jax.tree.leaves(params)[0]
    return all(d.platform == "cpu" for d in getattr(leaf, "devices", lambda: jax.devices()[:1])())


def _fits_twice(params) -> bool:
    """Whether the free memory holds another copy of `params` (unstacking copies every layer once)."""
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume it fits
        return True
    return size < free


class Sampler:
    """Load once, generate many times.

        sampler = Sampler.load("runs/default")            # or a Hugging Face / Meta directory
        sampler.generate(["Once upon a time"], max_new_tokens=64)
        sampler.chat([{"role": "user", "content": "Hi!"}])

    `Sampler(config, params, tokenizer, mesh=None)` wraps parameters you already have.

    `per_layer` (default: on a CPU without a mesh, when a second copy of the weights fits in free memory) keeps
    one buffer per layer (`cpu.decode_layout.unstack_layers`, q/k/v and gate/up joined) and a per-layer KV
    cache. On a CPU the scanned model copies every layer's weights out of the stacked arrays at every decode
    step; per-layer buffers are read in place (see BENCHMARKS.md for the figures). Off elsewhere: TPU compilers
    read the slices in place, and the scanned program compiles in the same time whatever the depth.
    """

    def __init__(self, config: LlamaConfig, params, tokenizer, mesh=None, per_layer: Optional[bool] = None):
        if tokenizer.vocab_size > config.embed_rows:  # a vision model's embedding also has the <|image|> row
            raise SamplingError(f"tokenizer {getattr(tokenizer, 'path', tokenizer)!r} has {tokenizer.vocab_size} "
                                f"tokens but the model's vocabulary has only {config.embed_rows}: they do not "
                                "belong together")
        if mesh is not None:  # place (or keep) the weights in their shardings; a no-op when already there
            from llama_jax.model.quantize import QArray, quantized_shardings
            from llama_jax.parallel.sharding import param_shardings

            shardings = param_shardings(config, mesh)
            if any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))):
                shardings = quantized_shardings(shardings)
            params = jax.device_put(params, shardings)
        if per_layer is None:
            per_layer = (mesh is None and _on_cpu(params) and _fits_twice(params) and config.vision is None
                         and config.decode_attention != "paged")  # the paged kernel scans stacked layers
        if per_layer and not is_per_layer(params):
            params = unstack_layers(params, fuse=True)
        self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
        self.stop_ids = tuple(sorted(set(tokenizer.stop_ids) | set(config.eos_token_id)))
        self.checkpoint_dir: Optional[str] = None  # Sampler.load's directory: its preprocessor_config.json

    @classmethod
    def load(cls, path, mesh=None, int8: bool = False, dtype: Optional[str] = None,
             per_layer: Optional[bool] = None, attention: str = "auto",
             decode_attention: str = "auto") -> "Sampler":
        """A llama_jax checkpoint, Hugging Face or Meta directory (with its tokenizer files), or hf://org/name.
        With `mesh` the weights are loaded sharded over it; `int8` stores the matmul weights as int8 (about half
        of bf16); `per_layer`: see the class; `attention`: the prefill's (LlamaConfig.attention: auto is the
        splash kernel on a TPU); `decode_attention`: the decode steps' (auto: the paged kernel on a TPU)."""
        import llama_jax
        from llama_jax.text.tokenizer import load_tokenizer

        from llama_jax.io import paths
        from llama_jax.io.formats import resolve
        from llama_jax.io.source import TOKENIZER_FILES

        path = resolve(path)  # hf://org/name[@revision]: a local snapshot in the Hugging Face cache
        if paths.is_remote(path):  # a gs:// checkpoint or workdir: weights read in place, tokenizer files copied
            tok_dir = paths.local_copy(path, TOKENIZER_FILES)
            tokenizer = load_tokenizer(tok_dir)
        elif not os.path.isdir(path):
            raise SamplingError(f"Sampler.load: {path!r} is not a directory (expected a llama_jax checkpoint, or a "
                                "Hugging Face or Meta model directory)")
        else:  # a training workdir keeps its tokenizer at the top and its weights in export/; accept either place
            tok_dir = path
            if not any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.model", "tokenizer.json")):
                if os.path.isdir(os.path.join(path, "export")):
                    tok_dir = os.path.join(path, "export")
            tokenizer = load_tokenizer(tok_dir)
        config, params = llama_jax.load(path, dtype=dtype, mesh=mesh)
        if dtype is not None:  # compute in the requested dtype too (logits and softmax stay float32)
            config = config.replace(dtype=jnp.dtype(dtype).name)
        config = config.replace(attention=attention, decode_attention=decode_attention)
        if int8:
            from llama_jax.model.quantize import quantize_params
            from llama_jax.parallel.sharding import param_shardings

            params = quantize_params(params, param_shardings(config, mesh) if mesh is not None else None)
        sampler = cls(config, params, tokenizer, mesh=mesh, per_layer=per_layer)
        sampler.checkpoint_dir = tok_dir
        return sampler

    def encode(self, prompt: str) -> List[int]:
        if not isinstance(prompt, str) or not prompt:
            raise SamplingError(f"prompt {prompt!r} is empty or not a string; give some text to continue")
        return self.tokenizer.encode(prompt, bos=True)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                     strategy: Optional[Strategy] = None, seed: int = 0,
                     stream: Optional[Callable[[str], None]] = None, stream_prefix: Sequence[int] = (),
                     **knobs) -> List[List[int]]:
        """Token-id prompts -> the new token ids of each (stop token excluded). `strategy`, or `knobs`
        (temperature 0.8, top_k None, top_p 0.95 unless given; see `make_strategy`), picks each token.
        `stream(text)` receives the text as it is generated (one prompt only), decoded as it reads after
        `stream_prefix`."""
        return self._run(prompt_ids, max_new_tokens, resolve_strategy(strategy, knobs, GENERATE_KNOBS), seed,
                         stream, stream_prefix)

    def generate(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 64, *,
                 strategy: Optional[Strategy] = None, seed: int = 0, stream: Optional[Callable[[str], None]] = None,
                 images: Optional[Sequence[Sequence]] = None, **knobs) -> Union[str, List[str]]:
        """Continue each prompt; a list of prompts gives a list of completions, one string gives a string.
        Knobs as in `generate_ids`: `temperature=0` is greedy; `top_k` / `top_p` restrict the draw; `seed`
        makes it reproducible. Llama 3.2 Vision: `images` holds one list per prompt (PIL images or paths), one
        image per `<|image|>` written in the prompt (`images=[[img]]` for "<|image|>Describe this image.")."""
        strategy = resolve_strategy(strategy, knobs, GENERATE_KNOBS)
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if not texts:
            raise SamplingError("generate: no prompts given")
        arrays = None
        if images is None:
            if self.config.vision is not None:  # the literal would be read as text: the model would never see it
                for i, t in enumerate(texts):
                    if "<|image|>" in t:
                        raise ImageError(f"generate: prompt {i} has {t.count('<|image|>')} <|image|> token(s) but no "
                                         "images were given; pass images=[[...]] (sample.py: --image FILE)")
            ids = [self.encode(t) for t in texts]
        else:
            image_id = image_token_id(self.config)
            ids = [encode_image_prompt(self.tokenizer, t, image_id) for t in texts]
            arrays = image_arrays(self.config, ids, images, checkpoint=self.checkpoint_dir)
        # the prompt's last token is decoded with the completion so a leading space is kept
        out = self._run(ids, max_new_tokens, strategy, seed, stream, ids[0][-1:], images=arrays)
        completions = [decode_continuation(self.tokenizer, i[-1:], o) for i, o in zip(ids, out)]
        return completions[0] if single else completions

    def chat(self, messages, max_new_tokens: int = 256, *, strategy: Optional[Strategy] = None, seed: int = 0,
             stream: Optional[Callable[[str], None]] = None, **knobs):
        """Reply to a conversation [{"role": ..., "content": ...}, ...] (or to a list of conversations) in the
        checkpoint's chat format; returns the assistant's reply (or a list of them). Knobs default to
        temperature 0.6, top_p 0.9. Llama 3.2 Vision: a content may be a list of parts, {"type": "image",
        "image": PIL image or path} and {"type": "text", "text": ...}."""
        strategy = resolve_strategy(strategy, knobs, CHAT_KNOBS)
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        ids = [self.tokenizer.encode_chat(c) for c in conversations]
        ids, arrays = chat_images(self.config, self.tokenizer, conversations, ids, self.checkpoint_dir)
        out = self._run(ids, max_new_tokens, strategy, seed, stream, images=arrays)
        replies = [self.tokenizer.decode(o).strip() for o in out]
        return replies[0] if single else replies

    def infill(self, prefix: Union[str, Sequence[str]], suffix: Union[str, Sequence[str]], max_new_tokens: int = 128,
               *, suffix_first: bool = False, strategy: Optional[Strategy] = None, seed: int = 0,
               **knobs) -> Union[str, List[str]]:
        """Code Llama fill-in-the-middle: the text between `prefix` and `suffix` (strings, or equal-length lists
        of them: one batch), so prefix + middle + suffix is the file. Prompts as Meta builds them
        (`tokenizer.encode_infill`); the middle ends at ▁<EOT> or EOS. Knobs default to temperature 0.6,
        top_p 0.9 (Meta's text_infilling)."""
        strategy = resolve_strategy(strategy, knobs, INFILL_KNOBS)
        single = isinstance(prefix, str)
        if single != isinstance(suffix, str):
            raise SamplingError("infill: give prefix and suffix both as strings or both as lists")
        prefixes, suffixes = ([prefix], [suffix]) if single else (list(prefix), list(suffix))
        if len(prefixes) != len(suffixes) or not prefixes:
            raise SamplingError(f"infill: {len(prefixes)} prefixes and {len(suffixes)} suffixes; expected the same "
                                "number, at least one")
        ids = [self.tokenizer.encode_infill(p, s, suffix_first=suffix_first) for p, s in zip(prefixes, suffixes)]
        stops = tuple(sorted(set(self.stop_ids) | {self.tokenizer.infill_ids()[3]}))
        out = generate_ids(self.params, self.config, ids, max_new_tokens=max_new_tokens, strategy=strategy,
                           seed=seed, stop_ids=stops, mesh=self.mesh)
        middles = [self.tokenizer.decode_infill(o) for o in out]
        return middles[0] if single else middles

    def _run(self, prompt_ids, max_new_tokens: int, strategy: Strategy, seed: int,
             stream: Optional[Callable[[str], None]], stream_prefix: Sequence[int] = (),
             images: Optional[dict] = None) -> List[List[int]]:
        on_token = None
        if stream is not None:
            if len(prompt_ids) != 1:
                raise SamplingError(f"streaming works with one prompt; got {len(prompt_ids)}")
            on_token = TextStream(self.tokenizer, stream, self.stop_ids, prefix=stream_prefix)
        out = generate_ids(self.params, self.config, prompt_ids, max_new_tokens=max_new_tokens, strategy=strategy,
                           seed=seed, stop_ids=self.stop_ids, mesh=self.mesh, on_token=on_token,
                           **({} if images is None else {"images": images}))
        if on_token is not None:
            on_token.close()
        return out
