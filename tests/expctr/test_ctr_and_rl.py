"""ExpCTR's CTR model and metrics, the rewards and GRPO, on hand-worked cases."""

import numpy as np
import pytest
import torch

from gavamoe.expctr import ctr, rl
from gavamoe.expctr.train import _within_items


def test_auc_by_hand_with_ties_and_against_pair_counting():
    # pairs (pos, neg): (.9,.1) 1, (.9,.5) 1, (.5,.1) 1, (.5,.5) 1/2 -> 3.5 / 4
    assert ctr.auc([1, 0, 1, 0], [0.9, 0.1, 0.5, 0.5]) == pytest.approx(0.875)
    assert np.isnan(ctr.auc([1, 1], [0.2, 0.3]))
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 300), rng.integers(0, 20, 300).astype(float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    by_pairs = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert ctr.auc(labels, scores) == pytest.approx(by_pairs)


def test_logloss_by_hand():
    assert ctr.logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert ctr.logloss([1], [0.0]) == pytest.approx(-np.log(1e-7))  # clipped, finite


@pytest.mark.parametrize("text_dim", [0, 5], ids=["ids", "ids+text"])
def test_deepfm_is_first_order_plus_pairwise_plus_mlp(text_dim):
    torch.manual_seed(0)
    model = ctr.DeepFM(7, 9, ctr.CtrConfig(dim=4, hidden=8), text_dim=text_dim).double().eval()
    users, items = torch.tensor([0, 6, 3]), torch.tensor([8, 1, 1])
    text = torch.randn(3, text_dim, dtype=torch.float64) if text_dim else None
    fields = [model.user(users), model.item(items)] + ([model.text(text)] if text_dim else [])
    pairwise = sum((fields[a] * fields[b]).sum(1) for a in range(len(fields)) for b in range(a + 1, len(fields)))
    expected = (model.bias + model.user_bias(users)[:, 0] + model.item_bias(items)[:, 0] + pairwise
                + model.mlp(torch.cat(fields, 1))[:, 0])
    torch.testing.assert_close(model(users, items, text), expected)
    model.train()  # the MLP's input dropout acts in training only
    assert not torch.allclose(model(users, items, text), expected)
    model.eval()
    with pytest.raises(ValueError, match="text must be given"):
        model(users, items, None if text_dim else torch.zeros(3, 2))


def test_fit_learns_a_user_item_pattern():
    torch.manual_seed(0)
    users, items = torch.arange(40).repeat_interleave(10), torch.arange(10).repeat(40)
    labels = ((users % 2) == (items % 2)).long()
    config = ctr.CtrConfig(epochs=40, batch_size=64, lr=1e-2)
    model = ctr.DeepFM(40, 10, config)
    result = ctr.fit(model, users, items, labels, config)
    assert result.losses[-1] < 0.2 < result.losses[0]
    assert ctr.auc(labels.numpy(), ctr.predict(model, users, items).numpy()) > 0.99


def _held_out_logloss(model, users, items, labels, config, seed):
    """LogLoss on the pairs fit holds out: the first round(validation * n) of its seeded permutation."""
    held = torch.randperm(len(users), generator=torch.Generator().manual_seed(seed))[:round(config.validation
                                                                                          * len(users))]
    return ctr.logloss(labels[held].numpy(), ctr.predict(model, users[held], items[held]).numpy())


def test_fit_stops_early_on_noise_and_keeps_the_best_epoch():
    # labels independent of user and item: the held-out LogLoss can only get worse once the
    # model memorises, so training stops `patience` epochs after its best and restores that epoch
    torch.manual_seed(0)
    users, items = torch.randint(0, 50, (2000,)), torch.randint(0, 30, (2000,))
    labels = torch.randint(0, 2, (2000,))
    config = ctr.CtrConfig(epochs=200, lr=3e-2, patience=3, validation=0.2)
    model = ctr.DeepFM(50, 30, config)
    result = ctr.fit(model, users, items, labels, config, seed=4)
    assert result.epochs == result.best_epoch + 3 < 200
    assert len(result.validation_logloss) == result.epochs
    best = min(result.validation_logloss)
    assert result.validation_logloss[result.best_epoch - 1] == best
    assert best < result.validation_logloss[-1]
    assert _held_out_logloss(model, users, items, labels, config, 4) == pytest.approx(best, abs=1e-6)
    assert not model.training


def test_fit_without_patience_trains_every_epoch_on_every_pair():
    torch.manual_seed(0)
    users, items, labels = torch.randint(0, 9, (100,)), torch.randint(0, 7, (100,)), torch.randint(0, 2, (100,))
    config = ctr.CtrConfig(epochs=3, batch_size=32, patience=0)
    result = ctr.fit(ctr.DeepFM(9, 7, config), users, items, labels, config)
    assert (result.epochs, result.best_epoch, result.validation_logloss) == (3, 3, [])
    assert len(result.losses) == 3 * 4  # ceil(100 / 32) steps per epoch, nothing held out


@pytest.mark.parametrize("kwargs, message", [
    ({"patience": -1}, "--ctr-patience"), ({"validation": 1.0}, "--ctr-validation"),
    ({"validation": 0.0}, "--ctr-validation"), ({"dropout": 1.0}, "--ctr-dropout")])
def test_ctr_config_rejects_bad_early_stopping(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ctr.CtrConfig(**kwargs)


def test_fit_rejects_a_validation_share_that_holds_out_nothing():
    config = ctr.CtrConfig(validation=0.1)
    users = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"--ctr-validation 0\.1 of 3 training pairs"):
        ctr.fit(ctr.DeepFM(3, 3, config), users, users, torch.tensor([0, 1, 0]), config)


def test_rewards_by_hand():
    p, labels = torch.tensor([0.9, 0.9, 0.2, 0.5]), torch.tensor([1, 0, 0, 1])
    formed = torch.tensor([True, True, True, False])
    torch.testing.assert_close(rl.label_reward(p, labels), torch.tensor([0.9, 0.1, 0.8, 0.5]))
    torch.testing.assert_close(rl.lc_reward(p, labels, formed), torch.tensor([0.9, 0.1, 0.8, 0.0]))
    torch.testing.assert_close(rl.ic_reward(p, labels, formed, "logprob"),
                               torch.tensor([0.9, 0.1, 0.8, 1e-6]).log())
    with pytest.raises(ValueError, match="form"):
        rl.label_reward(p, labels, "margin")


def test_group_advantages_by_hand():
    a = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3]), 4)
    std = np.sqrt(0.1875)  # of (1, 0, 0, 0): mean 0.25
    torch.testing.assert_close(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    torch.testing.assert_close(a[4:], torch.zeros(4))  # equal rewards: nothing to learn
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_advantages(torch.zeros(4), 3)


def test_grpo_loss_value_and_gradient_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 0.0], [-0.5, -0.5, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, kl = rl.grpo_loss(logp, ref, mask, adv, beta=0.1)
    kl_01 = np.exp(1.0) - 1.0 - 1  # token (0, 1): ref - logp = 1
    sample0 = (-2 * -1.0 + -2 * -2.0 + 0.1 * kl_01) / 2
    sample1 = 1.0 * -0.5  # every token: -A * logp with A = -1, no KL
    assert float(loss.detach()) == pytest.approx((sample0 + sample1) / 2)
    assert float(kl) == pytest.approx(kl_01 / 2 / 2)
    loss.backward()
    # d/dlogp: -A / (2 * len) plus beta * (1 - exp(ref - logp)) / (2 * len) on token (0, 1); masked token 0
    expected = torch.tensor([[-2 / 4, (-2 + 0.1 * (1 - np.exp(1.0))) / 4, 0.0], [1 / 6, 1 / 6, 1 / 6]],
                            dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_the_item_control_moves_explanations_only_among_pairs_of_one_item():
    items = np.random.default_rng(0).integers(0, 7, 200)
    order = _within_items(items, np.random.default_rng(1))
    assert sorted(order) == list(range(200))  # a permutation
    assert (items[order] == items).all()  # each explanation stays on its item
    assert (order != np.arange(200)).mean() > 0.8  # and mostly leaves its pair
    alone = np.array([3, 5, 3, 9])
    assert _within_items(alone, np.random.default_rng(2))[[1, 3]].tolist() == [1, 3]  # one pair of its item: stays
