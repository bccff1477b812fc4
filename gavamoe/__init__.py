"""GaVaMoE explainable recommender: data, stage-1 VAE-GMM, stage-2 MoE explainer, training
(python -m gavamoe.train), generation (gavamoe.generate), evaluation (gavamoe.evaluate), demo."""
