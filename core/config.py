"""The realm's ``config.json``, loaded into pydantic models.

Every section rejects unknown keys, and types are strict: ``true`` is not an integer, ``"5"`` not a number
(an integer is a float), ``NaN``/``Infinity`` are refused. :func:`load_config` reports *all* problems at
once, each naming its dotted key (``training.learning_rate: Input should be greater than 0``), by raising
:class:`ConfigError`; a file that cannot be read as a JSON object is one too (``(file): ...``).
``python -m training config --schema`` prints :func:`config_json_schema`; the README's config reference is
generated from the same schema by :func:`config_reference_markdown`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.checkpoint_layout import EXAMPLE_NAME

CONFIG_FILENAME = "config.json"


class _Section(BaseModel):
    # strict: `true` is no integer and "5" no number (a JSON integer is still a float); finite floats only
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class HeroConfig(_Section):
    """The model being trained (the *hero* in the Tavern)."""

    name: str = Field("hero", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Folder name under models/; letters, digits, '_', '.', '-'.")
    base_model: str | None = Field(
        None,
        description="Local Hugging Face model folder (relative to the realm or absolute) or a hub id resolved "
        "from the local cache only. null: the embedded default hero (random-init Qwen3, byte-level tokenizer).",
    )
    default_size: Literal["nano", "micro", "tiny", "small"] = Field(
        "micro", description="Size of the embedded default hero when base_model is null.")
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's; null keeps the tokenizer's own, "
        "or the documented ChatML default when it has none.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder to run.")


class LoraSettings(_Section):
    """LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT: ``W x + (alpha / r) B A x`` with ``A`` (r x in)
    and ``B`` (out x r) trained, ``W`` frozen."""

    r: int = Field(16, ge=1, le=4096, description="Rank of the update B A.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input (0: none; PEFT's "
                           "default).")
    target_modules: list[str] | None = Field(
        None, description="Names (last component) of the linear layers that get an adapter, e.g. "
        '["q_proj", "v_proj"]. null: every nn.Linear inside the decoder layers (attention and MLP '
        "projections), found from the model; never the LM head or the embeddings.")


ReportTo = Literal["tensorboard", "wandb", "mlflow", "trackio"]
"""Trackers ``training.report_to`` accepts (accelerate's names)."""


class TrainingConfig(_Section):
    """Optimiser, batching, precision and checkpoint cadence of the continuous SFT engine."""

    learning_rate: float = Field(3e-4, gt=0, description="Peak AdamW learning rate.")
    lr_scheduler_type: Literal["constant_with_warmup", "constant"] = Field(
        "constant_with_warmup", description="Open-ended training: constant after warmup, never decays to zero.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup, in optimizer steps (global).")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping by global L2 norm.")
    micro_batch_size: int = Field(8, ge=1, description="Rows of max_length tokens per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, ge=8, description="Tokens per row (and per example, see validation.length_policy).")
    packing: bool = Field(True, description="Pack several examples per row; a block-diagonal mask keeps "
                          "packed examples from attending to each other.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 otherwise (CPUs lack fast bf16).")
    seed: int = Field(42, description="Seed of model init and dropout RNG.")
    adapter: Literal["lora", "qlora"] | None = Field(
        None, description="null: full fine-tuning (every weight trained). lora: a LoRA adapter on a frozen "
        "base; checkpoints hold the adapter only. qlora: the same on a base loaded in 4-bit NF4 with "
        "bitsandbytes (Dettmers et al. 2023); needs a CUDA GPU and bitsandbytes, refused otherwise.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter settings (with "
                               "adapter lora or qlora).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass instead of "
        "keeping them: far less activation memory for about a third more compute.")
    save_steps: int = Field(200, ge=1, description="Save a checkpoint every N global steps.")
    save_interval_minutes: float = Field(15.0, gt=0, description="... and at least every N minutes of training.")
    eval_steps: int = Field(100, ge=0, description="Evaluate held-out examples every N global steps (0: only at "
                            "quest end).")
    eval_holdout_every: int = Field(50, ge=0, description="Hold out every Nth valid example of a quest for "
                                    "validation loss (0: no held-out examples).")
    eval_max_examples: int = Field(64, ge=1, description="At most this many held-out examples per quest.")
    max_attempts: int = Field(3, ge=1, description="A quest whose training raises is retried up to this many "
                              "times, then failed with the error.")
    max_nonfinite_steps: int = Field(3, ge=1, description="After this many consecutive optimizer steps with a "
                                     "NaN/Inf loss or gradient norm (each update skipped), roll back to the last "
                                     "checkpoint with a lower learning rate (an error event).")
    nonfinite_lr_factor: float = Field(0.5, gt=0, le=1, description="Each such rollback multiplies the learning "
                                       "rate by this; the reduced rate is kept across restarts (ledger key "
                                       "lr_scale/<hero>) until training.learning_rate is changed.")
    max_nonfinite_rollbacks: int = Field(3, ge=1, description="Rollbacks in a row without a good step in between "
                                         "before the quest raises (then max_attempts applies).")
    min_trainable_token_ratio: float = Field(
        0.01, ge=0, le=1, description="Sanity check: a quest whose completion tokens are fewer than this share "
        "of all tokens is flagged in its report (the loss mask is probably wrong).")
    report_to: list[ReportTo] | None = Field(
        None, description="Experiment trackers (accelerate's) that receive loss, learning_rate, grad_norm, "
        "tokens_per_second and eval_loss at each global step, logged under <realm>/runs/<hero>/ where they "
        "write locally. null: tensorboard when it is installed, else none; []: none. A named tracker that is "
        "not installed is skipped with a warning event.")


class IngestConfig(_Section):
    """How files are taken from inbox/."""

    poll_interval_seconds: float = Field(2.0, gt=0, description="Scan interval of the polling fallback, and "
                                         "the safety-net rescan when inotify events are used.")
    settle_seconds: float = Field(1.0, ge=0, description="A file is taken only once its size and mtime have "
                                  "not changed for this long.")
    use_polling: bool = Field(False, description="Force the polling observer (network filesystems).")
    close_write_fast_path: bool = Field(
        True, description="Take a file 0.15 s after its writer closed it (inotify close-write, or renamed into "
        "place, with no handle left open) instead of after settle_seconds of stability. Turn off for writers "
        "that append by reopening the file (e.g. `echo >> file` in a loop).")
    skip_duplicates: bool = Field(True, description="Skip a file whose content hash was already trained.")


class ValidationConfig(_Section):
    """Record validation before a file is queued."""

    length_policy: Literal["truncate", "drop", "reject"] = Field(
        "truncate", description="Examples longer than training.max_length tokens: truncate them, drop them "
        "(listed in the report), or count them as bad lines.")
    max_bad_line_ratio: float = Field(0.1, ge=0, le=1, description="Above this share of bad lines the whole "
                                      "file goes to queue/failed/.")
    max_line_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="A longer line is a bad line.")
    field_map: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Per glob of file names, rename fields before format detection, e.g. "
        '{"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}}.',
    )


class TavernConfig(_Section):
    """The web dashboard."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback requires access_token.")
    port: int = Field(8888, ge=1, le=65535)
    access_token: str | None = Field(None, description="Required on every request when bound beyond loopback.")
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1, description="Largest quest upload accepted.")


class RetentionConfig(_Section):
    """Which checkpoints the vault keeps (``python -m training vault prune``, after every save, and every
    ``prune_interval_minutes``), and the disk guard before each save. The latest, the best and pinned
    checkpoints are never removed."""

    enabled: bool = Field(True, description="Prune automatically (after every save and on the schedule); "
                          "false: only `vault prune` removes checkpoints.")
    keep_last: int = Field(3, ge=1, description="Keep the newest N checkpoints.")
    keep_every_steps: int = Field(0, ge=0, description="Also keep every checkpoint whose global step is a "
                                  "multiple of N (milestones; 0: none).")
    keep_best: int = Field(1, ge=0, description="Also keep the N best checkpoints by best_metric (the single "
                           "best is always kept).")
    best_metric: Literal["eval_loss", "loss"] = Field(
        "eval_loss", description="Metric of keep_best (lower is better). eval_loss falls back to loss when no "
        "checkpoint has an eval_loss.")
    keep_within_hours: float = Field(0.0, ge=0, description="Also keep every checkpoint saved in the last N "
                                     "hours (0: none).")
    keep_optimizer_last: int = Field(2, ge=1, description="Only the newest N kept checkpoints keep their "
                                     "optimizer state (Adam moments, about 2/3 of a checkpoint); older ones "
                                     "keep weights, scheduler and RNG (resuming from one restarts the Adam "
                                     "moments).")
    prune_interval_minutes: float = Field(30.0, gt=0, description="Period of the scheduled prune job.")
    min_free_gb: float = Field(1.0, ge=0, description="Disk guard: before a save, prune when free space would "
                               "fall below this (GiB); if still short, pause training with an alert.")


class BackupConfig(_Section):
    """Backups (``vault backup STEP``) and named versions (``vault promote``)."""

    folder: str = Field("backups", description="Where `vault backup` copies checkpoints (relative to the realm "
                        "or absolute). Point it at another disk: a backup on the same disk does not survive "
                        "the disk.")


class SupervisorConfig(_Section):
    """The watchdog that ``start-all`` runs over the daemon and the Tavern."""

    hang_minutes: float = Field(15.0, gt=0, description="A daemon whose heartbeat is older than this, or that "
                                "is training without a new global step for this long, is hung: it is "
                                "stopped (warm, then hard) and restarted.")
    max_restarts: int = Field(5, ge=1, description="Give up on a process (FATAL, with an alert) after this "
                              "many restarts within restart_window_minutes.")
    restart_window_minutes: float = Field(10.0, gt=0, description="Window of max_restarts.")
    backoff_initial_seconds: float = Field(1.0, gt=0, description="Delay before the first restart; doubled "
                                           "for each further restart within the window.")
    backoff_max_seconds: float = Field(60.0, gt=0, description="Longest delay between restarts.")
    stop_timeout_seconds: float = Field(120.0, gt=0, description="Warm stop (SIGTERM: the daemon saves a "
                                        "checkpoint) waits this long before SIGKILL.")
    poll_interval_seconds: float = Field(1.0, gt=0, description="How often the watchdog checks its children.")


class SourcesConfig(_Section):
    """Downloads into the inbox: ``python -m training enqueue URL`` and the Tavern's "post a quest by URL"
    (https/http, ``hf://datasets/...``, ``s3://``, ``gs://``)."""

    max_download_bytes: int = Field(4 * 1024**3, ge=1, description="Largest download accepted (bytes); a "
                                    "larger announced size is refused before anything is written, a larger "
                                    "stream is cut and removed.")
    timeout_seconds: float = Field(60.0, gt=0, description="Network timeout of each connect and read.")


WebhookEvent = Literal["quest_completed", "quest_failed", "level_up", "promotion", "checkpoint_saved", "crash",
                       "disk_full_pause"]
"""Events a webhook can subscribe to (see :data:`core.webhooks.EVENT_KINDS` for the ledger kinds behind each)."""


class WebhookConfig(_Section):
    """One receiver of ``webhooks``: events POSTed as JSON, signed with HMAC-SHA256 of the raw body under
    ``secret`` (header ``X-Realm-Signature-256: sha256=<hex>``), retried with exponential backoff."""

    url: str = Field(description="http:// or https:// address the events are POSTed to.")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WebhookEvent.__args__), min_length=1,  # type: ignore[attr-defined]
        description="Events to send: quest_completed, quest_failed, level_up, promotion, checkpoint_saved, "
        "crash, disk_full_pause (default: all).")
    secret: str = Field(min_length=1, description="Shared secret of the HMAC-SHA256 signature.")
    timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one delivery attempt.")
    max_retry_hours: float = Field(24.0, gt=0, description="Retry a failing delivery (the delay doubling from "
                                   "1 s up to backoff_max_seconds) for this long, then record it failed and go "
                                   "on.")
    backoff_max_seconds: float = Field(300.0, ge=1, description="Longest delay between two attempts of a "
                                       "delivery.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// address with a host")
        return value


# --- skills (issue 10) -------------------------------------------------------------------------------
SKILL_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$"


class DatasetSkillConfig(_Section):
    """A skill made of a prompt/completion file: the hero answers its prompts, a verifier from the reward
    library checks the answer against the completion (see core/skills/dataset.py)."""

    path: str = Field(..., min_length=1, description="The file of records, relative to the realm or absolute "
                      "(read in place, never copied): .jsonl, .json, .csv, .tsv (also .gz) or .parquet.")
    field_map: dict[str, str] = Field(default_factory=dict, description="Rename fields so records have "
                                      'prompt and completion strings, e.g. {"question": "prompt", '
                                      '"answer": "completion"}.')
    verifier: Literal["exact_match", "numeric_answer"] = Field(
        "exact_match", description="Reward that decides whether an answer is right against the completion: "
        "exact_match (normalized text), numeric_answer (the final number, GSM8K `#### N`).")
    level_key: str | None = Field(None, description="Field holding each record's level (a non-negative "
                                  "integer); null: every record is level 0.")
    holdout_every: int = Field(10, ge=2, le=1000, description="About one record in N (by a hash of its "
                               "prompt) is held out of training for trials; the others are training items.")


class SkillsConfig(_Section):
    """Skills with levels, earned in promotion trials (see the README's Skills section)."""

    priorities: dict[str, float] = Field(
        default_factory=lambda: {"BIN": 1.0},
        description="Skill name -> weight (>= 0) of the skills the hero practises: built-in BIN and LETTERS, "
        "the datasets below, and custom skills from the realm's skills/ folder.")
    trial_samples: int = Field(50, ge=30, le=10000, description="Fresh items per promotion trial (never fewer "
                               "than 30: fewer cannot support a promotion statistically).")
    trial_every_steps: int = Field(50, ge=0, description="The daemon's skill loop tries a skill after this many "
                                   "optimizer steps of training on it (0: only on demand, `python -m training "
                                   "trial`).")
    promotion_threshold: float = Field(0.8, gt=0, lt=1, description="Promote when the Wilson 95% lower bound "
                                       "of the trial's accuracy is at least this.")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Longest answer generated in a trial (tokens); "
                                "generation also stops a few tokens after the longest reference answer.")
    trial_batch_size: int = Field(64, ge=1, le=4096, description="Prompts generated together (greedy, left "
                                  "padded) in a trial.")
    sample_answers: int = Field(6, ge=0, le=100, description="Answers kept in the ledger per trial (prompt, "
                                "expected, answer, right or wrong).")
    datasets: dict[str, DatasetSkillConfig] = Field(
        default_factory=dict, description="Dataset skills by name, e.g. {\"GSM8K\": {\"path\": "
        "\"../shared/data/gsm8k_train.jsonl\", \"field_map\": {\"question\": \"prompt\", \"answer\": "
        "\"completion\"}, \"verifier\": \"numeric_answer\"}}.")

    @field_validator("priorities")
    @classmethod
    def _priorities(cls, value: dict[str, float]) -> dict[str, float]:
        problems = [_skill_name_problem(name) for name in value if _skill_name_problem(name)]
        problems += [f"weight of {name!r} must be a finite number >= 0, got {weight}"
                     for name, weight in value.items() if not math.isfinite(weight) or weight < 0]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, value: dict[str, DatasetSkillConfig]) -> dict[str, DatasetSkillConfig]:
        problems = [_skill_name_problem(name) for name in value if _skill_name_problem(name)]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("promotion_threshold")
    @classmethod
    def _reachable(cls, value: float, info) -> float:
        from core.skills.stats import wilson_lower_bound

        n = info.data.get("trial_samples")
        if n is not None and value > wilson_lower_bound(n, n):
            raise ValueError(f"{value} can never be reached with trial_samples {n}: even all right gives a "
                             f"Wilson lower bound of {wilson_lower_bound(n, n):.3f}; lower the threshold or "
                             "raise trial_samples")
        return value


class IdleGenerationConfig(_Section):
    """The hero loop: quests the daemon writes itself from skills.priorities when nothing trainable is queued
    (see the README's Idle generation section)."""

    enabled: bool = Field(True, description="Generate skill quests when idle (`daemon` and `start-all`; never "
                          "with `daemon --until-idle`).")
    examples_per_quest: int = Field(2000, ge=1, le=1_000_000, description="Items per generated quest (its "
                                    "end is the next quest boundary, where a user quest takes over).")
    review_share: float = Field(0.25, ge=0, le=1, description="Share of a generated quest's items drawn "
                                "evenly from the levels below the skill's current one (against forgetting); "
                                "the rest is at the current level.")
    max_pending_quests: int = Field(1, ge=1, le=100, description="Generated quests that may wait at once (in "
                                    "the inbox, validating or queued); no more are written until they train.")
    priority: Literal["high", "normal", "low"] = Field("low", description="Inbox folder of generated quests; "
                                                       "user quests train first whatever their priority.")


class SparringConfig(_Section):
    """The Mirror: sparring rounds whose wrong answers become correction quests (see the README's Mirror
    section)."""

    after_failed_trial: bool = Field(False, description="The daemon's trial loop spars right after a promotion "
                                     "trial that did not promote (same weights, fresh items); off: only on "
                                     "demand, `python -m training spar SKILL`.")
    samples: int = Field(64, ge=1, le=100_000, description="Items answered per sparring round (each wrong answer "
                         "becomes one correction example).")
    feedback_turn: bool = Field(False, description="Correction examples show the wrong answer: the prompt, the "
                                "hero's answer and a user turn saying it was wrong, then the right answer as the "
                                "completion (loss on the completion only); off: the prompt and the right answer.")
    priority: Literal["high", "normal", "low"] = Field("high", description="Inbox folder of correction quests.")


class FeedbackConfig(_Section):
    """The feedback loop: 👍/👎 ratings and regenerate-and-pick pairs (the Oracle page, ``POST /v1/feedback``)
    become Judge quests the daemon writes itself (see the README's Feedback loop section)."""

    enabled: bool = Field(True, description="The daemon turns new feedback into Judge quests; off: feedback is "
                          "only stored (and exported from the Oracle page).")
    min_pairs: int = Field(32, ge=1, le=1_000_000, description="New (unused) pairs that make a DPO quest of "
                           "exactly those pairs (less the ones kept back, see holdout_every).")
    min_ratings: int = Field(64, ge=1, le=1_000_000, description="New (unused) ratings that make a KTO quest of "
                             "exactly those ratings.")
    holdout_every: int = Field(5, ge=0, le=1000, description="Every holdout_every-th pair taken (in the order "
                               "given) is kept back, never trained: the held-out pairs each Judge quest is "
                               "scored on before and after; 0: none kept back (no before/after score).")
    max_held_out_pairs: int = Field(256, ge=1, le=100_000, description="A Judge quest is scored on at most this "
                                    "many held-out pairs (the newest).")
    priority: Literal["high", "normal", "low"] = Field("high", description="Inbox folder of feedback quests.")

    @field_validator("holdout_every")
    @classmethod
    def _holdout_not_one(cls, value: int) -> int:
        if value == 1:
            raise ValueError("1 would keep back every pair (none trained): use 0 (none kept back) or at least 2")
        return value


class StageUntil(_Section):
    """When a campaign stage ends: exactly one condition (see the README's Campaigns section)."""

    steps: int | None = Field(None, ge=1, le=10**9, description="Optimizer steps trained since the stage began.")
    skill_level: dict[str, int] | None = Field(None, description="Every named skill at least this level, e.g. "
                                               "{\"BIN\": 3}.")
    accuracy: float | None = Field(None, gt=0, le=1, description="The newest trial (after the stage began) of "
                                   "each of the stage's skills has at least this accuracy.")
    eval_loss_patience: int | None = Field(None, ge=1, le=1000, description="Held-out loss not improving over "
                                           "this many evaluations (since the stage began) in a row.")

    @model_validator(mode="after")
    def _exactly_one(self) -> StageUntil:
        given = [k for k in ("steps", "skill_level", "accuracy", "eval_loss_patience") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of steps, skill_level, accuracy, eval_loss_patience"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.skill_level is not None:
            problems = [_skill_name_problem(n) for n in self.skill_level if _skill_name_problem(n)]
            problems += [f"level of {n!r} must be 1..100, got {v}" for n, v in self.skill_level.items()
                         if not 1 <= v <= 100]
            if problems or not self.skill_level:
                raise ValueError("; ".join(problems) or "skill_level must name a skill")
        return self


class CampaignStage(_Section):
    """One stage of a campaign: what it trains (skills and/or quest name globs), with which school, until when."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$", description="Shown in status and the Tavern.")
    school: str = Field("sft", description="The stage's school, one of SCHOOL_NAMES (sft, dpo, ipo, orpo, kto, "
                        "fortune_teller, grpo, distill); the quests the stage generates (idle generation of its skills) "
                        "train with it: sft/fortune_teller on SFT records, grpo on prompt records scored by the "
                        "skill. Its other quests keep the school of their `schools` rule.")
    skills: dict[str, float] = Field(default_factory=dict, description="Skill -> weight practised in this stage "
                                     "(replaces skills.priorities for idle generation while it lasts).")
    quests: list[str] = Field(default_factory=list, description="Glob(s) of quest file names trained first in "
                              "this stage, e.g. [\"warmup*\"].")
    until: StageUntil = Field(description="The stop condition, exactly one of: {\"steps\": N} (optimizer steps "
                              "since the stage began), {\"skill_level\": {\"BIN\": 3}}, {\"accuracy\": 0.9} (the "
                              "newest trial of each stage skill, after the stage began), {\"eval_loss_patience\": K} "
                              "(held-out loss not improving over K evaluations).")

    @model_validator(mode="after")
    def _check(self) -> CampaignStage:
        problems = [] if self.school in SCHOOL_NAMES else [
            f"school {self.school!r} is not one of {', '.join(SCHOOL_NAMES)}"]
        problems += [_skill_name_problem(n) for n in self.skills if _skill_name_problem(n)]
        if self.skills and self.school not in STAGE_SKILL_SCHOOLS and self.school in SCHOOL_NAMES:
            problems.append(f"school {self.school} cannot practise skills (their items have no rejected or rated "
                            f"answers): a stage with skills uses {', '.join(STAGE_SKILL_SCHOOLS)}")
        problems += [f"weight of {n!r} must be > 0" for n, w in self.skills.items() if not w > 0]
        if not self.skills and not self.quests:
            problems.append("a stage names skills and/or quests")
        if self.until.accuracy is not None and not self.skills:
            problems.append("until.accuracy needs the stage's skills")
        if problems:
            raise ValueError("; ".join(problems))
        return self


CAMPAIGN_PRESETS: dict[str, list[dict]] = {
    "warmup-bin": [
        {"name": "warm-up", "school": "sft", "quests": ["warmup*"], "until": {"steps": 200}},
        {"name": "BIN levels", "school": "sft", "skills": {"BIN": 1.0}, "until": {"skill_level": {"BIN": 3}}},
    ],
}
"""Shipped campaigns (``campaign.preset``): warm-up SFT on your ``warmup*`` quests, then BIN to level 3."""


class CampaignConfig(_Section):
    """A curriculum: stages the daemon goes through in order (see the README's Campaigns section)."""

    enabled: bool = Field(False, description="Run the campaign (the daemon advances through its stages).")
    preset: Literal["warmup-bin"] | None = Field(None, description="A shipped campaign instead of stages: "
                                                 "warmup-bin = SFT on warmup* quests for 200 steps, then BIN to "
                                                 "level 3.")
    stages: list[CampaignStage] = Field(default_factory=list, description="The stages, in order.")

    @model_validator(mode="after")
    def _stages_or_preset(self) -> CampaignConfig:
        if self.preset is not None and self.stages:
            raise ValueError("give stages or a preset, not both")
        if self.enabled and self.preset is None and not self.stages:
            raise ValueError("an enabled campaign needs stages or a preset")
        names = [st.name for st in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stage names must be unique")
        return self

    def resolved_stages(self) -> list[CampaignStage]:
        """The stages to run: ``stages``, or the preset's."""
        if self.preset is not None:
            return [CampaignStage.model_validate(st) for st in CAMPAIGN_PRESETS[self.preset]]
        return list(self.stages)


def _skill_name_problem(name: str) -> str | None:
    if re.fullmatch(SKILL_NAME_PATTERN, name):
        return None
    return f"skill name {name!r}: letters, digits, '_', '.', '-', a letter first, at most 32 characters"


SCHOOL_NAMES = ("sft", "dpo", "ipo", "orpo", "kto", "fortune_teller", "grpo", "distill")
STAGE_SKILL_SCHOOLS = ("sft", "fortune_teller", "grpo")
"""Schools that can train the quests a campaign stage generates from its skills."""
"""Schools a quest rule may name (:mod:`core.schools`)."""


#: Which schools read each per-school setting of a :class:`QuestRule` (``loss_type``: by its value, in
#: :meth:`QuestRule._settings_of_the_school`); the settings of every school (``epochs``, ``shuffle``) are absent.
SCHOOL_SETTINGS: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "ipo", "orpo", "kto", "grpo", "distill"),
    "loss_type": ("dpo", "distill"),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "weighting": ("fortune_teller",),
    "rewards": ("grpo",),
    "num_generations": ("grpo",),
    "max_completion_length": ("grpo",),
    "temperature": ("grpo", "distill"),
    "epsilon": ("grpo",),
    "scale_rewards": ("grpo",),
    "teacher": ("distill",),
    "alpha": ("distill",),
}


class QuestRule(_Section):
    """Rules for the quests whose file name matches a glob (``schools: {"<glob>": {...}}``; the first
    matching glob wins, in the order written; the name is matched as ``validation.field_map`` matches it).
    A quest that matches none trains once, in file order, with the school of its format.

    ``school`` null: chosen by the file's format (SFT formats -> ``sft``, paired preferences -> ``dpo``,
    unpaired ratings -> ``kto``), see :mod:`core.schools`."""

    school: Literal["sft", "dpo", "ipo", "orpo", "kto", "fortune_teller", "grpo", "distill"] | None = Field(
        None, description="sft (Scribe), dpo / ipo / orpo / kto (Judge), fortune_teller (surprise-weighted "
        "SFT), grpo (Champion: its records are prompts), distill (Whisper: distillation from `teacher`); null: by "
        "the file's format.")
    beta: float = Field(0.1, gt=0, le=100, description="DPO/IPO/KTO: strength of the reference constraint "
                        "(TRL's beta; IPO's tau). ORPO: weight lambda of the odds-ratio term. distill with "
                        "loss_type jsd: the generalized JSD's mixture weight in (0, 1] (TRL GKD's beta; 1 is "
                        "reverse KL), 0.5 when not set.")
    loss_type: Literal["sigmoid", "ipo", "kl", "jsd"] | None = Field(
        None, description="With school dpo: sigmoid (DPO, Rafailov et al. 2023, the default) or ipo (Azar et "
        "al. 2023; the same as school ipo). With school distill: kl (forward KL at `temperature`, Hinton et al. "
        "2015, the default) or jsd (generalized Jensen-Shannon divergence with `beta`, GKD, Agarwal et al. 2024).")
    desirable_weight: float = Field(1.0, gt=0, le=100, description="KTO: weight of the good (label true) "
                                    "completions' losses.")
    undesirable_weight: float = Field(1.0, gt=0, le=100, description="KTO: weight of the bad (label false) "
                                      "completions' losses.")
    weighting: Literal["entropy", "confidence", "margin"] = Field(
        "entropy", description="fortune_teller: which surprise weighs each token's loss (mean weight 1).")
    rewards: dict[str, float | dict] | None = Field(
        None, description="grpo: the reward, a weighted sum (core.rewards.build_reward), e.g. {\"numeric_answer\": "
        "1.0, \"regex_format\": {\"weight\": 0.2, \"pattern\": \".*#### -?[0-9]+\"}}; names: exact_match, "
        "numeric_answer, regex_format, length_penalty, json_valid, skill:NAME, file:PATH.py (sandboxed). null: "
        "each record's skill scorer (its `skill` and `answer` fields, as skill quests have).")
    num_generations: int = Field(8, ge=2, le=256, description="grpo: completions sampled per prompt (the "
                                 "group G; TRL's num_generations).")
    max_completion_length: int = Field(128, ge=1, le=32_768, description="grpo: most tokens generated per "
                                       "completion (TRL's max_completion_length).")
    temperature: float = Field(1.0, gt=0, le=100, description="grpo: sampling temperature (also divides the "
                               "logits of the loss, as TRL does). distill: softmax temperature T of teacher and "
                               "student in the distillation term (scaled by T^2, Hinton et al. 2015).")
    epsilon: float = Field(0.2, gt=0, le=10, description="grpo: clip range of the probability ratio (TRL's "
                           "epsilon).")
    scale_rewards: Literal["group", "none"] = Field(
        "group", description="grpo: advantages (r - group mean) divided by the group's std (group) or not "
        "(none, Dr. GRPO). The KL term to the quest-start hero is on when `beta` is set for a grpo rule "
        "(TRL's default beta 0.0: off).")
    teacher: str | None = Field(
        None, max_length=1000, description="distill: the teacher model, with the hero's tokenizer: a model folder "
        f"(absolute or relative to the realm), a checkpoint of the hero ({EXAMPLE_NAME}), a named version "
        "(models/<hero>/versions/<name>) or a hub id in the local Hugging Face cache (never downloaded).")
    alpha: float = Field(0.5, ge=0, le=1, description="distill: loss = alpha * distillation + (1 - alpha) * "
                         "cross-entropy on the data (1: distillation only, 0: plain SFT).")
    epochs: int = Field(1, ge=1, le=10_000, description="Passes over the quest's train examples (held-out "
                        "records are never trained); progress and ETA count all of them.")
    shuffle: bool = Field(False, description="Train each epoch in a seeded random order: the permutation of "
                          "epoch e is seeded by the quest's content SHA-256 and e, so it survives restarts (the "
                          "cursor stays exact). A shuffled quest holds its normalized records in memory.")

    @field_validator("rewards")
    @classmethod
    def _reward_names(cls, value):
        from core.rewards.combine import BUILTIN_REWARDS

        bad = [k for k in value or {} if k not in BUILTIN_REWARDS and not k.startswith(("skill:", "file:"))]
        if bad:
            raise ValueError(f"unknown reward(s) {bad}: built in are {', '.join(BUILTIN_REWARDS)}; or skill:NAME, "
                             "file:PATH.py")
        return value

    @field_validator("teacher")
    @classmethod
    def _teacher_not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("teacher is empty: name a model folder, checkpoint, version or cached hub id")
        return value

    @field_validator(*SCHOOL_SETTINGS)
    @classmethod
    def _setting_of_the_school(cls, value, info):
        """A setting written for a school that does not read it is an error naming its key
        (:data:`SCHOOL_SETTINGS`). With ``school`` null the school comes from the file's format, so any
        setting may apply, except those of ``distill`` alone (never chosen by format)."""
        key, school = info.field_name, info.data.get("school")
        schools, name = SCHOOL_SETTINGS[key], key
        if key == "loss_type":
            if value is None:
                return value
            schools, name = ("distill",) if value in ("kl", "jsd") else ("dpo",), f"loss_type {value}"
        if (school is not None or schools == ("distill",)) and school not in schools:
            raise ValueError(f"{name} is a setting of school {' / '.join(schools)}, " + (
                f"not {school}" if school else "and this rule names no school (distill is never chosen by format)"))
        return value

    @model_validator(mode="after")
    def _jsd_beta(self) -> QuestRule:
        if self.school == "distill" and self.loss_type == "jsd" and "beta" in self.model_fields_set \
                and not 0 < self.beta <= 1:
            raise ValueError(f"beta {self.beta} with loss_type jsd must be in (0, 1] (0 would be loss_type kl)")
        return self


def quest_rule_for(file_name: str, schools: dict[str, QuestRule]) -> QuestRule:
    """The :class:`QuestRule` of the first glob in ``schools`` matching ``file_name`` (its base name, also
    without a ``.gz`` suffix or a ``high_``/``low_`` priority prefix, ``fnmatch`` rules), else the defaults."""
    for pattern, rule in schools.items():
        if file_name_matches(file_name, pattern):
            return rule
    return QuestRule()


def file_name_matches(file_name: str, pattern: str) -> bool:
    """Whether a per-glob config key (``schools``, ``validation.field_map``) applies to ``file_name``:
    ``fnmatch`` on its base name as given, without a ``.gz`` suffix and without a ``high_``/``low_``
    priority prefix (so ``"gsm8k*.jsonl"`` matches ``high_gsm8k_train.jsonl.gz``)."""
    import fnmatch

    name = Path(file_name).name
    names = {name}
    for prefix in ("high_", "low_"):
        if name.lower().startswith(prefix):
            names.add(name[len(prefix):])
    names |= {n[:-3] for n in names if n.lower().endswith(".gz")}
    return any(fnmatch.fnmatch(n, pattern) for n in names)


class RealmConfig(_Section):
    """The whole ``config.json`` of a realm."""

    hero: HeroConfig = Field(default_factory=HeroConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tavern: TavernConfig = Field(default_factory=TavernConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    backup: BackupConfig = Field(default_factory=BackupConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    webhooks: list[WebhookConfig] = Field(default_factory=list, description="Receivers of training events.")
    skills: SkillsConfig = Field(default_factory=SkillsConfig)
    idle_generation: IdleGenerationConfig = Field(default_factory=IdleGenerationConfig)
    schools: dict[str, QuestRule] = Field(
        default_factory=dict, description="Per glob of quest file names (first match wins, matched as "
        "validation.field_map matches them), how its quests train: school and its settings, epochs, order, e.g. "
        '{"prefs*.jsonl": {"school": "dpo", "beta": 0.1}, "gsm8k*": {"epochs": 3, "shuffle": true}}.')
    sparring: SparringConfig = Field(default_factory=SparringConfig)
    campaign: CampaignConfig = Field(default_factory=CampaignConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)


class ConfigError(ValueError):
    """Raised when ``config.json`` cannot be read or holds invalid values.

    ``errors`` lists every problem as ``"dotted.key: message"``.
    """

    def __init__(self, path: Path | str, errors: list[str]):
        self.path = str(path)
        self.errors = errors
        super().__init__(f"{path}: {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))


def _format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{key}: {msg}")
    return out


def parse_config(data: dict, source: str = "<dict>") -> RealmConfig:
    """Validate a config dict. Raises :class:`ConfigError` listing every bad key at once."""
    try:
        return RealmConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from None


def read_config_data(path: Path | str) -> dict | None:
    """The JSON object in ``config.json`` (a leading UTF-8 byte order mark is allowed), or None when
    there is no such file. ``NaN``/``Infinity`` are read as floats, for validation to refuse by key.

    Raises :class:`ConfigError` when the file cannot be read (a directory, no permission), is not UTF-8,
    is not JSON (naming line and column), is nested too deeply to parse, or is not a JSON object.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(path, [f"(file): cannot be read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"(file): not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"]) \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(path, [f"(file): invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"]) from None
    except RecursionError:
        raise ConfigError(path, ["(file): JSON nested too deeply to read"]) from None
    if not isinstance(data, dict):
        raise ConfigError(path, ["(root): must be a JSON object"])
    return data


def load_config(path: Path | str) -> RealmConfig:
    """Load ``config.json``; a missing file means all defaults.

    Raises :class:`ConfigError` (see :func:`read_config_data`), listing every invalid value by dotted key.
    """
    data = read_config_data(path)
    return RealmConfig() if data is None else parse_config(data, str(path))


def config_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of ``config.json``."""
    return RealmConfig.model_json_schema()


def type_name(annotation) -> str:
    """A field's type as a reader writes it: ``str``, ``int | None``, ``Literal['a', 'b']``,
    ``dict[str, list[str]]``, a section's class name (never ``<class 'str'>``)."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def config_sections() -> list[tuple[str, type[BaseModel]]]:
    """``(name, model)`` of every section of ``config.json``, in order; a list of sections (``webhooks``)
    is named ``webhooks[]`` with the model of one item, a dict of them (``schools``) ``schools.<glob>``."""
    out: list[tuple[str, type[BaseModel]]] = []
    for name, field in RealmConfig.model_fields.items():
        model = field.default_factory().__class__  # type: ignore[misc]
        if model is list:
            out.append((f"{name}[]", field.annotation.__args__[0]))  # type: ignore[union-attr]
        elif model is dict:
            out.append((f"{name}.<glob>", field.annotation.__args__[1]))  # type: ignore[union-attr]
        else:
            out.append((name, model))
    return out


def config_reference_markdown() -> str:
    """A Markdown table per section: key, type, default, description (for the README)."""
    lines: list[str] = []
    for section_name, model in config_sections():
        lines += [f"#### `{section_name}`", "", (model.__doc__ or "").strip(), "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        lines += _reference_rows(model)
        lines.append("")
        lines += _nested_reference(section_name, model)
    return "\n".join(lines)


def _reference_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One table row per key; a nested section (e.g. ``training.lora``) gets a row per dotted sub-key."""
    rows = []
    for key, f in model.model_fields.items():
        default = f.default_factory() if f.default_factory else f.default
        if isinstance(default, BaseModel):
            rows += _reference_rows(type(default), f"{prefix}{key}.")
            continue
        ann = type_name(f.annotation).replace("|", "\\|")
        desc = (f.description or "").replace("|", "\\|")
        shown = "required" if f.is_required() else f"`{json.dumps(default)}`"
        rows.append(f"| `{prefix}{key}` | `{ann}` | {shown} | {desc} |")
    return rows


def _nested_reference(section_name: str, model: type[BaseModel]) -> list[str]:
    """A table for each ``dict[str, <section model>]`` field (e.g. ``skills.datasets.<name>``)."""
    from typing import get_args

    lines: list[str] = []
    for key, f in model.model_fields.items():
        nested = [a for a in get_args(f.annotation) if isinstance(a, type) and issubclass(a, _Section)]
        for sub in nested:
            lines += [f"##### `{section_name}.{key}.<name>`", "", (sub.__doc__ or "").strip(), "",
                      "| key | type | default | description |", "|---|---|---|---|"]
            lines += _reference_rows(sub)
            lines.append("")
    return lines
