"""Neural value models: a scalar head or a Q-head, on their own backbone or on the frozen policy's.

Controlled decoding (Mudgal et al., 2023, section 2.2) scores prefixes with a value V(x, y<t).
One class covers the four shapes, since they differ only in where the hidden states come from
and how wide the head is:

| kind   | backbone   | what is trained      | saved as                                                    |
|--------|------------|----------------------|-------------------------------------------------------------|
| scalar | separate   | backbone and head    | `AutoModelForSequenceClassification`, num_labels=1           |
| q      | separate   | backbone and head    | `AutoModelForCausalLM` whose logits are Q-values (untied)    |
| scalar | policy     | the head only        | `value_head.safetensors` + `value_head.json`                 |
| q      | policy     | the head only        | `value_head.safetensors` + `value_head.json`                 |

A scalar head maps the hidden state at the prefix's last token to V(prefix). A Q-head maps the
hidden state of prefix s to one value per vocabulary token, Q(s)[z] = V([s, z]), so a guided
step gets the values of all candidates from one pass; on the policy's own hidden states that
pass is the policy's forward itself (`policy_forward`), so tokenwise CD costs about one forward
per token. The policy-backbone heads carry a bias (the frozen hidden states have no constant
feature to learn an offset from); transformers' sequence-classification head has none, which is
why those heads are saved on their own and need the policy to load.

The separate scalar model keeps transformers' pooling rule for sequence classification: it
reads the rightmost token that is not `pad_token_id`. A policy whose pad token is its EOS (as
SmolLM2's is) would then score a finished text at the token before EOS, a state the value was
never trained on; the saved model therefore gets a pad token that is not an end token.
Inputs here are right padded, so real tokens never attend to padding and positions need no care.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

ValueKind = Literal["scalar", "q"]
HEAD_FILE = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"
# marks a separate-backbone Q model's config.json (its logits are Q-values, not next-token logits)
Q_MARKER = "qsteer_value_kind"


class ValueModel(nn.Module):
    """A prefix value on a transformers backbone: `state_values` for training, `ValueScorer` for decoding."""

    def __init__(self, kind: ValueKind, backbone: nn.Module, head: nn.Linear, wrapper: nn.Module,
                 on_policy: bool) -> None:
        super().__init__()
        if kind not in ("scalar", "q"):
            raise ValueError(f"value kind {kind!r} is not one of: scalar, q")
        self.kind = kind
        self.on_policy = on_policy  # head on the frozen policy's hidden states
        self.wrapper = wrapper  # the transformers model that owns backbone (and, when separate, head)
        self.backbone = backbone
        self.head = head

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def separate(cls, backbone_path: str, kind: ValueKind, pad_token_id: int | None = None,
                 dtype: torch.dtype = torch.float32) -> ValueModel:
        """A fresh head on a copy of a causal LM's backbone (its own weights, all trained).

        The head starts at zero, so every value starts at 0 ("a fresh linear head", section 2.2).
        """
        if kind == "scalar":
            wrapper = AutoModelForSequenceClassification.from_pretrained(backbone_path, num_labels=1, dtype=dtype)
            head = wrapper.score
            if pad_token_id is not None:
                wrapper.config.pad_token_id = pad_token_id
        else:
            wrapper = AutoModelForCausalLM.from_pretrained(backbone_path, dtype=dtype)
            # The Q-head must not be the input embedding: untie it before training writes to it.
            wrapper.config.tie_word_embeddings = False
            head = nn.Linear(wrapper.config.hidden_size, wrapper.config.vocab_size, bias=False, dtype=dtype)
            wrapper.lm_head = head
            setattr(wrapper.config, Q_MARKER, "q")
        with torch.no_grad():
            head.weight.zero_()
        return cls(kind, wrapper.base_model, head, wrapper, on_policy=False)

    @classmethod
    def on_policy_model(cls, policy: nn.Module, kind: ValueKind) -> ValueModel:
        """A fresh head (zero, with bias) on the policy's last hidden state; the policy stays frozen."""
        for param in policy.parameters():
            param.requires_grad_(False)
        config = policy.config
        width = 1 if kind == "scalar" else config.vocab_size
        weight = policy.get_output_embeddings().weight
        head = nn.Linear(config.hidden_size, width, bias=True, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        return cls(kind, policy.base_model, head, policy, on_policy=True)

    def train(self, mode: bool = True) -> ValueModel:
        """Training a head on the policy leaves the policy in eval mode (no dropout in its features)."""
        super().train(mode)
        if self.on_policy:
            self.wrapper.eval()
        return self

    # -- forward --------------------------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's last hidden state [B, T, H] (after its final norm, what an LM head reads)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.on_policy):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def state_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T]: column j is V(input_ids[:, :j+1]), the value of the prefix ending at position j.

        For a Q-head, V([s, z]) = Q(s)[z], read from position j-1 at token input_ids[:, j]: only the
        gathered rows of the head are computed, never the [B, T, V] tensor. Column 0 of a Q-head
        has no preceding state and is 0.
        """
        hidden = self.hidden(input_ids, attention_mask)
        if self.kind == "scalar":
            return self.head(hidden)[..., 0].float()
        nxt = input_ids[:, 1:]
        out = (hidden[:, :-1] * self.head.weight[nxt]).sum(-1)
        if self.head.bias is not None:
            out = out + self.head.bias[nxt]
        return torch.nn.functional.pad(out.float(), (1, 0))

    def q_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, V]: Q(input_ids[:, :j+1])[z] for every position j and every next token z (Q-heads only)."""
        if self.kind != "q":
            raise ValueError("q_values needs a Q-head; this value has a scalar head")
        return self.head(self.hidden(input_ids, attention_mask)).float()

    @torch.no_grad()
    def policy_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """From ONE pass of the policy: its next-token log-probs [B, V] and the head's values [B, V or 1].

        This is the policy-backbone head's reason to exist: a guided step needs the policy's
        distribution anyway, and the values come from the same hidden state.
        """
        if not self.on_policy:
            raise ValueError("policy_forward needs a head on the policy's backbone (value.backbone=policy)")
        last = self.hidden(input_ids, attention_mask)[:, -1]
        logprobs = torch.log_softmax(self.wrapper.get_output_embeddings()(last).float(), dim=-1)
        return logprobs, self.head(last).float()

    # -- files ----------------------------------------------------------------------------------
    def save(self, folder: str | Path, tokenizer=None, policy_path: str | None = None) -> None:
        """Write the checkpoint (see the module table); `tokenizer` goes beside it when given."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.on_policy:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                      str(folder / HEAD_FILE))
            meta = {"kind": self.kind, "backbone": "policy", "hidden_size": self.head.in_features,
                    "width": self.head.out_features, "policy_path": policy_path}
            (folder / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        else:
            self.wrapper.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


def checkpoint_kind(path: str | Path) -> tuple[ValueKind, str]:
    """(shape, backbone) of a value checkpoint, from its small files only (nothing is loaded).

    A FileNotFoundError or ValueError names the folder and what is missing.
    """
    folder = Path(path)
    if (folder / HEAD_CONFIG).exists():
        return json.loads((folder / HEAD_CONFIG).read_text())["kind"], "policy"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds neither config.json nor {HEAD_CONFIG}: not a value checkpoint")
    config = json.loads((folder / "config.json").read_text())
    if config.get(Q_MARKER) == "q":
        return "q", "separate"
    if any(arch.endswith("ForSequenceClassification") for arch in config.get("architectures") or []):
        return "scalar", "separate"
    raise ValueError(f"{folder}/config.json is neither a sequence-classification model nor a qsteer Q-value model")


def load_value_model(path: str | Path, policy: nn.Module | None = None,
                     dtype: torch.dtype = torch.float32) -> ValueModel:
    """Load what `ValueModel.save` wrote. A policy-backbone head needs the policy model it was trained on."""
    folder = Path(path)
    if (folder / HEAD_CONFIG).exists():
        meta = json.loads((folder / HEAD_CONFIG).read_text())
        if policy is None:
            source = meta.get("policy_path")
            if not source:
                raise ValueError(f"{folder / HEAD_CONFIG} is a head on the policy's backbone; pass the policy model")
            policy = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        if policy.config.hidden_size != meta["hidden_size"]:
            raise ValueError(f"{folder / HEAD_CONFIG}: head width {meta['hidden_size']} does not match the "
                             f"policy's hidden_size {policy.config.hidden_size}")
        from safetensors.torch import load_file

        model = ValueModel.on_policy_model(policy, meta["kind"])
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return model
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"value.path={str(path)!r} holds neither config.json nor {HEAD_CONFIG}")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, Q_MARKER, None) == "q":
        wrapper = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        return ValueModel("q", wrapper.base_model, wrapper.lm_head, wrapper, on_policy=False)
    if any(arch.endswith("ForSequenceClassification") for arch in config.architectures or []):
        if config.num_labels != 1:
            raise ValueError(f"{folder}/config.json has num_labels={config.num_labels}; a value has one")
        wrapper = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype)
        return ValueModel("scalar", wrapper.base_model, wrapper.score, wrapper, on_policy=False)
    raise ValueError(f"{folder}/config.json is neither a sequence-classification model (num_labels=1) "
                     f"nor a qsteer Q-value model")


def value_pad_id(tokenizer, end_ids: list[int]) -> int:
    """A pad token that is no end token, so sequence-classification pooling keeps a final EOS.

    Preference: the tokenizer's pad, its unknown token, then any special token but BOS and the
    end tokens (SmolLM2 pads with its EOS; its unknown token <|endoftext|> appears in no chat text).
    """
    avoid = set(end_ids) | {tokenizer.bos_token_id}
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, *tokenizer.all_special_ids):
        if token_id is not None and token_id not in avoid:
            return token_id
    raise ValueError("the tokenizer has no special token besides BOS and its end tokens to pad a value model with")


def value_chat_template(policy_template: str) -> str:
    """The policy's chat template, except that a conversation ending in an assistant turn renders as
    the policy sees it while generating: the prompt with its generation prompt, the reply, the EOS.

    A reward model renders [user, assistant] through its own template; a value trained on policy
    states must then see exactly the state [x, y, EOS] it was trained on (SmolLM2's template would
    add a newline after EOS, a state no training example holds).
    """
    return (
        "{%- macro qsteer_policy_render(messages, add_generation_prompt) -%}" + policy_template
        + "{%- endmacro -%}"
        "{%- if messages[-1]['role'] == 'assistant' -%}"
        "{{ qsteer_policy_render(messages[:-1], true) }}{{ messages[-1]['content'] }}{{ eos_token }}"
        "{%- else -%}{{ qsteer_policy_render(messages, add_generation_prompt) }}{%- endif -%}"
    )


class ValueScorer:
    """A `ValueModel` behind the `ValueFunction` protocol: token-id lists in, floats out, batched."""

    def __init__(self, model: ValueModel, pad_id: int = 0, max_batch_rows: int = 64,
                 device: str | torch.device | None = None) -> None:
        self.model = model.eval()
        self.pad_id = pad_id
        self.max_batch_rows = max_batch_rows
        self.device = torch.device(device) if device is not None else next(model.head.parameters()).device
        self.calls = 0  # forward passes of the value model, the cost a loop reports

    def _right_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        last = mask.sum(-1) - 1
        return ids.to(self.device), mask.to(self.device), last.to(self.device)

    @torch.no_grad()
    def values(self, prefixes: list[list[int]]) -> list[float]:
        if self.model.kind == "q" and any(len(p) < 2 for p in prefixes):
            raise ValueError("a Q-head values a prefix by its last token: every prefix needs at least 2 tokens")
        out: list[float] = []
        for start in range(0, len(prefixes), self.max_batch_rows):
            ids, mask, last = self._right_pad(prefixes[start : start + self.max_batch_rows])
            values = self.model.state_values(ids, mask)
            self.calls += 1
            out.extend(values[torch.arange(len(last), device=values.device), last].cpu().tolist())
        return out

    @torch.no_grad()
    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        if len(prefixes) != len(candidates):
            raise ValueError(f"{len(prefixes)} prefixes but {len(candidates)} candidate lists")
        if self.model.kind == "scalar":
            flat = [p + [z] for p, cands in zip(prefixes, candidates, strict=True) for z in cands]
            scores = iter(self.values(flat)) if flat else iter(())
            return [[next(scores) for _ in cands] for cands in candidates]
        out: list[list[float]] = []
        for start in range(0, len(prefixes), self.max_batch_rows):
            ids, mask, last = self._right_pad(prefixes[start : start + self.max_batch_rows])
            hidden = self.model.hidden(ids, mask)
            self.calls += 1
            q = self.model.head(hidden[torch.arange(len(last), device=hidden.device), last]).float()
            for row, cands in enumerate(candidates[start : start + self.max_batch_rows]):
                out.append(q[row, torch.tensor(cands, dtype=torch.long, device=q.device)].cpu().tolist())
        return out
