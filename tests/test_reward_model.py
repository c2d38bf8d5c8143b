"""`reward=model`: any sequence-classification model, on text, with its own tokenizer."""

from __future__ import annotations

import pytest
import torch

from qsteer.rewards import BUILTIN_REWARDS, build_reward

PROMPTS = ["Say something kind.", "What is two plus two?", "Name a colour.", "Hi"]
COMPLETIONS = ["You are doing great work today!", "Four.", "A deep and quiet blue, like the sea at night.", ""]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def own_tokenizer_model(folder, pad: bool = True):
    """A GPT-2 reward model with a byte-level BPE vocabulary of its own (not the policy's), built offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(PROMPTS + COMPLETIONS * 3, vocab_size=300, special_tokens=["<pad>", "<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>",
                                        pad_token="<pad>" if pad else None)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id if pad else None,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2ForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def direct_scores(folder, texts):
    """The model's own score of each text, one unpadded row at a time: an independent reference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]


def test_registered_and_configured_like_the_other_rewards(compose, tmp_path):
    assert BUILTIN_REWARDS["model"] == "qsteer.rewards.model:ModelReward"
    cfg = compose("reward=model", f"reward.kwargs.model_path={tmp_path}")
    judge = compose("reward=judge")
    assert set(cfg.reward) == set(judge.reward)
    assert cfg.reward.name == "model" and cfg.reward.kwargs.model_path == str(tmp_path)
    assert set(cfg.reward.kwargs) == {"model_path", "batch_size", "chat_template"}


def test_scores_text_with_its_own_tokenizer_batched_as_one_by_one(tmp_path):
    folder = own_tokenizer_model(tmp_path / "rm")
    reward = build_reward("model", model_path=str(folder), batch_size=3)
    assert not reward.use_chat_template  # no template: prompt + completion as plain text
    # the policy's token ids are never read: nonsense ids change nothing
    scores = reward(PROMPTS, COMPLETIONS, completion_ids=[[10**6]] * len(PROMPTS))
    expected = direct_scores(folder, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    assert torch.allclose(torch.tensor(scores), torch.tensor(expected), atol=1e-5)
    assert len(set(round(s, 5) for s in scores)) == len(scores)  # the texts are told apart


def test_a_model_without_pad_token_is_scored_row_by_row(tmp_path):
    folder = own_tokenizer_model(tmp_path / "rm-nopad", pad=False)
    reward = build_reward("model", model_path=str(folder), batch_size=8)
    assert reward.rows_per_call == 1
    expected = direct_scores(folder, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    assert torch.allclose(torch.tensor(reward(PROMPTS, COMPLETIONS)), torch.tensor(expected), atol=1e-5)


def test_chat_template_renders_the_conversation(tiny_path, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    model.config.pad_token_id = 0  # <|endoftext|>: not the EOS, so a final <|im_end|> is pooled
    model.save_pretrained(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = build_reward("model", model_path=str(tmp_path / "rm"), batch_size=2)
    conversation = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                    for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in conversation]
    assert [reward.render(p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)] == rendered
    with torch.no_grad():
        expected = [float(model(**tokenizer(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0])
                    for t in rendered]
    assert torch.allclose(torch.tensor(reward(PROMPTS, COMPLETIONS)), torch.tensor(expected), atol=1e-5)
    # TRL's conversational format: messages in, the same scores out
    chat = reward([[{"role": "user", "content": p}] for p in PROMPTS],
                  [[{"role": "assistant", "content": c}] for c in COMPLETIONS])
    assert torch.allclose(torch.tensor(chat), torch.tensor(expected), atol=1e-5)
    plain = build_reward("model", model_path=str(tmp_path / "rm"), chat_template=False)
    assert plain.render("a", "b") == "ab"


def test_bad_configuration_is_refused_with_the_key(tiny_path, tmp_path):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=3).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="num_labels=3"):
        build_reward("model", model_path=str(tmp_path / "three"))
    with pytest.raises(ValueError, match="reward.kwargs.model_path"):
        build_reward("model", model_path="")
    with pytest.raises(FileNotFoundError, match="reward.kwargs.model_path=.*no such model folder"):
        build_reward("model", model_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="batch_size"):
        build_reward("model", model_path=str(tmp_path / "three"), batch_size=0)


@pytest.mark.ray
def test_reward_model_scores_through_the_score_workflow(ray_session, compose, tmp_path):
    """End to end: `qsteer workflow=score reward=model reward.kwargs.model_path=...` in a reward actor."""
    import json

    from qsteer.run import run_job

    folder = own_tokenizer_model(tmp_path / "rm")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "completion": c}) + "\n"
                            for i, (p, c) in enumerate(zip(PROMPTS[:3], COMPLETIONS[:3], strict=True))))
    run_job(compose("workflow=score", "dataset=jsonl", f"dataset.path={data}", "reward=model",
                    f"reward.kwargs.model_path={folder}", "reward.num_cpus=0"), tmp_path / "run")
    got = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    expected = direct_scores(folder, [p + c for p, c in zip(PROMPTS[:3], COMPLETIONS[:3], strict=True)])
    assert [r["reward"] for r in sorted(got, key=lambda r: r["id"])] == pytest.approx(expected, abs=1e-5)
