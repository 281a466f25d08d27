"""The jit-compiled sampler: prefill, then a `lax.while_loop` of one-token decode steps.

`stream` is the same decoding for one interactive prompt, one compiled call per token, so a
caller can show each token as it comes (`python -m pe_rlhf generate` / `chat`).

Rows may differ in how they choose tokens: `greedy_B` marks rows that take the
argmax, so ReMax's sampled and greedy rollouts run as one batch in one call.
Log-probs are those of the model's own distribution (log-softmax of the raw
logits, before temperature, top-k or top-p), which is what policy gradients and
KL need.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pe_rlhf.models.kv_cache import KVCache
from pe_rlhf.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. temperature 0 means greedy for every row."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


@struct.dataclass
class SamplingState:
    step: jax.Array  # int32 scalar: tokens generated so far
    done_B: jax.Array  # row has produced EOS
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    mask_BxN: jax.Array  # True on generated tokens, the EOS included; False after it
    logits_BxV: jax.Array  # next-token logits
    cache: KVCache
    rng: jax.Array


@struct.dataclass
class SampleOutput:
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    mask_BxN: jax.Array
    ended_with_eos_B: jax.Array
    length_B: jax.Array


def filter_logits(logits_BxV, *, temperature: float, top_k: int | None, top_p: float | None):
    """Temperature, then top-k, then top-p (nucleus) filtering; removed entries become -inf."""
    logits_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    if top_k is not None and top_k < logits_BxV.shape[-1]:
        kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B, -jnp.inf, logits_BxV)
    if top_p is not None and top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep a token while the mass strictly before it is below top_p (the top token always stays)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_B = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_B, -jnp.inf, logits_BxV)
    return logits_BxV


def _choose(logits_BxV, greedy_B, rng, cfg: SamplingConfig):
    greedy_tok_B = jnp.argmax(logits_BxV, axis=-1)
    if cfg.temperature == 0.0:
        return greedy_tok_B
    filtered = filter_logits(logits_BxV, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    sampled_tok_B = jax.random.categorical(rng, filtered, axis=-1)
    return jnp.where(greedy_B, greedy_tok_B, sampled_tok_B)


def sample_traced(model: Transformer, prompt_BxT, prompt_mask_BxT, greedy_B, rng, eos_ids, pad_id,
                  cfg: SamplingConfig) -> SampleOutput:
    """The sampler's body, for use inside a function that is already being jit-compiled (the RL step)."""
    b, t = prompt_BxT.shape
    n = cfg.max_new_tokens
    # prefill (attention over the prompt by the model's kernel; `Transformer.prefill`): vocabulary logits
    # at the last prompt position only (not [B, T, V], which for a 262k vocabulary is the largest buffer
    # of a long-prompt rollout)
    h_BxTxD, cache = model.prefill(prompt_BxT, input_mask_BxT=prompt_mask_BxT, length=t + n)
    eos_E = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    state = SamplingState(
        step=jnp.zeros((), jnp.int32),
        done_B=jnp.zeros((b,), bool),
        tokens_BxN=jnp.full((b, n), pad_id, jnp.int32),
        logprobs_BxN=jnp.zeros((b, n), jnp.float32),
        mask_BxN=jnp.zeros((b, n), bool),
        logits_BxV=model.logits(h_BxTxD[:, -1]),  # prompts are left-padded: the last column is real
        cache=cache,
        rng=rng,
    )

    def cond(s: SamplingState):
        return (s.step < n) & ~jnp.all(s.done_B)

    def body(s: SamplingState):
        rng, step_rng = jax.random.split(s.rng)
        tok_B = _choose(s.logits_BxV, greedy_B, step_rng, cfg).astype(jnp.int32)
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(s.logits_BxV, axis=-1), tok_B[:, None], -1)[:, 0]
        live_B = ~s.done_B
        tok_B = jnp.where(live_B, tok_B, pad_id)
        tokens = s.tokens_BxN.at[:, s.step].set(tok_B)
        logprobs = s.logprobs_BxN.at[:, s.step].set(jnp.where(live_B, logprob_B, 0.0))
        mask = s.mask_BxN.at[:, s.step].set(live_B)
        done_B = s.done_B | jnp.isin(tok_B, eos_E)
        logits_Bx1xV, cache = model.decode(tok_B[:, None], s.cache, input_mask_BxT=live_B[:, None])
        return SamplingState(step=s.step + 1, done_B=done_B, tokens_BxN=tokens, logprobs_BxN=logprobs,
                             mask_BxN=mask, logits_BxV=logits_Bx1xV[:, 0], cache=cache, rng=rng)

    state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(tokens_BxN=state.tokens_BxN, logprobs_BxN=state.logprobs_BxN, mask_BxN=state.mask_BxN,
                        ended_with_eos_B=state.done_B, length_B=state.mask_BxN.sum(axis=1))


@functools.partial(jax.jit, static_argnames=("graphdef", "eos_ids", "pad_id", "cfg"))
def _sample_jit(graphdef, state, prompt_BxT, prompt_mask_BxT, greedy_B, rng, eos_ids, pad_id, cfg):
    return sample_traced(nnx.merge(graphdef, state), prompt_BxT, prompt_mask_BxT, greedy_B, rng, eos_ids, pad_id, cfg)


def sample(model: Transformer, prompt_BxT, prompt_mask_BxT=None, *, rng=None, max_new_tokens: int = 64,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           greedy_B=None, eos_ids=None, pad_id: int | None = None) -> SampleOutput:
    """Generate up to `max_new_tokens` after left-padded prompts, in one compiled call.

    `greedy_B` (bool per row) forces argmax on some rows; temperature 0 makes every row greedy.
    `eos_ids` default to the model config's; a row stops at its first EOS (which it keeps in its
    mask) and everything after is padding with mask False.
    """
    prompt_BxT = jnp.asarray(prompt_BxT, jnp.int32)
    b = prompt_BxT.shape[0]
    prompt_mask_BxT = jnp.ones_like(prompt_BxT, bool) if prompt_mask_BxT is None else jnp.asarray(prompt_mask_BxT, bool)
    greedy_B = jnp.zeros((b,), bool) if greedy_B is None else jnp.asarray(greedy_B, bool)
    rng = jax.random.key(0) if rng is None else rng
    cfg = model.config
    eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                          top_p=top_p)
    graphdef, state = nnx.split(model)
    return _sample_jit(graphdef, state, prompt_BxT, prompt_mask_BxT, greedy_B, rng, eos, int(pad), scfg)


# -- one prompt, token by token ----------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, prompt_1xT, prompt_mask_1xT, length):
    model = nnx.merge(graphdef, state)
    h_1xTxD, cache = model.prefill(prompt_1xT, input_mask_BxT=prompt_mask_1xT, length=length)
    return model.logits(h_1xTxD[:, -1]), cache


@functools.partial(jax.jit, static_argnums=(0, 5))
def _next_token(graphdef, state, logits_1xV, cache, rng, cfg: SamplingConfig):
    """The body of `sample_traced`'s loop for one live row: choose a token, then decode it."""
    model = nnx.merge(graphdef, state)
    tok_1 = _choose(logits_1xV, jnp.zeros((1,), bool), rng, cfg).astype(jnp.int32)
    logits_1x1xV, cache = model.decode(tok_1[:, None], cache)
    return tok_1[0], logits_1x1xV[:, 0], cache


def stream(model: Transformer, prompt_ids: Sequence[int], *, rng=None, max_new_tokens: int = 64,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_ids=None,
           bucket: int = 64) -> Iterator[int]:
    """Yield the tokens `sample` would generate after one prompt, each as soon as it is chosen.

    The same choice (`_choose`), the same per-step key splits and the same KV cache as `sample`,
    but one jit-compiled call per token instead of one `while_loop`, so the caller sees tokens as
    they come. The first EOS is yielded and ends the stream. The prompt is left-padded to a multiple
    of `bucket` tokens, so prompts of similar length (the turns of a chat) share one compilation.
    """
    n = max_new_tokens
    t = -(-len(prompt_ids) // bucket) * bucket
    prompt_1xT = jnp.asarray([[0] * (t - len(prompt_ids)) + list(prompt_ids)], jnp.int32)
    mask_1xT = jnp.arange(t)[None] >= t - len(prompt_ids)
    eos = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
    cfg = SamplingConfig(max_new_tokens=n, temperature=float(temperature), top_k=top_k, top_p=top_p)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    logits_1xV, cache = _prefill(graphdef, state, prompt_1xT, mask_1xT, t + n)
    for _ in range(n):
        rng, step_rng = jax.random.split(rng)
        tok, logits_1xV, cache = _next_token(graphdef, state, logits_1xV, cache, step_rng, cfg)
        tok = int(tok)
        yield tok
        if tok in eos:
            return
