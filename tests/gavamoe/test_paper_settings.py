"""The paper's settings: --preset paper, the prompt of Fig. 2, the KL warm-up and the scaled ELBO."""

from __future__ import annotations

import pytest
import torch

from gavamoe.data import text as text_data
from gavamoe.models import VaeGmm, VaeGmmConfig
from gavamoe.stage1 import Stage1Config, beta_at
from gavamoe.train import PRESETS, parse_args, stage1_config, stage2_config


def test_preset_paper_sets_the_papers_values_and_flags_win(tmp_path):
    args = parse_args(["--out", str(tmp_path), "--preset", "paper"])
    s1, s2 = stage1_config(args), stage2_config(args)
    assert (s1.pretrain_batch_size, s1.pretrain_lr, s1.pretrain_epochs) == (2048, 1.5e-4, 50)
    assert (s1.batch_size, s1.lr, s1.epochs, s1.lr_step_epochs, s1.lr_step_gamma) == (4096, 1e-5, 30, 10, 0.5)
    assert (s1.beta_start, s1.beta_step, s1.beta_step_epochs, s1.beta) == (0.01, 0.005, 5, 0.1)
    assert s1.recon_scale == 2 * s1.embed_dim == 1536
    assert (s1.user_code, s1.encoder_dim, s1.context_ratings) == ("embedding", None, 0)
    assert (s2.batch_size, s2.grad_accum, s2.lr, s2.epochs, s2.clip) == (1, 8, 3e-5, 3, 0.3)
    assert (s2.explainer.lora_rank, s2.max_explanation_tokens, s2.preset) == (8, 30, "paper")
    assert set(PRESETS["paper"]) <= set(vars(args))  # every preset value is a flag
    mine = parse_args(["--out", str(tmp_path), "--preset", "paper", "--stage2-lr", "1e-4", "--epochs", "2"])
    assert stage2_config(mine).lr == 1e-4 and stage1_config(mine).epochs == 2 and stage1_config(mine).lr == 1e-5
    default = parse_args(["--out", str(tmp_path)])
    assert stage2_config(default).preset == "default" and stage1_config(default).beta_start is None


def test_kl_warm_up_follows_the_released_code():
    config = Stage1Config(device="cpu", beta=0.1, beta_start=0.01, beta_step=0.005, beta_step_epochs=5)
    # +0.005 every 5 epochs from 0.01, capped at 0.1
    assert [round(beta_at(config, e), 6) for e in (0, 4, 5, 9, 10, 29)] == [0.01, 0.01, 0.015, 0.015, 0.02, 0.035]
    assert beta_at(Stage1Config(device="cpu", beta=0.1, beta_start=0.09, beta_step=0.05), 10) == 0.1
    assert beta_at(Stage1Config(device="cpu", beta=0.02), 7) == 0.02  # no warm-up


def test_elbo_scales_the_reconstruction_term():
    torch.manual_seed(0)
    vae = VaeGmm(VaeGmmConfig(10, 8, 3, 16, 4, num_heads=2)).eval()
    users, items, ratings = torch.arange(6), torch.arange(6), torch.tensor([1.0, 2, 3, 4, 5, 3])
    torch.manual_seed(1)
    plain = vae.elbo_loss(users, items, ratings, beta=0.3)
    torch.manual_seed(1)
    scaled = vae.elbo_loss(users, items, ratings, beta=0.3, recon_scale=7.0)
    torch.testing.assert_close(scaled["loss"], 7.0 * plain["reconstruction"] + 0.3 * plain["kl"])


def test_prompt_has_the_papers_system_sentence_and_sentiment_from_the_rating():
    record = {"template": ("pool", "nice", "the pool was nice", 1), "rating": 2.0}
    by_rating = text_data.prompt_text(record, None)
    assert by_rating.startswith("You are a professional explainer, Your assignment involves providing users with "
                                "a detailed explanation regarding a specific item.")
    assert "has a negative experience" in by_rating  # rating 2 < 3, whatever the template says
    assert "has a positive experience" in text_data.prompt_text(record, None, sentiment="template")
    assert text_data.positive({**record, "rating": 3.0})  # the released code: positive from 3 up
    with pytest.raises(ValueError, match="sentiment must be one of"):
        text_data.positive(record, "stars")
