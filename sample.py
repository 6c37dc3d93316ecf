"""Sample a Llama: `python sample.py [--checkpoint DIR] [--prompt TEXT] [--chat] [...]`.

With no arguments it samples runs/default, the checkpoint `python train.py` writes. DIR may be a llama_jax
checkpoint, a training workdir, or a Hugging Face / Meta model directory. One prompt streams its tokens as
they come; --prompts-file FILE (one prompt per line) samples them as one batch. See README "Sampling".
"""

import argparse
import os
import sys

from llama_jax.errors import LlamaJaxError, SamplingError, plural  # no jax: the huge-page re-exec below comes first

DEFAULT_CHECKPOINT = os.path.join("runs", "default")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help=f"checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--prompt", default=None, help="text to continue (or, with --chat, the user's message)")
    p.add_argument("--prompts-file", default=None, help="a file of prompts, one per line, sampled as a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat format")
    p.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="Llama 3.2 Vision: an image for every prompt (repeat for several); a prompt without "
                        "<|image|> gets them in front, a chat message gets them before its text")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--prefix", default=None, help="Code Llama infilling: the text before the gap (prints the middle)")
    p.add_argument("--suffix", default=None, help="Code Llama infilling: the text after the gap")
    p.add_argument("--prefix-file", default=None, help="--prefix read from a file")
    p.add_argument("--suffix-file", default=None, help="--suffix read from a file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus probability (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8", action="store_true", help="int8 weight-only matmul weights (about half of bf16)")
    p.add_argument("--dtype", default=None, help="cast the weights and compute, e.g. bfloat16 (default: as stored)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "splash"),
                   help="the prefill's attention: auto = the Pallas splash kernel on a TPU, XLA elsewhere")
    p.add_argument("--decode-attention", default="auto", choices=("auto", "xla", "paged"),
                   help="the decode steps' attention: auto = the Pallas paged kernel on a TPU (bf16), XLA elsewhere")
    p.add_argument("--tensor", type=int, default=1, help="split weights and KV cache over this many devices")
    p.add_argument("--aot", default=None, metavar="TOPOLOGY",
                   help="only compile prefill + one decode step for a TPU slice, e.g. v5e:2x4 (no TPU needed; needs "
                        "libtpu): per-chip memory, exit 1 if it does not fit. Weights split over all its chips")
    p.add_argument("--checkpoint-config", default=None, help="with --aot: a preset (e.g. llama3.1-8b) or a "
                   "directory with config.json, instead of --checkpoint")
    p.add_argument("--batch", type=int, default=1, help="with --aot: sequences sampled together")
    p.add_argument("--context", type=int, default=8192, help="with --aot: KV cache length (prompt + new tokens)")
    return p.parse_args(argv)


def read_prompts(args):
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise SamplingError(f"{args.prompts_file}: no prompts in it (one prompt per non-empty line)")
        return prompts
    if args.prompt is not None:
        return [args.prompt]
    return ["Hello!" if args.chat else "The"]


def check_knobs(args):
    """The sampling flags, checked before the checkpoint loads (--temperature nan, --top-k 2**31, --seed 2**63
    would fail deep inside jax)."""
    from llama_jax.sampling.strategies import check_seed, make_strategy

    try:
        make_strategy(args.temperature, args.top_k, args.top_p)
        check_seed(args.seed)
    except SamplingError as e:  # name the flag as the user typed it
        raise SamplingError(f"--{str(e).replace('_', '-')}") from None
    if args.max_new_tokens < 1:
        raise SamplingError(f"--max-new-tokens {args.max_new_tokens}: expected a positive number of tokens")


def read_infill(args):
    """(prefix, suffix) when any infilling flag is given (a missing side is empty), else None."""
    texts = []
    for name in ("prefix", "suffix"):
        text, file = getattr(args, name), getattr(args, f"{name}_file")
        if text is not None and file is not None:
            raise SamplingError(f"--{name} and --{name}-file: give one of them")
        if file is not None:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        texts.append(text)
    return None if texts == [None, None] else tuple(t or "" for t in texts)


def image_prompts(prompts, files, chat: bool):
    """--image FILE...: (prompts, images) for `generate` — a prompt without <|image|> gets one per file in front
    — or, with --chat, user contents [image parts with their files, the text part] (images None)."""
    if chat:
        return [[{"type": "image", "image": f} for f in files] + [{"type": "text", "text": p}]
                for p in prompts], None
    return [p if "<|image|>" in p else "<|image|>" * len(files) + p for p in prompts], [list(files) for _ in prompts]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.aot:
        from llama_jax import aot
        return aot.sample_cli(args.checkpoint_config or args.checkpoint or DEFAULT_CHECKPOINT, args.aot,
                              batch=args.batch, context=args.context, int8=args.int8,
                              tensor=args.tensor if args.tensor > 1 else -1, attention=args.attention,
                              decode_attention=args.decode_attention)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if not os.path.isdir(checkpoint) and not checkpoint.startswith("hf://"):  # hf://org/name: fetched on load
        if args.checkpoint is None:
            print(f"error: no checkpoint at {DEFAULT_CHECKPOINT}: run `python train.py` first (or pass "
                  "--checkpoint DIR)", file=sys.stderr)
        else:
            print(f"error: checkpoint directory {checkpoint!r} does not exist", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args)
        infill = read_infill(args)
        check_knobs(args)
        from llama_jax import Sampler

        mesh = None
        if args.tensor > 1:
            import jax

            from llama_jax.parallel.sharding import make_mesh

            if args.tensor > len(jax.devices()):
                raise SamplingError(f"--tensor {args.tensor}: only {plural(len(jax.devices()), 'device')}")
            mesh = make_mesh(fsdp=1, tensor=args.tensor, devices=jax.devices()[:args.tensor])
        sampler = Sampler.load(checkpoint, mesh=mesh, int8=args.int8, dtype=args.dtype, attention=args.attention,
                               decode_attention=args.decode_attention)
        knobs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, seed=args.seed)
        if args.image:  # Llama 3.2 Vision: the images go with every prompt
            if infill is not None:
                raise SamplingError("--image works with --prompt / --prompts-file / --chat, not with infilling")
            prompts, knobs["images"] = image_prompts(prompts, args.image, args.chat)
        if infill is not None:  # Code Llama fill-in-the-middle: print the middle only
            print(sampler.infill(*infill, **knobs))
        elif args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            conversations = [system + [{"role": "user", "content": p}] for p in prompts]
            knobs.pop("images", None)  # in the messages' image parts
            if len(prompts) == 1:
                sampler.chat(conversations[0], stream=_write, **knobs)
                print()
            else:
                for p, reply in zip(prompts, sampler.chat(conversations, **knobs)):
                    print(f"### {p}\n{reply}\n")
        elif len(prompts) == 1:
            echo = _Echo(prompts[0])  # the prompt is printed with the first token, after the input checks
            sampler.generate(prompts[0], stream=echo, **knobs)
            echo("")
            print()
        else:
            for p, completion in zip(prompts, sampler.generate(prompts, **knobs)):
                print(f"### {p}{completion}\n")
    except (LlamaJaxError, OSError) as e:  # our errors name the file / value; no traceback from inside jax
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Echo:
    def __init__(self, prompt: str):
        self.prompt = prompt

    def __call__(self, text: str) -> None:
        if self.prompt is not None:
            text, self.prompt = self.prompt + text, None
        _write(text)


if __name__ == "__main__":
    from llama_jax.cpu.host_memory import reexec_with_huge_pages
    from llama_jax.cpu.platform import cpu_unless_accelerator

    cpu_unless_accelerator()  # libtpu installed on a host without a TPU: no TPU probe (llama_jax/cpu/platform.py)
    reexec_with_huge_pages()  # huge pages for XLA:CPU's per-call buffers (see llama_jax/host_memory.py)
    sys.exit(main())
