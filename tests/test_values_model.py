"""Neural values on the tiny model: the four shapes, their protocol, their files, their fitting."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from qsteer.training.value import fit_value, heldout_metrics, make_batch, save_value_model
from qsteer.values import ValueFunction, ValueModel, ValueScorer, WeightedValues, load_value_model
from qsteer.values.model import value_chat_template, value_pad_id

EOS = 2  # SmolLM2's <|im_end|>, the tiny model's end token


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: on a shared 2-core machine two intra-op threads make a forward 50x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def policy(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path).eval()


def draw_samples(policy, tokenizer, chat: bool, prompts: int = 24):
    """Base-policy samples of 8 tokens, 8 per prompt, and a reward with a part the prefix predicts
    (prompt i's item number mod 3) and a part only the finished text shows (a fixed linear function
    of the last non-EOS token's embedding, std about 0.5)."""
    torch.manual_seed(0)
    direction = torch.randn(policy.config.hidden_size)
    embeddings = policy.get_input_embeddings().weight.detach()
    prompt_ids, completions, rewards, texts = [], [], [], []
    for i in range(prompts):
        text = f"Tell me about item {i}."
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_dict=True, return_tensors="pt")["input_ids"]
        else:
            ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = policy.generate(ids, do_sample=True, top_k=0, max_new_tokens=8, num_return_sequences=8,
                                  pad_token_id=0)
        for row in out[:, ids.shape[1]:].tolist():
            completion = row[: row.index(EOS) + 1] if EOS in row else row
            words = [t for t in completion if t != EOS] or [EOS]
            prompt_ids.append(ids[0].tolist())
            completions.append(completion)
            rewards.append(i % 3 + 0.1 * float(embeddings[words[-1]] @ direction))
            texts.append(text)
    return prompt_ids, completions, rewards, texts


@pytest.fixture(scope="module")
def samples(policy, tokenizer):
    """Chat-rendered prompts, as the policy sees them in a run."""
    return draw_samples(policy, tokenizer, chat=True)


@pytest.fixture(scope="module")
def plain_samples(policy, tokenizer):
    """Short plain-text prompts: the tiny random model's 40-token chat preamble drowns the last token's
    embedding in its final hidden state, which a separate backbone cannot unlearn in a few steps."""
    return draw_samples(policy, tokenizer, chat=False)


def split(samples):
    """Every 4th sample held out; training batches of 64; the training mean as the constant predictor."""
    prompts, completions, rewards, _ = samples
    train_rows = [i for i in range(len(prompts)) if i % 4 != 3]
    held_rows = [i for i in range(len(prompts)) if i % 4 == 3]

    def batch(rows):
        return make_batch([prompts[i] for i in rows], [completions[i] for i in rows], [rewards[i] for i in rows],
                          end_ids=[EOS])

    train = [batch(train_rows[i : i + 64]) for i in range(0, len(train_rows), 64)]
    mean = sum(rewards[i] for i in train_rows) / len(train_rows)
    return train, batch(held_rows), mean, len(train_rows)


def all_shapes(tiny_path, policy):
    return {
        ("scalar", "separate"): ValueModel.separate(tiny_path, "scalar", pad_token_id=0),
        ("q", "separate"): ValueModel.separate(tiny_path, "q"),
        ("scalar", "policy"): ValueModel.on_policy_model(policy, "scalar"),
        ("q", "policy"): ValueModel.on_policy_model(policy, "q"),
    }


def randomize_head(model: ValueModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.head.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def test_every_shape_meets_the_protocol_consistently(tiny_path, policy):
    """next_values(s, z) == values(s + [z]) for every shape; batching and padding change nothing."""
    prefixes = [[1, 504, 30, 77], [1, 9, 22], [1, 600, 12, 18, 99, 3]]
    candidates = [[5, 17, 2], [40, 41, 42], [2, 7, 8]]
    for (kind, backbone), model in all_shapes(tiny_path, policy).items():
        randomize_head(model, seed=1)
        scorer = ValueScorer(model, pad_id=0)
        assert isinstance(scorer, ValueFunction)
        nxt = scorer.next_values(prefixes, candidates)
        extended = [p + [z] for p, cands in zip(prefixes, candidates, strict=True) for z in cands]
        flat = scorer.values(extended)
        assert torch.allclose(torch.tensor(nxt).flatten(), torch.tensor(flat), atol=1e-5), (kind, backbone)
        alone = [scorer.values([p])[0] for p in extended]
        assert torch.allclose(torch.tensor(alone), torch.tensor(flat), atol=1e-5), (kind, backbone)
        assert len(set(round(v, 4) for v in flat)) > 3  # the values do depend on the prefix
        if kind == "q":
            calls = scorer.calls
            scorer.next_values(prefixes, candidates)
            assert scorer.calls == calls + 1  # one forward for all candidates of all rows


def test_weighted_values_sum_their_parts(tiny_path, policy):
    shapes = all_shapes(tiny_path, policy)
    a, b = ValueScorer(shapes[("q", "policy")]), ValueScorer(shapes[("scalar", "policy")])
    randomize_head(shapes[("q", "policy")], 2)
    randomize_head(shapes[("scalar", "policy")], 3)
    prefixes, candidates = [[1, 30, 40], [1, 7]], [[3, 4], [5, 6]]
    combined = WeightedValues([a, b], [2.0, -0.5]).next_values(prefixes, candidates)
    expected = 2.0 * torch.tensor(a.next_values(prefixes, candidates)) - 0.5 * torch.tensor(
        b.next_values(prefixes, candidates))
    assert torch.allclose(torch.tensor(combined), expected, atol=1e-6)
    with pytest.raises(ValueError, match="one weight per value"):
        WeightedValues([a], [1.0, 2.0])


def test_policy_backbone_head_costs_one_policy_forward(policy):
    """The policy-backbone Q-head gives the policy's next-token law and every next token's value from
    one pass of the policy's backbone, and trains nothing but the head."""
    model = ValueModel.on_policy_model(policy, "q")
    randomize_head(model, 4)
    calls = []
    hook = policy.base_model.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.tensor([[1, 504, 30, 77], [1, 9, 22, 2]])
    try:
        logprobs, q = model.policy_forward(ids)
    finally:
        hook.remove()
    assert len(calls) == 1
    with torch.no_grad():
        reference = torch.log_softmax(policy(ids).logits[:, -1].float(), -1)
    assert torch.allclose(logprobs, reference, atol=1e-5)
    assert q.shape == reference.shape
    assert torch.allclose(q[:, 17], torch.tensor(ValueScorer(model).next_values(ids.tolist(), [[17], [17]]))[:, 0],
                          atol=1e-5)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


@pytest.mark.parametrize(("kind", "backbone"), [("scalar", "separate"), ("q", "policy")])
def test_fudge_fits_base_samples(tiny_path, policy, plain_samples, kind, backbone):
    """CD-FUDGE on base-policy samples fits them: the loss falls and the values of the samples' prefixes
    follow their rewards. (Prediction of held-out rewards is checked exactly on the tabular model, and
    belongs on a trained model; a random-weight tiny model has nothing to generalise from.)"""
    train, _, _, _ = split(plain_samples)
    model = all_shapes(tiny_path, policy)[(kind, backbone)]
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    losses = fit_value(model, train, "fudge", epochs=10, lr=3e-3 if backbone == "separate" else 1e-2)
    mean = float(torch.cat([b.rewards for b in train]).mean())
    fitted = [heldout_metrics(model, batch, mean) for batch in train]
    assert losses[-1] < losses[0] / 4
    assert min(m["final_correlation"] for m in fitted) > 0.5, fitted
    assert min(m["first_correlation"] for m in fitted) > 0.3, fitted  # the prompt's part, read from a prefix
    if backbone == "policy":  # the policy itself is untouched, and stayed in eval mode
        assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
        model.train()
        assert not policy.training and model.head.training


def test_saved_scalar_value_is_a_sequence_classifier_and_a_reward_model(tiny_path, policy, tokenizer, samples,
                                                                       tmp_path):
    """The saved scalar value loads as AutoModelForSequenceClassification (num_labels=1), pools at the
    EOS it was trained on, round-trips through load_value_model, and scores text through reward=model
    exactly as it scores the policy's tokens."""
    from qsteer.rewards import build_reward

    train, held, mean, cut = split(samples)
    model = ValueModel.separate(tiny_path, "scalar", pad_token_id=0)
    losses = fit_value(model, train, "fudge", epochs=2, lr=3e-3)
    metrics = heldout_metrics(model, held, mean)
    folder = save_value_model(tmp_path / "value", model, method="fudge", losses=losses, train_sequences=cut,
                              train_prefixes=int(sum(b.completion_mask().sum() for b in train)),
                              heldout=metrics, tokenizer=tokenizer, end_ids=[EOS], policy_path=tiny_path)
    card = json.loads((folder / "value_card.json").read_text())
    assert card["train_sequences"] == cut and card["heldout"]["final_correlation"] == metrics["final_correlation"]
    assert (folder / "loss_curve.png").stat().st_size > 1000 and "held-out" in (folder / "README.md").read_text()

    classifier = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert classifier.config.num_labels == 1 and classifier.config.pad_token_id not in (None, EOS)
    prompts, completions, _, texts = samples
    ours = ValueScorer(model, pad_id=0)
    reloaded = ValueScorer(load_value_model(folder), pad_id=0)
    states = [p + [t for t in c if t != EOS] + [EOS] for p, c in zip(prompts[:16], completions[:16], strict=True)]
    expected = ours.values(states)
    assert torch.allclose(torch.tensor(reloaded.values(states)), torch.tensor(expected), atol=1e-5)
    pad = classifier.config.pad_token_id
    width = max(len(s) for s in states)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in states])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in states])
    with torch.no_grad():
        pooled = classifier(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(pooled, torch.tensor(expected), atol=1e-5)

    reward = build_reward("model", model_path=str(folder), batch_size=5)
    saved_tok = AutoTokenizer.from_pretrained(folder)
    words = [tokenizer.decode([t for t in c if t != EOS], skip_special_tokens=True) for c in completions[:16]]
    rendered = [saved_tok(reward.render(t, w), add_special_tokens=False)["input_ids"] for t, w in zip(
        texts[:16], words, strict=True)]
    same = [i for i in range(16) if rendered[i] == states[i]]  # where decoding then encoding round-trips
    assert len(same) >= 4
    scores = reward([texts[i] for i in same], [words[i] for i in same])
    assert torch.allclose(torch.tensor(scores), torch.tensor([expected[i] for i in same]), atol=1e-5)


def test_q_and_policy_heads_round_trip_through_their_files(tiny_path, policy, tmp_path):
    prefixes, candidates = [[1, 504, 30, 77], [1, 9, 22]], [[5, 17, 2], [40, 41, 42]]
    for (kind, backbone), model in all_shapes(tiny_path, policy).items():
        if (kind, backbone) == ("scalar", "separate"):
            continue  # covered above, as a sequence classifier
        randomize_head(model, 5)
        folder = tmp_path / f"{kind}-{backbone}"
        model.save(folder, policy_path=tiny_path)
        loaded = load_value_model(folder, policy=policy if backbone == "policy" else None)
        assert (loaded.kind, loaded.on_policy) == (kind, backbone == "policy")
        assert torch.allclose(torch.tensor(ValueScorer(loaded).next_values(prefixes, candidates)),
                              torch.tensor(ValueScorer(model).next_values(prefixes, candidates)), atol=1e-5)
    q_model = AutoModelForCausalLM.from_pretrained(tmp_path / "q-separate")
    assert not q_model.config.tie_word_embeddings  # the Q-head is its own matrix, not the embedding
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        load_value_model(tmp_path)


def test_value_chat_template_renders_a_finished_reply_as_the_policy_generated_it(tokenizer):
    prompt = [{"role": "user", "content": "Hi"}]
    generated = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    composed = value_chat_template(tokenizer.chat_template)
    finished = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "Yo"}], tokenize=False,
                                             chat_template=composed)
    assert finished == generated + "Yo" + tokenizer.eos_token
    # a conversation that does not end in a reply renders as before
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         chat_template=composed) == generated
    assert value_pad_id(tokenizer, [EOS]) == tokenizer.unk_token_id  # neither EOS nor in any chat text


def test_cdq_on_the_policy_q_head(policy, plain_samples):
    """CD-Q with a neural Q-head: targets are r where the sequence is finished and the base's expectation
    of Q elsewhere (checked at one position by hand); fitting lowers the Bellman loss."""
    from qsteer.training.value import cdq_loss, cdq_targets

    prompts, completions, rewards, _ = plain_samples
    batch = make_batch(prompts[:16], completions[:16], rewards[:16], end_ids=[EOS])  # [16, T, 49152] Q-values
    model = ValueModel.on_policy_model(policy, "q")
    randomize_head(model, 6)
    targets = cdq_targets(model, policy, batch)
    rows = torch.arange(len(batch))
    assert torch.allclose(targets[rows, batch.last], batch.rewards)  # truncated counts as finished
    row, pos = 3, int(batch.first[3])
    with torch.no_grad():
        ids = batch.input_ids[row : row + 1, : pos + 1]
        p = torch.softmax(policy(ids).logits[0, -1].double(), -1)
        q = model.head(policy.base_model(ids).last_hidden_state[0, -1]).double()
    assert float(targets[row, pos]) == pytest.approx(float((p * q).sum()), rel=1e-5)
    before = float(cdq_loss(model, policy, batch).detach())
    fit_value(model, [batch], "cdq", base=policy, epochs=5, lr=1e-2)
    assert float(cdq_loss(model, policy, batch).detach()) < before
