"""`reward=model`: a sequence-classification reward model in transformers format, on text.

Any `AutoModelForSequenceClassification` with one label scores (prompt, completion) pairs: a
third-party reward model, or a value trained by `qsteer.training.value` (a value's score of a
finished text is its prediction of the reward there). The model brings its own tokenizer and
chat template: it receives text and tokenizes it itself, never the policy's token ids, so a
reward model with another vocabulary works unchanged.

Rendering: with `chat_template` (and a template in the tokenizer) the pair is the conversation
[user: prompt, assistant: completion] through the reward model's template, as reward models are
trained and as TRL renders them; otherwise it is the plain text prompt + completion with the
tokenizer's special tokens. Texts longer than the model's context keep their end (left
truncation): the completion is what is being scored.

Pooling stays the model's own (sequence-classification decoders read the rightmost token that
is not their pad token). A model with no pad token cannot pool a padded batch, so its rows are
scored one at a time rather than padded with a guessed token.
"""

from __future__ import annotations

from typing import Any

import torch

from qsteer.models import resolve_model_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelReward:
    def __init__(
        self,
        model_path: str,
        batch_size: int = 16,
        chat_template: bool = True,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if not model_path or model_path in ("default",):
            raise ValueError("reward.kwargs.model_path must name a sequence-classification model "
                             "(a local folder or a hub id)")
        if batch_size < 1:
            raise ValueError(f"reward.kwargs.batch_size={batch_size} must be at least 1")
        if dtype not in _DTYPES:
            raise ValueError(f"reward.kwargs.dtype={dtype!r} is not one of: {', '.join(_DTYPES)}")
        try:
            self.path = resolve_model_path(model_path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"reward.kwargs.model_path={model_path!r}: no such model folder "
                                    f"(a folder with config.json, or a hub id)") from err
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        if config.num_labels != 1:
            raise ValueError(f"reward.kwargs.model_path={model_path!r} has num_labels={config.num_labels}; "
                             "reward=model needs one score per text (num_labels=1)")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code).to(self.device).eval()
        self.batch_size = batch_size
        self.use_chat_template = chat_template and bool(self.tokenizer.chat_template)
        limit = max_length or getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_length = int(min(limit, 1 << 20))
        pad = self.model.config.pad_token_id
        if pad is not None:  # pad with the token the model's pooling skips
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(pad)
        self.tokenizer.padding_side = "right"
        # without a pad token the model cannot find the last token of a padded row
        self.rows_per_call = batch_size if pad is not None and self.tokenizer.pad_token_id is not None else 1

    def render(self, prompt: str | list[dict], completion: str | list[dict]) -> str:
        """The text the reward model reads for one (prompt, completion) pair."""
        if not self.use_chat_template:
            prompt_text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            completion_text = completion if isinstance(completion, str) else "\n".join(m["content"] for m in completion)
            return prompt_text + completion_text
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if isinstance(completion, list):
            messages += completion
        else:
            messages.append({"role": "assistant", "content": completion})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.rows_per_call):
            encoded = self.tokenizer(
                texts[start : start + self.rows_per_call], padding=self.rows_per_call > 1, truncation=True,
                max_length=self.max_length, return_tensors="pt",
                # a rendered chat template already holds its special tokens
                add_special_tokens=not self.use_chat_template,
            ).to(self.device)
            logits = self.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores
