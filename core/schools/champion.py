"""Champion: GRPO (Shao et al. 2024, DeepSeekMath §4.1; TRL's ``GRPOTrainer``) on the one engine.

**Records** are TRL's prompt-only type (format ``prompt_only``): ``prompt`` (a string, or messages ending with a
user turn) and any other columns, passed to the rewards as keyword arguments (``answer`` for
``numeric_answer``, ``exact_match`` and skill scorers). The cursor counts prompts: a step consumes
``micro_batch_size x gradient_accumulation_steps`` prompts (TRL: ``per_device_train_batch_size x
gradient_accumulation_steps / num_generations``), so after a SIGKILL the quest resumes at the same prompt and
no prompt is trained twice.

**Per step** (:meth:`Champion.collate`, per micro-batch of prompts): each prompt ``q`` gets ``G =
num_generations`` completions ``o_1..o_G`` sampled from the live hero (:func:`core.schools.sampling.sample_group`,
eval mode, no grad; one batched ``generate`` per micro-batch) from a generator seeded with
``sampling_seed("grpo", training.seed, global_step, line)``: a pure function of checkpointed state (the seed is config, the global step and the cursor are in the checkpoint), so a resumed
step samples exactly the completions the uninterrupted run sampled -- no generator state to store, and nothing
that draws from the global RNG elsewhere (a trial, dropout) can shift the samples. Each completion gets the
reward ``r_i`` (:func:`core.rewards.build_reward`, a weighted sum) and the group-normalised advantage

    ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)``   (``std`` with Bessel's correction, as TRL's ``nanstd``;
    ``scale_rewards: none``: ``A_i = r_i - mean(r)``, Dr. GRPO)

**Loss** (TRL ``loss_type="dapo"``, its default; ``num_iterations`` 1): with ``pi_t`` the hero's probability of
completion token ``t`` under logits divided by ``temperature``, ``pi_old`` the same value detached (one update
per generation batch, so the ratio is 1 but its gradient is TRL's), ``eps = epsilon``,

    ``l_t = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta KL_t``,  ``rho_t = pi_t / pi_old``
    ``KL_t = pi_ref / pi_t - log(pi_ref / pi_t) - 1``   (Schulman's k3 estimator, only when ``beta`` is set)

summed over every completion token of the step and divided by their number (the engine's step denominator:
exact under gradient accumulation and OOM halving; TRL: ``num_items_in_batch``).

**Reference** (``beta`` > 0 only; TRL's default ``beta`` 0.0 needs none): the hero at the quest's start. With an
adapter (LoRA) it is the adapter's weights as the quest started (the base plus the adapter trained by earlier
quests; the base alone when the adapter is new, as TRL's disabled adapter), swapped into the live adapter for
each reference forward (megabytes); else a frozen copy of the weights (one more copy in memory for the quest).
Either is written at the quest's start beside its file (``<stored name>.reference.safetensors``) and read back on
resume, so the KL term after a SIGKILL is the uninterrupted run's.

**Metrics** (TRL's names): ``reward``, ``reward_std`` (mean of the groups' std), ``rewards/<name>/mean`` per
reward, ``kl`` (mean per token), ``completions/mean_length`` (tokens), ``completions/clipped_ratio`` (share cut
at ``max_completion_length``). **Evaluation** (held-out prompts): ``eval_loss`` is minus the mean reward of one
greedy completion per prompt (lower is better, as for the other schools).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.chat import IGNORE_INDEX, TokenizedExample
from core.formats import RecordError
from core.schools.base import School, collate_sequences
from core.schools.sampling import generating, sample_group, sample_groups, sampling_seed, stop_token_ids

if TYPE_CHECKING:
    from core.engine import Engine

STD_EPSILON = 1e-4
"""Added to the group std before dividing (TRL's value)."""


@dataclass
class PromptItem:
    """One prompt record: its rendered tokens ``prompt_ids`` (left-truncated so the completion fits in
    ``max_length``), its text for the rewards, the other columns ``refs``, and its ``line``."""

    prompt_ids: list[int]
    text: str
    refs: dict[str, Any]
    line: int

    @property
    def sequences(self) -> tuple[()]:
        return ()


@dataclass
class GroupBatch:
    """A micro-batch of prompts with their sampled groups: ``batch``/``index`` (the ``P x G`` sequences,
    :func:`core.schools.base.collate_sequences`), per-sequence ``advantages`` ``(P*G,)``, per-position
    reference log-probs ``ref`` (the batch's ``input_ids`` shape, or None), ``mask_tokens`` (completion
    tokens), ``metrics`` ``(M, 2)`` sums and counts known before the forward pass."""

    items: list[PromptItem]
    batch: Any
    index: torch.Tensor
    advantages: torch.Tensor
    ref: torch.Tensor | None
    mask_tokens: int
    num_tokens: int
    metrics: torch.Tensor
    completions: list[str] = field(default_factory=list)


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, group std)``, both ``(P, G)`` fp32, of rewards ``(P, G)`` (one row per prompt):
    ``(r - mean) / (std + 1e-4)`` with the unbiased std (TRL's ``scale_rewards="group"``), or ``r - mean``."""
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return (centred / (std + STD_EPSILON) if scale else centred), std.expand_as(rewards)


def grpo_token_losses(logps: torch.Tensor, advantages: torch.Tensor, epsilon: float, beta: float = 0.0,
                      ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token GRPO losses and k3 KL (``(N,)`` each, KL None without a reference) of completion tokens:
    ``logps`` their log-probs (nats, with grad), ``advantages`` their sequence's advantage, ``ref_logps``
    the reference's. ``pi_old`` = ``logps`` detached (TRL with ``num_iterations`` 1)."""
    ratio = torch.exp(logps - logps.detach())
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if beta:
            losses = losses + beta * kl
    return losses, kl


class Champion(School):
    """GRPO (see the module doc). Items: :class:`PromptItem`; batches: :class:`GroupBatch`; the step's
    denominator: its completion tokens."""

    name = "grpo"
    unit = "tokens"

    def __init__(self, rule):
        super().__init__(rule)
        self.beta = rule.beta if "beta" in rule.model_fields_set else 0.0
        self.reward = None
        self.reference = None  # a frozen copy (full weights) or "adapter" (the base with the adapter disabled)
        self.metric_names = ("reward", "reward_std", "kl", "completions/mean_length", "completions/clipped_ratio")

    # --- records ------------------------------------------------------------------------------------
    def encode(self, example: dict, tokenizer, max_length: int, line: int) -> PromptItem:
        prompt = example["prompt"]
        if isinstance(prompt, str):
            text = prompt
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if ids and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
        else:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        room = max(1, max_length - self.rule.max_completion_length)
        refs = {k: v for k, v in example.items() if k != "prompt"}
        return PromptItem(list(ids[-room:]), text, refs, line)

    def _rewards(self, engine: Engine):
        if self.reward is None:
            self.reward = rule_reward(self.rule, engine.realm.root, engine.config.skills)
            names = tuple(f"rewards/{n}/mean" for n, _, _ in self.reward.components)
            self.metric_names = self.metric_names[:5] + names
        return self.reward

    def other_model_bytes(self, engine: Engine) -> int:
        """With ``beta`` set and no adapter: a frozen copy of the hero's weights (bytes as held)."""
        if not self.beta or engine.adapter is not None:
            return 0
        return sum(p.numel() * p.element_size() for p in engine._raw_model.parameters())

    def end_quest(self) -> None:
        """Stop the sandboxed ``file:`` reward workers and drop the frozen reference copy now, not at garbage
        collection."""
        close = getattr(self.reward, "close", None)
        if close is not None:
            close()
        self.reward, self.reference = None, None

    # --- a step ---------------------------------------------------------------------------------------
    def collate(self, engine: Engine, rows: list[list[PromptItem]]) -> GroupBatch:
        items = [row[0] for row in rows]
        reward = self._rewards(engine)
        g, rule, tok = self.rule.num_generations, self.rule, engine.tokenizer
        stops = stop_token_ids(tok)
        model = engine._raw_model
        seqs, texts, ended = [], [], []
        seeds = [sampling_seed("grpo", engine.config.training.seed, engine.global_step, it.line) for it in items]
        with generating(model):
            groups = sample_groups(model, [it.prompt_ids for it in items], g, max_new_tokens=rule.max_completion_length,
                                   temperature=rule.temperature, seeds=seeds, stops=stops, pad_token_id=tok.pad_token_id)
        for item, group in zip(items, groups, strict=True):
            for ids, done in group:
                seqs.append(_sequence(item, ids))
                texts.append(_completion_text(tok, ids, stops))
                ended.append(done)
        scores = [self._score(reward, item, texts[k * g + j]) for k, item in enumerate(items) for j in range(g)]
        total = torch.tensor([s["total"] for s in scores], dtype=torch.float32).view(len(items), g)
        adv, std = group_advantages(total, rule.scale_rewards == "group")
        batch, index = collate_sequences(engine, seqs)
        lengths = torch.tensor([len(s.input_ids) - len(items[k // g].prompt_ids) for k, s in enumerate(seqs)],
                               dtype=torch.float32)
        n = float(len(seqs))
        rows_m = [[total.sum().item(), n], [std.sum().item(), n], [0.0, 0.0], [lengths.sum().item(), n],
                  [float(sum(not e for e in ended)), n]]
        rows_m += [[sum(s[name] for s in scores), n] for name, _, _ in reward.components]
        ref = self._reference_logps(engine, batch) if self.beta else None
        return GroupBatch(items, batch, index, adv.reshape(-1), ref, int(lengths.sum().item()),
                          sum(len(s.input_ids) for s in seqs), torch.tensor(rows_m, dtype=torch.float32), texts)

    def _score(self, reward, item: PromptItem, completion: str) -> dict[str, float]:
        try:
            return reward.scores(item.text, completion, **item.refs)
        except (TypeError, ValueError, KeyError) as exc:
            raise RecordError(f"line {item.line}: the reward cannot score this record: {type(exc).__name__}: "
                              f"{exc} (columns {sorted(item.refs)})") from None

    def denominator(self, batches: list[GroupBatch]) -> int:
        return sum(b.mask_tokens for b in batches)

    def tokens(self, batches: list[GroupBatch]) -> int:
        return sum(b.num_tokens for b in batches)

    def _token_logps(self, engine: Engine, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log-probs ``(B, L)`` of the next token under logits / temperature, and the mask of
        completion positions ``(B, L)`` bool."""
        b = batch.to(engine.device)
        logits = engine.logits(b).float() / self.rule.temperature
        targets = F.pad(b.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        logps = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
        return logps, targets != IGNORE_INDEX

    def loss_sum(self, engine: Engine, b: GroupBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logps, mask = self._token_logps(engine, b.batch)
        device = logps.device
        adv = b.advantages.to(device)[b.index.to(device)]  # each position's sequence's advantage
        ref = b.ref.to(device)[mask] if b.ref is not None else None
        losses, kl = grpo_token_losses(logps[mask], adv[mask], self.rule.epsilon, self.beta, ref)
        metrics = b.metrics.to(device).clone()
        if kl is not None:
            metrics[2] = torch.stack([kl.detach().sum(), torch.tensor(float(kl.numel()), device=device)])
        return losses.sum(), metrics

    # --- the reference (beta > 0) ----------------------------------------------------------------------
    def begin_quest(self, engine: Engine, quest_id: int, path: Path | None, examples_done: int) -> None:
        """Set up the quest-start reference when ``beta`` is set (see the module doc). Raises
        :class:`core.schools.reference.ReferenceError` when a started quest's stored reference is missing."""
        if not self.beta:
            return
        from core.schools.reference import ReferenceError, _load, save_reference

        lora = engine.adapter is not None
        if lora:  # the adapter's quest-start weights (megabytes), swapped in for the reference's forward
            from core.adapters import adapter_state

            model, state = None, adapter_state(engine._raw_model)
        else:
            model, state = copy.deepcopy(engine._raw_model).eval().requires_grad_(False), {}
        if path is not None and path.exists():
            tensors, meta = _load(path)
            if meta.get("quest_id") != str(quest_id) or meta.get("school") != self.name:
                raise ReferenceError(f"{path.name} holds the reference of quest {meta.get('quest_id')} "
                                     f"({meta.get('school')}), not of quest {quest_id} ({self.name})")
            if lora:
                state = tensors
            else:
                model.load_state_dict(tensors, strict=False)
        elif examples_done > 0:
            raise ReferenceError(f"quest {quest_id} trained {examples_done} prompts already but its reference "
                                 "weights are missing: it cannot resume exactly; drop the file again as a new quest")
        elif path is not None:
            if not lora:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            save_reference(path, _untied(state), {"quest_id": quest_id, "school": self.name,
                                                  "global_step": engine.global_step})
        self.reference = _AdapterReference(state) if lora else model

    @torch.no_grad()
    def _reference_logps(self, engine: Engine, batch: Any) -> torch.Tensor:
        """``(N,)`` token log-probs of the quest-start hero (called in :meth:`collate`, before any forward
        pass of the step keeps a graph: the adapter swap writes the adapter's weights in place)."""
        if isinstance(self.reference, _AdapterReference):
            with self.reference.swapped_in(engine._raw_model):
                logps, _ = self._token_logps(engine, batch)
            return logps.detach().cpu()
        if self.reference is None:  # no quest start seen (e.g. a bare evaluate): the current weights
            return self._token_logps(engine, batch)[0].detach().cpu()
        live = engine.model
        engine.model = self.reference
        try:
            logps, _ = self._token_logps(engine, batch)
        finally:
            engine.model = live
        return logps.detach().cpu()

    # --- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, engine: Engine, items: list[PromptItem]) -> float:
        """Minus the mean reward of one greedy completion per held-out prompt; NaN without prompts."""
        if not items:
            return float("nan")
        return -self.greedy_reward(engine._raw_model, engine.tokenizer, items, self._rewards(engine))

    @torch.no_grad()
    def greedy_reward(self, model, tokenizer, items: list[PromptItem], reward) -> float:
        """The mean reward (``reward``: :func:`rule_reward`) of one greedy completion of at most
        ``max_completion_length`` tokens per prompt of ``items`` (non-empty). Raises :class:`RecordError`
        when the reward cannot score a record."""
        stops = stop_token_ids(tokenizer)
        total = 0.0
        with generating(model):
            for item in items:
                ((ids, _),) = sample_group(model, item.prompt_ids, 1, do_sample=False, seed=0,
                                           max_new_tokens=self.rule.max_completion_length, temperature=1.0,
                                           stops=stops, pad_token_id=tokenizer.pad_token_id)
                total += self._score(reward, item, _completion_text(tokenizer, ids, stops))["total"]
        return total / len(items)


def rule_reward(rule, realm_root: Path, skills_config) -> Any:
    """The reward of a grpo rule: its ``rewards`` spec (:func:`core.rewards.build_reward`, ``file:`` paths
    inside ``realm_root``), or, when it names none, each record's ``skill`` scorer on its ``answer``. Raises
    :class:`core.rewards.RewardSpecError` for a bad spec."""
    from core.rewards import build_reward
    from core.skills.registry import build_registry

    registry = build_registry(realm_root, skills_config)
    if rule.rewards is None:
        return _RecordSkillReward(registry.skills)
    return build_reward(rule.rewards, realm_root=realm_root, skills=registry.skills)


class _RecordSkillReward:
    """The reward when a rule names none: each record's ``skill`` scorer on its ``answer`` (skill quests)."""

    def __init__(self, skills: dict[str, Any]):
        self.skills = skills
        self.components = [("skill", None, 1.0)]

    def scores(self, prompt: str, completion: str, *, skill: str | None = None, answer: Any = None,
               **_: Any) -> dict[str, float]:
        if skill not in self.skills or answer is None:
            raise ValueError(f"no rewards in this file's schools rule, and the record has no known skill + answer "
                             f"(skill {skill!r}; skills: {', '.join(sorted(self.skills)) or 'none'}): set "
                             "config schools[<glob>].rewards")
        value = float(self.skills[skill].score(completion, str(answer)))
        return {"skill": value, "total": value}


def _sequence(item: PromptItem, completion: list[int]) -> TokenizedExample:
    ids = item.prompt_ids + completion
    labels = [IGNORE_INDEX] * len(item.prompt_ids) + completion
    labels[0] = IGNORE_INDEX
    return TokenizedExample(ids, labels, item.line)


def _completion_text(tokenizer, ids: list[int], stops: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)


class _AdapterReference:
    """The quest-start hero under LoRA: the adapter's weights as the quest started (PEFT's
    ``get_peft_model_state_dict``; zero updates when the adapter is new, i.e. the base), written into the live
    adapter for a reference forward and the live weights written back bit for bit after it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    @contextmanager
    def swapped_in(self, model) -> Iterator[None]:
        from peft import set_peft_model_state_dict

        from core.adapters import adapter_state

        live = adapter_state(model)
        set_peft_model_state_dict(model, self.state)
        try:
            yield
        finally:
            set_peft_model_state_dict(model, live)


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with tensors sharing memory (tied embeddings) cloned, as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
