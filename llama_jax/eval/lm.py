"""`JaxLM`: lm-evaluation-harness's `LM` backed by our model, so any lm-eval task runs on a llama_jax checkpoint.

    lm = JaxLM.load("runs/default", batch_size=16)          # or JaxLM(Sampler(config, params, tokenizer))
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])   # or llama_jax.eval.evaluate(lm, ...)

It reproduces lm-eval's own Hugging Face backend (`HFLM`) request for request, so numbers compare with
published ones: the same text -> token rule (below), the same context truncation and rolling windows, the
same stop-string cut. What differs is how the model runs: log-likelihoods come from one compiled scoring
program per length bucket (scoring.py), generations from our Sampler (one compiled prefill/decode program).

The BOS rule, as HFLM applies it with transformers' tokenizer for the same files: a string gets a BOS in front
when the tokenizer would add one by default (a tokenizer.json: when its post-processor writes one;
SentencePiece / tiktoken tokenizer.model: yes, unless tokenizer_config.json says "add_bos_token": false),
except a string that already starts with the BOS text. Special-token text ("<|eot_id|>", as chat templates
write it) is read as the control token, as transformers does. Like HFLM, `loglikelihood_rolling` encodes the
document with that BOS and conditions its first window on the BOS again (`prefix_token_id`), so a document's
first scored token is the BOS itself: kept, so that perplexities equal HFLM's.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llama_jax.errors import EvalError
from llama_jax.eval.scoring import Scorer
from llama_jax.sampling import Greedy, Sampler, make_strategy

FIRST_BUDGET = 32  # greedy generation runs 32 new tokens first, then x4, until every row stops (see _generate)


def adds_bos(tokenizer) -> bool:
    """Whether transformers' tokenizer for these files puts a BOS in front of encoded text by default: the
    tokenizer's own rule (`add_bos`, read from its files when it was loaded; see llama_jax/text/tokenizer.py)."""
    return bool(tokenizer.add_bos) and tokenizer.bos_id is not None


class JaxLM(TemplateLM):
    """lm-eval's `LM` over a `Sampler` (its config, stacked params, tokenizer and mesh).

    `batch_size`: rows per compiled model call (scoring and generation); `max_length`: the context
    (default: the model's max_position_embeddings, as HFLM); `add_bos`: override the BOS rule (module
    docstring); `max_gen_toks`: the generation budget of requests that name none (HFLM's 256).
    """

    def __init__(self, sampler: Sampler, batch_size: int = 8, max_length: Optional[int] = None,
                 add_bos: Optional[bool] = None, max_gen_toks: int = 256, seed: int = 0):
        super().__init__()
        from llama_jax.cpu.decode_layout import is_per_layer

        if is_per_layer(sampler.params):
            raise EvalError("JaxLM needs stacked parameters: build the Sampler with per_layer=False")
        self.sampler, self.tok, self.config = sampler, sampler.tokenizer, sampler.config
        self.scorer = Scorer(sampler.config, sampler.params, sampler.mesh, batch_size)
        self._max_length = int(max_length or sampler.config.max_position_embeddings)
        self.add_bos = adds_bos(self.tok) if add_bos is None else bool(add_bos)
        self._bos_text = self.tok.token_str(self.tok.bos_id) if self.tok.bos_id is not None else None
        self._max_gen_toks, self.seed = int(max_gen_toks), seed

    @classmethod
    def load(cls, path, *, mesh=None, dtype: Optional[str] = None, **kwargs) -> "JaxLM":
        """A llama_jax checkpoint, training workdir, or Hugging Face / Meta directory (with its tokenizer)."""
        return cls(Sampler.load(path, mesh=mesh, dtype=dtype, per_layer=False), **kwargs)

    # ---- what lm-eval reads ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return os.path.abspath(self.tok.path).replace("/", "__")

    def chat_template(self, chat_template=False) -> Optional[str]:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> List[int]:
        """Text -> ids under the BOS rule (module docstring); `add_special_tokens` True/False forces it."""
        bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            bos = False  # the text brings its own BOS
        ids = self.tok._encode_with_specials(string) if string else []
        if bos and self.tok.bos_id is not None:
            ids = [self.tok.bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    # ---- scoring -----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """requests [(cache key, context ids, continuation ids)] -> [(log p(continuation | context), whether
        the continuation is the greedy one)]; the context is cut on the left to fit max_length, as HFLM."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise EvalError(f"loglikelihood request with {len(context)} context and {len(continuation)} "
                                "continuation tokens: expected at least one of each")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:]))
        with tqdm(total=len(rows), disable=disable_tqdm, desc="loglikelihood") as bar:
            scores = self.scorer(rows, on_batch=bar.update)
        results = []
        for (key, _, continuation), (logp, greedy) in zip(requests, scores):
            n = len(continuation)
            answer = (float(logp[-n:].astype("float64").sum()), bool(greedy[-n:].all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """The log-likelihood of each whole document, scored in disjoint windows of max_length tokens."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, predicted))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Continue each context until a stop string (`until`, plus the EOS text) or `max_gen_toks` tokens;
        the text is cut before the first stop string. Requests with the same settings share batches."""
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        eos_text = self.tok.token_str(self.tok.eos_id) if self.tok.eos_id is not None else None
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_new = int(kwargs.pop("max_gen_toks"))
                if not 0 < max_new < self.max_length:
                    raise EvalError(f"max_gen_toks={max_new}: expected 1 to {self.max_length - 1} (the model's "
                                    f"context is {self.max_length} tokens)")
                strategy = _strategy(kwargs)
                prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                           for i in indices}
                order = sorted(indices, key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    texts = self._generate([prompts[i] for i in chunk], max_new, strategy, until)
                    for i, text in zip(chunk, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return out

    def _generate(self, prompts: List[List[int]], max_new: int, strategy, until: List[str]) -> List[str]:
        """Texts of one batch, each cut before its first stop string. Greedy decoding first runs FIRST_BUDGET
        tokens and reruns only the rows that have neither stopped nor hit a stop string with 4x the budget
        (greedy tokens do not depend on the budget), so a short answer never pays for max_gen_toks."""
        texts: List[Optional[str]] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        budget = min(max_new, FIRST_BUDGET) if isinstance(strategy, Greedy) else max_new
        while todo:
            outs = self.sampler.generate_ids([prompts[i] for i in todo], budget, strategy=strategy, seed=self.seed)
            left = []
            for i, ids in zip(todo, outs):
                text = self.tok.decode(ids)
                if len(ids) < budget or budget >= max_new or any(s and s in text for s in until):
                    texts[i] = postprocess_generated_text(text, until, None)
                else:
                    left.append(i)
            todo, budget = left, min(max_new, budget * 4)
        return texts


def _strategy(kwargs: dict):
    """lm-eval's generation kwargs (normalised) -> our strategy: greedy unless do_sample."""
    if not kwargs.get("do_sample"):
        return Greedy()
    return make_strategy(temperature=float(kwargs.get("temperature") or 1.0), top_k=kwargs.get("top_k"),
                         top_p=kwargs.get("top_p"))
