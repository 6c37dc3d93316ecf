"""GGUF files for the tests, written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: its tensor names,
its q/k permutation (`LlamaModel.permute`, copied here rather than taken from llama_jax), its metadata keys and
its tokenizer keys (`_set_vocab_sentencepiece`, `_set_vocab_gpt2`). Quantized tensors come from
`gguf.quants.quantize`; for the K types, which the gguf package cannot encode, `random_k_blocks` makes blocks of
random bytes whose f16 scales are finite and small (the rest of a K block is any bits)."""

from pathlib import Path

import numpy as np

# Hugging Face name -> llama.cpp name ({i}: layer)
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
}

# where each K block keeps its f16 scale(s): (byte offset, count)
K_SCALES = {"Q2_K": (80, 2), "Q3_K": (108, 1), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, 1)}


def permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(config, seed=0):
    """{HF name: float32 array} of a random model (the transformers oracle's own weights)."""
    from hf_util import make_hf_model

    model = make_hf_model(config, seed)
    return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()
            if "rotary_emb" not in k}, model


def gguf_tensors(config, weights):
    """[(llama.cpp name, HF-layout array with q/k permuted)] in llama.cpp's order."""
    out = []
    for hf, name in NAMES.items():
        layers = range(config.num_layers) if "{i}" in hf else [None]
        for i in layers:
            key = hf.format(i=i)
            if key not in weights:
                continue
            w = weights[key]
            if "q_proj" in key:
                w = permute(w, config.num_heads, config.num_heads)
            elif "k_proj" in key:
                w = permute(w, config.num_heads, config.num_kv_heads)
            out.append((name.format(i=i), w))
    return out


def random_k_blocks(shape, qtype_name, rng):
    """uint8 [rows, bytes per row] of random K-quant blocks with finite f16 scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.randint(0, 256, (rows, cols // block, size)).astype(np.uint8)
    offset, count = K_SCALES[qtype_name]
    scales = rng.uniform(1e-3, 2e-2, (rows, cols // block, count)).astype(np.float16)
    raw[:, :, offset:offset + 2 * count] = scales.view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path, config, weights, qtype="F32", tokenizer=None, arch="llama", meta=None, skip=(), rng=None,
               raw=None):
    """Write a llama GGUF; returns {llama.cpp name: (ggml type name, raw data as stored)}.
    `tokenizer(writer)` adds tokenizer keys; `meta` overrides {key: value} (None drops a key);
    `raw` {name: (type name, uint8 rows)} puts given bytes in place of a tensor."""
    import gguf

    rng = rng or np.random.RandomState(0)
    w = gguf.GGUFWriter(str(path), arch)
    keys = {f"{arch}.block_count": config.num_layers, f"{arch}.context_length": config.max_position_embeddings,
            f"{arch}.embedding_length": config.hidden_size, f"{arch}.feed_forward_length": config.intermediate_size,
            f"{arch}.attention.head_count": config.num_heads, f"{arch}.attention.head_count_kv": config.num_kv_heads,
            f"{arch}.rope.dimension_count": config.head_dim, f"{arch}.vocab_size": config.vocab_size}
    floats = {f"{arch}.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
              f"{arch}.rope.freq_base": config.rope_theta}
    for key, value in {**keys, **floats, **(meta or {})}.items():
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float) or key in floats:
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_file_type(0 if qtype == "F32" else 1)
    w.add_name(config.name)
    if tokenizer is not None:
        tokenizer(w)
    stored = {}
    for name, array in gguf_tensors(config, weights):
        if name in skip:
            continue
        kind, data = (raw or {}).get(name) or _encode(array, qtype, rng)
        w.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else gguf.GGMLQuantizationType[kind])
        stored[name] = (kind, data)
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3":
        from llama_jax.io.gguf_config import llama3_factors

        w.add_tensor("rope_freqs.weight", llama3_factors(config))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _encode(array, qtype, rng):
    import gguf

    if array.ndim == 1 or qtype == "F32":
        return "F32", np.ascontiguousarray(array, np.float32)
    if qtype == "F16":
        return "F16", array.astype(np.float16)
    if qtype in K_SCALES:
        return qtype, random_k_blocks(array.shape, qtype, rng)
    return qtype, gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype])


def dequantized(kind, data, shape):
    """What the gguf package itself makes of stored data (float32)."""
    import gguf

    if data.dtype != np.uint8:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(shape)


def unpermute(w, n_head):
    """The inverse of permute (for checking)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sentencepiece_vocab(model_file):
    """A tokenizer(writer) adding a SentencePiece model's keys as convert_hf_to_gguf's _set_vocab_sentencepiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def add(w):
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                         else 6 if sp.is_byte(i) else 1)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    return add


def bpe_vocab(tokenizer_json, pre="llama-bpe"):
    """A tokenizer(writer) adding a byte-level BPE tokenizer.json's keys as _set_vocab_gpt2 does."""
    import json

    d = json.loads(Path(tokenizer_json).read_text())
    vocab = d["model"]["vocab"]
    added = {t["id"]: t for t in d["added_tokens"]}
    n = max(list(vocab.values()) + list(added)) + 1
    by_id = {i: t for t, i in vocab.items()}

    def add(w):
        tokens = [added[i]["content"] if i in added else by_id[i] for i in range(n)]
        types = [(3 if added[i]["special"] else 4) if i in added else 1 for i in range(n)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
        w.add_eos_token_id(tokens.index("<|end_of_text|>"))
        w.add_chat_template("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                            "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")
    return add
