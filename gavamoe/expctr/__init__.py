"""ExpCTR (Yu, Zhang, Chen, WSDM 2025, arXiv 2412.02588): LLM explanations inside click-through-rate
prediction, aligned by reinforcement learning.

Where to look: ``data`` (MovieLens-style files, planted-genre synthetic data, the time split),
``prompts`` (the prompt, the explanation's form, the question), ``llm`` (the explanation LLM:
warm-up, sampling, its own click prediction), ``ctr`` (DeepFM with an optional explanation field;
AUC, LogLoss), ``encoder`` (the sentence encoder), ``rl`` (GRPO and the LC/IC rewards),
``train`` (the three stages for R rounds and the evaluation), ``__main__`` (the CLI).
"""
