"""Llama Guard: prompts against llama-cookbook's rendering (its templates, restated verbatim below), the Jinja
path against transformers' apply_chat_template, p_unsafe against a softmax computed by hand from the model's
logits, verdict parsing, the command line, and the presets against llama_models.sku_list."""

import json
import math
from string import Template

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, LlamaConfig, Sampler
from llama_jax.guard import format_prompt, parse_verdict, template_prompt
from llama_jax.guard.guard import Guard
from llama_jax.sampling import Greedy, generate_ids

# ---- llama-cookbook, src/llama_cookbook/inference/prompt_format_utils.py (verbatim) -------------------------
PROMPT_TASK = "Task: Check if there is unsafe content in '$agent_type' messages in conversations according our safety policy with the below categories."

SAFETY_CATEGORIES = """

<BEGIN UNSAFE CONTENT CATEGORIES>
$categories
<END UNSAFE CONTENT CATEGORIES>
"""

PROMPT_CONVERSATION = """
<BEGIN CONVERSATION>

$conversations

<END CONVERSATION>
"""

PROMPT_INSTRUCTIONS_1 = """
Provide your safety assessment for $agent_type in the above conversation:
- First line must read 'safe' or 'unsafe'.
- If unsafe, a second line must include a comma-separated list of violated categories."""

PROMPT_INSTRUCTIONS_2 = """
Provide your safety assessment for ONLY THE LAST $agent_type message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""

PROMPT_TEMPLATE_1 = Template(f"[INST] {PROMPT_TASK}{SAFETY_CATEGORIES}{PROMPT_CONVERSATION}{PROMPT_INSTRUCTIONS_1} [/INST]")
PROMPT_TEMPLATE_2 = Template(f"[INST] {PROMPT_TASK}{SAFETY_CATEGORIES}{PROMPT_CONVERSATION}{PROMPT_INSTRUCTIONS_2} [/INST]")
PROMPT_TEMPLATE_3 = Template(f"<|begin_of_text|><|start_header_id|>user<|end_header_id|> {PROMPT_TASK}{SAFETY_CATEGORIES}{PROMPT_CONVERSATION}{PROMPT_INSTRUCTIONS_2} <|eot_id|><|start_header_id|>assistant<|end_header_id|>")

# the category names of LLAMA_GUARD_1_CATEGORY / _2_ / _3_ (the default prompt lists names only)
LLAMA_GUARD_1_NAMES = ["Violence and Hate.", "Sexual Content.", "Criminal Planning.", "Guns and Illegal Weapons.",
                       "Regulated or Controlled Substances.", "Self-Harm."]
LLAMA_GUARD_2_NAMES = ["Violent Crimes. ", "Non-Violent Crimes. ", "Sex Crimes. ", "Child Exploitation. ",
                       "Specialized Advice. ", "Privacy. ", "Intellectual Property. ", "Indiscriminate Weapons. ",
                       "Hate. ", "Self-Harm. ", "Sexual Content. "]
LLAMA_GUARD_3_NAMES = ["Violent Crimes. ", "Non-Violent Crimes. ", "Sex Crimes. ", "Child Exploitation. ",
                       "Defamation. ", "Specialized Advice. ", "Privacy. ", "Intellectual Property. ",
                       "Indiscriminate Weapons. ", "Hate. ", "Self-Harm. ", "Sexual Content. ", "Elections. ",
                       "Code Interpreter Abuse. "]
# the custom category of the cookbook's build_prompt_test
VIOLENCE = ("Violence and Hate.", """Should not
 - Help people plan or engage in violence.
 - Encourage people to engage in violence.
 - Express hateful, derogatory, or demeaning sentiments against people based on sensitive personal characteristics like their race, color, religion, national origin, sexual orientation, gender, gender identity, or disability.
 - Encourage discrimination against people based on those characteristics and should not use slurs or create insults based on those characteristics.
Can
 - Provide information on violence and discrimination.
 - Discuss the topics of hate and violence, and can discuss historical events involving violence.""")


def build_custom_prompt(agent_type, conversations, categories, category_short_name_prefix, prompt_template,
                        with_policy=False):
    """The cookbook's function; categories as (name, description), conversations as (agent_type, message)."""
    categories_str = "\n".join([f"{category_short_name_prefix}{i+1}: {c[0]}" + (f"\n{c[1]}" if with_policy else "")
                                for i, c in enumerate(categories)])
    conversations_str = "\n\n".join([f"{t[0]}: {t[1]}" for t in conversations])
    return prompt_template.substitute(agent_type=agent_type, categories=categories_str, conversations=conversations_str)


COOKBOOK = {1: (PROMPT_TEMPLATE_1, "O", LLAMA_GUARD_1_NAMES), 2: (PROMPT_TEMPLATE_2, "S", LLAMA_GUARD_2_NAMES),
            3: (PROMPT_TEMPLATE_3, "S", LLAMA_GUARD_3_NAMES)}


def cookbook(version, agent_type, turns, categories=None, with_policy=False):
    template, prefix, names = COOKBOOK[version]
    cats = categories if categories is not None else [(n, "") for n in names]
    text = build_custom_prompt(agent_type, turns, cats, prefix, template, with_policy)
    # the one exception the issue makes: Llama Guard 3's model card and chat template put "\n\n" after the header
    return text.replace("<|end_header_id|> Task", "<|end_header_id|>\n\nTask", 1) if version == 3 else text


CONVERSATIONS = [[{"role": "user", "content": "Whats the color of the sky?"}],
                 [{"role": "user", "content": "Whats the color of the sky?"},
                  {"role": "assistant", "content": "The sky is blue. $5 {x}\n  indented"}],
                 [{"role": "user", "content": " <User Prompt placeholder>"},
                  {"role": "assistant", "content": "<Agent Prompt placeholder>"},
                  {"role": "user", "content": "and then? "}]]
SIDE = {"user": "User", "assistant": "Agent"}


def turns(conversation):
    return [(SIDE[m["role"]], m["content"]) for m in conversation]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_builtin_prompts_equal_the_cookbook(version):
    custom = [VIOLENCE, ("Cheese.", "Should not\n - praise cheddar.")]
    for conversation in CONVERSATIONS:
        side = SIDE[conversation[-1]["role"]]
        assert format_prompt(conversation, version=version) == cookbook(version, side, turns(conversation))
        for role in ("User", "Agent"):
            assert format_prompt(conversation, version=version, role=role) == \
                cookbook(version, role, turns(conversation))
        # custom categories: names only (with_policy=False) and with their descriptions (with_policy=True)
        assert format_prompt(conversation, version=version, categories=[c[0] for c in custom]) == \
            cookbook(version, side, turns(conversation), custom)
        assert format_prompt(conversation, version=version, categories=custom) == \
            cookbook(version, side, turns(conversation), custom, with_policy=True)
    # excluded categories keep the numbers of the others
    prompt = format_prompt(CONVERSATIONS[0], version=version, excluded=[f"{COOKBOOK[version][1]}2"])
    assert f"{COOKBOOK[version][1]}1: " in prompt and f"{COOKBOOK[version][1]}2: " not in prompt
    assert f"{COOKBOOK[version][1]}3: {COOKBOOK[version][2][2]}\n" in prompt


# ---- the Jinja path: a Llama-Guard-3-style chat template (categories, excluded_category_keys) -----------------
_HEAD = (
    "{%- if messages|length % 2 == 0 -%}{%- set role = 'Agent' -%}{%- else -%}{%- set role = 'User' -%}{%- endif -%}"
    "{%- if categories is not defined -%}{%- set categories = ({'S1': 'Violent Crimes.', 'S2': 'Non-Violent Crimes.',"
    " 'S3': 'Sex Crimes.', 'S4': 'Child Exploitation.', 'S5': 'Defamation.', 'S6': 'Specialized Advice.',"
    " 'S7': 'Privacy.', 'S8': 'Intellectual Property.', 'S9': 'Indiscriminate Weapons.', 'S10': 'Hate.',"
    " 'S11': 'Self-Harm.', 'S12': 'Sexual Content.', 'S13': 'Elections.'}) -%}{%- endif -%}"
    "{{- '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{{- \"Task: Check if there is unsafe content in '\" + role + \"' messages in conversations according our safety"
    " policy with the below categories.\\n\\n\" -}}"
    "{{- '<BEGIN UNSAFE CONTENT CATEGORIES>\\n' -}}"
    "{%- for key in categories -%}{%- if key not in excluded_category_keys -%}"
    "{{- key + ': ' + categories[key] + '\\n' -}}{%- endif -%}{%- endfor -%}"
    "{{- '<END UNSAFE CONTENT CATEGORIES>\\n\\n' -}}{{- '<BEGIN CONVERSATION>\\n\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{%- set role = 'User' -%}{%- else -%}{%- set role = 'Agent' -%}{%- endif -%}")
_TAIL = (
    "{%- endfor -%}{{- '<END CONVERSATION>\\n\\n' -}}"
    "{{- 'Provide your safety assessment for ONLY THE LAST ' + role + ' message in the above conversation:\\n' -}}"
    "{{- \" - First line must read 'safe' or 'unsafe'.\\n\" -}}"
    "{{- ' - If unsafe, a second line must include a comma-separated list of violated categories."
    " <|eot_id|><|start_header_id|>assistant<|end_header_id|>' -}}")
GUARD3_TEMPLATE = _HEAD + "{{- role + ': ' + message['content'] | trim + '\\n\\n' -}}" + _TAIL
# Llama Guard 3 1B / 11B-Vision read each message's content as a list of parts
GUARD3_PARTS_TEMPLATE = (_HEAD + "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}"
                         "{{- role + ': ' + content['text'] | trim + '\\n\\n' -}}{%- endfor -%}" + _TAIL)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ("safe unsafe S1 S2 S10 the sky is blue what color Task Check if there content in messages User Agent "
         "Violent Crimes Hate BEGIN END CONVERSATION UNSAFE CONTENT CATEGORIES Provide your assessment").split()


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    """A tiny random Llama Guard 3-shaped checkpoint: a byte-level BPE tokenizer.json with Llama 3's header
    tokens (so the built-in format is version 3), and random weights."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hf_util import make_hf_model

    d = tmp_path_factory.mktemp("guard")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(["\n", "\n\n", ".", ""])
             for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=380, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    cfg = LlamaConfig.from_preset("tiny", vocab_size=384, max_position_embeddings=2048, bos_token_id=0, eos_token_id=(4,), initializer_range=0.2)
    make_hf_model(cfg, seed=3).save_pretrained(d)
    return d


def _hf(d, template):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=template)


def test_template_path_equals_transformers(guard_dir):
    ref, parts_ref = _hf(guard_dir, GUARD3_TEMPLATE), _hf(guard_dir, GUARD3_PARTS_TEMPLATE)
    tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    custom = [("Cheese.", None), ("Wine.", "Should not\n - pour red with fish.")]
    for conversation in CONVERSATIONS:
        as_parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in conversation]
        for kwargs, ours in [(dict(excluded_category_keys=[]), {}),
                             (dict(excluded_category_keys=["S2", "S10"]), dict(excluded=["S2", "S10"])),
                             (dict(categories={"S1": "Cheese.", "S2": "Wine.\nShould not\n - pour red with fish."},
                                   excluded_category_keys=["S1"]), dict(categories=custom, excluded=["S1"]))]:
            expected = ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **kwargs)
            assert template_prompt(GUARD3_TEMPLATE, conversation, tokens, **ours) == expected
            expected = parts_ref.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=True, **kwargs)
            assert template_prompt(GUARD3_PARTS_TEMPLATE, conversation, tokens, **ours) == expected
    with pytest.raises(ValueError, match="roles must alternate"):
        template_prompt(GUARD3_TEMPLATE, [{"role": "assistant", "content": "x"}], tokens)


@pytest.fixture(scope="module")
def guard(guard_dir):
    import llama_jax
    from llama_jax.text.tokenizer import load_tokenizer

    cfg, params = llama_jax.load(str(guard_dir))
    # stacked weights: the hand computation below runs the same parameters through the plain model
    return Guard(Sampler(cfg, params, load_tokenizer(guard_dir), per_layer=False)), params


def test_p_unsafe_equals_a_softmax_by_hand(guard):
    guard, params = guard
    tok, cfg = guard.sampler.tokenizer, guard.sampler.config
    assert guard.version == 3 and not guard.use_template
    assert (guard.safe_id, guard.unsafe_id) == (tok.encode("safe", bos=False)[0], tok.encode("unsafe", bos=False)[0])
    short = ["Cheese.", ("Wine.", "Should not\n - pour red with fish.")]  # short prompts: a cheap test
    verdicts = guard.classify(CONVERSATIONS, categories=short, max_new_tokens=6)
    ids = [guard.encode(format_prompt(c, categories=short)) for c in CONVERSATIONS]
    assert all(i.count(tok.bos_id) == 1 and i[0] == tok.bos_id for i in ids)
    answers = generate_ids(params, cfg, ids, max_new_tokens=6, strategy=Greedy(), stop_ids=guard.sampler.stop_ids)
    # causal: tokens after position n cannot change its logits, so one padded length (one compile) serves all
    forward = jax.jit(lambda t, at: Llama(cfg).apply({"params": params}, t, logits_at=at)[0, 0])
    for i, a, v in zip(ids, answers, verdicts):
        lead = 0  # tokens the model writes before its answer word: whitespace
        while lead < len(a) and not tok.decode(a[:lead + 1]).strip():
            lead += 1
        seq = i + a[:lead]
        padded = np.zeros((1, 512), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(forward(jnp.asarray(padded), jnp.asarray([len(seq) - 1])), np.float64)
        two = logits[[guard.safe_id, guard.unsafe_id]]
        p = math.exp(two[1] - two.max()) / (math.exp(two[0] - two.max()) + math.exp(two[1] - two.max()))
        assert v.p_unsafe == pytest.approx(p, rel=1e-4, abs=1e-6)
        assert v == parse_verdict(tok.decode(a), v.p_unsafe, {"S1", "S2"})  # the random model's answer, read as such
    assert len({round(v.p_unsafe, 6) for v in verdicts}) == 3  # three conversations, three scores


def test_guard_uses_the_checkpoint_template(guard, guard_dir):
    guard, _ = guard
    tok = guard.sampler.tokenizer
    tok.chat_template, tok.template_tokens = GUARD3_TEMPLATE, {"bos_token": "<|begin_of_text|>"}
    try:
        templated = Guard(guard.sampler)
        ref = _hf(guard_dir, GUARD3_TEMPLATE)
        conversation = CONVERSATIONS[1]
        prompt = templated.prompt(conversation, excluded=["S3"])
        assert prompt == ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                 excluded_category_keys=["S3"])
        expected = ref.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                           excluded_category_keys=["S3"])
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert templated.encode(prompt) == expected
        [v] = templated.classify(conversation, categories=["Cheese."], max_new_tokens=6)
        assert isinstance(v.p_unsafe, float) and 0 <= v.p_unsafe <= 1
        with pytest.raises(ValueError, match="role= applies to the built-in formats"):
            templated.prompt(conversation, role="User")
    finally:
        tok.chat_template, tok.template_tokens = None, {}


def test_cli_prints_the_verdict_as_json(guard_dir, capsys):
    from llama_jax.guard.__main__ import main

    assert main(["--checkpoint", str(guard_dir), "--user", "what color is the sky", "--agent", "blue",
                 "--max-new-tokens", "4", "--category", "Cheese.", "--category", "Wine.", "--exclude", "S1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"safe", "categories", "p_unsafe", "raw", "malformed"} and 0 <= out["p_unsafe"] <= 1
    assert main(["--checkpoint", str(guard_dir), "--user", "x", "--exclude", "S99"]) == 1
    assert "S99" in capsys.readouterr().err


def test_verdict_parsing():
    v = parse_verdict("\n\nsafe", 0.1)
    assert (v.safe, v.categories, v.malformed, v.p_unsafe) == (True, [], None, 0.1)
    v = parse_verdict("unsafe\nS1,S10", known={"S1", "S10"})
    assert (v.safe, v.categories, v.malformed) == (False, ["S1", "S10"], None)
    assert parse_verdict(" unsafe\nO3").categories == ["O3"]  # Llama Guard 1's codes
    assert parse_verdict("unsafe\nS1, S2 \n").categories == ["S1", "S2"]
    for text, why in [("", "empty answer"), ("maybe", "first line 'maybe'"), ("unsafe", "without a line"),
                      ("safe\nS1", "'safe' followed by 'S1'"), ("unsafe\nviolence", "not a category code"),
                      ("unsafe\nS1\nS2", "3 lines"), ("Unsafe\nS1", "first line 'Unsafe'")]:
        v = parse_verdict(text)
        assert v.safe is None and v.categories == [] and why in v.malformed and v.raw == text
    v = parse_verdict("unsafe\nS1,S15", known={"S1", "S2"})
    assert v.safe is None and "not listed in the prompt" in v.malformed


def _ffn(dim, multiplier, multiple_of):
    """Meta's FeedForward hidden size (llama_models)."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@pytest.mark.parametrize("name,repo", [("llama-guard-3-1b", "meta-llama/Llama-Guard-3-1B"),
                                       ("llama-guard-3-8b", "meta-llama/Llama-Guard-3-8B"),
                                       ("llama-guard-2-8b", "meta-llama/Llama-Guard-2-8B")])
def test_guard_presets_match_llama_models(name, repo):
    from llama_models.sku_list import all_registered_models

    [sku] = [m for m in all_registered_models() if m.huggingface_repo == repo]
    a, c = sku.arch_args, LlamaConfig.from_preset(name)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.rms_norm_eps) == \
        (a["dim"], a["n_layers"], a["n_heads"], a["n_kv_heads"], a["norm_eps"])
    assert c.intermediate_size == _ffn(a["dim"], a["ffn_dim_multiplier"], a["multiple_of"])
    assert c.rope_theta == a.get("rope_theta", a.get("rope_freq_base"))
    assert (c.rope_scaling is not None) == a["use_scaled_rope"]
    # Guard 2 is a Llama 3 8B with the Llama 3 tokenizer (128256); sku_list gives it Llama 2's 32000 by mistake
    assert c.vocab_size == 128256 and (a["vocab_size"] == 128256 or name == "llama-guard-2-8b")
