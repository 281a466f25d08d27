"""A scalar reward head on the decoder backbone, read at the last real token; ensembles of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pe_rlhf.models.attention import Packing
from pe_rlhf.models.transformer import Transformer


def last_real_index(mask_BxT):
    """Index of the last True of each row: works for left and right padding alike."""
    t = mask_BxT.shape[1]
    return t - 1 - jnp.argmax(mask_BxT[:, ::-1].astype(jnp.int32), axis=1)


class ScalarHead(nnx.Module):
    """r = h · w + b in float32. Zero-initialised weight: a fresh reward model scores every text 0."""

    def __init__(self, hidden_size: int):
        self.kernel = nnx.Param(jnp.zeros((hidden_size,), jnp.float32), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, h_BxD):
        return h_BxD.astype(jnp.float32) @ self.kernel[...] + self.bias[...]


class RewardModel(nnx.Module):
    """Backbone + `ScalarHead`. The backbone may be shared with a policy (same Python object).

    `adapters` names the LoRA adapters active while scoring (None: leave the backbone as it is);
    this is how a reward adapter and a policy adapter share one copy of the base weights.
    """

    def __init__(self, backbone: Transformer, *, adapters: tuple[str, ...] | None = None):
        self.backbone = backbone
        self.head = ScalarHead(backbone.config.hidden_size)
        self.adapters = adapters

    def _hidden(self, tokens_BxT, mask_BxT=None, **packed):
        if self.adapters is None:
            return self.backbone.hidden(tokens_BxT, input_mask_BxT=mask_BxT, **packed)[0]
        from pe_rlhf.models.lora import use_adapters

        with use_adapters(self.backbone, *self.adapters):
            return self.backbone.hidden(tokens_BxT, input_mask_BxT=mask_BxT, **packed)[0]

    def __call__(self, tokens_BxT, mask_BxT):
        """One score per sequence, read at its last real token: [B]."""
        mask_BxT = mask_BxT.astype(bool)
        h_Bx1xD = self._hidden(tokens_BxT, mask_BxT, read_BxM=last_real_index(mask_BxT)[:, None])
        return self.head(h_Bx1xD[:, 0])

    def score_packed(self, batch, span: int):
        """Scores of a packed batch (`pe_rlhf.data.packing`): [R, P, K], one per response of each item.

        `span` is the longest segment the batch may hold (an item, prompt + responses; or with an unshared
        prompt one sequence, prompt + response), a static int.
        """
        r, p, k = batch["read_RxPxK"].shape
        # k continuations of a shared prompt; a batch without `branch_RxN` lays each response out as its own
        # sequence (`PackOptions.share_prompt=False`). One continuation lets a fused attention kernel take the rows.
        branch_RxN = batch.get("branch_RxN")
        if branch_RxN is None:
            packing = Packing(batch["segment_RxN"], jnp.zeros_like(batch["segment_RxN"]), span=span, branches=1)
        else:
            packing = Packing(batch["segment_RxN"], branch_RxN, span=span, branches=k)
        h_RxPKxD = self._hidden(batch["tokens_RxN"], positions_BxT=batch["positions_RxN"], packing=packing,
                                read_BxM=batch["read_RxPxK"].reshape(r, p * k))
        return self.head(h_RxPKxD).reshape(r, p, k)

    def token_values(self, tokens_BxL, mask_BxL, prompt_len: int):
        """A score at every position that predicts a response token (PPO's value of each state): [B, N].

        Aligned with the policy's response logits: column n reads position prompt_len - 1 + n.
        """
        h_BxLxD = self._hidden(tokens_BxL, mask_BxL.astype(bool))
        return self.head(h_BxLxD[:, prompt_len - 1:-1])




# -- ensembles ----------------------------------------------------------------------------------
ENSEMBLE_RULES = ("mean", "mean_minus_std", "min")


@dataclasses.dataclass(frozen=True)
class EnsembleRule:
    """How K reward models' scores become one reward.

    mean: the average; mean_minus_std: mean - penalty * std over the members (population std),
    uncertainty-penalised; min: the most pessimistic member (worst-case optimisation). Coste et
    al. 2023 (arXiv 2310.02743) found the conservative rules to curb over-optimisation.

    standardise: first put each member's score in common units, (s - mean_k) / std_k, with member
    k's mean and std over the held-out responses (`train_reward_ensemble` records them). A
    Bradley-Terry reward is defined only up to a constant, so members that learnt the same ranking
    can sit at different offsets and scales; raw, `min` would follow whichever member has the
    lowest offset and `std` would measure the offsets, not the members' disagreement. Coste et al.
    normalise their members likewise.
    """

    rule: str = "mean"
    penalty: float = 1.0
    standardise: bool = True

    def __post_init__(self):
        if self.rule not in ENSEMBLE_RULES:
            raise ValueError(f"EnsembleRule.rule {self.rule!r} is not one of {ENSEMBLE_RULES}")
        if not (isinstance(self.penalty, (int, float)) and self.penalty >= 0):
            raise ValueError(f"EnsembleRule.penalty must be a number >= 0, got {self.penalty!r}")
        if not isinstance(self.standardise, bool):
            raise ValueError(f"EnsembleRule.standardise must be True or False, got {self.standardise!r}")


def member_stats(scores_KxN) -> list[dict]:
    """Each member's mean and (population) std over N scores: what `standardise_scores` divides out."""
    s = np.asarray(scores_KxN, np.float64)
    return [{"mean": float(m), "std": float(sd)} for m, sd in zip(s.mean(axis=1), s.std(axis=1))]


def standardise_scores(scores_Kx, stats: Sequence[dict]):
    """(s_k - mean_k) / std_k for member k (leading axis), `stats` as `member_stats` gives them."""
    if len(stats) != scores_Kx.shape[0]:
        raise ValueError(f"standardise_scores: {len(stats)} members' stats for {scores_Kx.shape[0]} members")
    bad = [k for k, st in enumerate(stats) if not st["std"] > 0]
    if bad:
        raise ValueError(f"standardise_scores: member(s) {bad} gave one score to every held-out response "
                         f"(std 0); they cannot be put in common units")
    shape = (-1,) + (1,) * (scores_Kx.ndim - 1)
    mean = np.asarray([st["mean"] for st in stats], np.float32).reshape(shape)
    std = np.asarray([st["std"] for st in stats], np.float32).reshape(shape)
    return (scores_Kx - mean) / std


def combine_rewards(scores_KxB, rule: EnsembleRule = EnsembleRule()):
    """One reward per row from K members' scores: [K, B] -> [B], by `rule` (scores already standardised
    where the rule says so: `RewardEnsemble` does that)."""
    if rule.rule == "mean":
        return scores_KxB.mean(axis=0)
    if rule.rule == "min":
        return scores_KxB.min(axis=0)
    return scores_KxB.mean(axis=0) - rule.penalty * scores_KxB.std(axis=0)


class RewardEnsemble(nnx.Module):
    """K reward models scored one after another and combined by an `EnsembleRule`.

    The members usually share one backbone, each with its own adapter and head: K forward passes
    over one copy of the base weights. Called like a `RewardModel`. `stats` (`member_stats` of the
    members' held-out scores) are required when `rule.standardise`.
    """

    def __init__(self, members, *, rule: EnsembleRule = EnsembleRule(), stats: Sequence[dict] | None = None):
        self.members = nnx.List(list(members))
        self.rule = rule
        if rule.standardise and stats is None:
            raise ValueError("RewardEnsemble: rule.standardise needs each member's held-out mean and std (stats=); "
                             "pass them, or EnsembleRule(standardise=False) to combine raw scores")
        if stats is not None and len(stats) != len(self.members):
            raise ValueError(f"RewardEnsemble: stats for {len(stats)} members, {len(self.members)} members given")
        # static floats (hashable, folded into the jitted step as constants)
        self.means = None if stats is None else tuple(float(st["mean"]) for st in stats)
        self.stds = None if stats is None else tuple(float(st["std"]) for st in stats)

    @property
    def stats(self) -> list[dict] | None:
        return None if self.means is None else [{"mean": m, "std": s} for m, s in zip(self.means, self.stds)]

    def member_scores(self, tokens_BxT, mask_BxT):
        """Each member's raw score: [K, B]."""
        return jnp.stack([m(tokens_BxT, mask_BxT) for m in self.members])

    def _combine(self, scores_Kx):
        if self.rule.standardise:
            scores_Kx = standardise_scores(scores_Kx, self.stats)
        return combine_rewards(scores_Kx, self.rule)

    def __call__(self, tokens_BxT, mask_BxT):
        return self._combine(self.member_scores(tokens_BxT, mask_BxT))

    def score_packed(self, batch, span: int):
        """`RewardModel.score_packed` of each member, combined: [R, P, K]."""
        return self._combine(jnp.stack([m.score_packed(batch, span) for m in self.members]))
