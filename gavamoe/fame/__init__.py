"""FAME, facet-aware multi-head mixture-of-experts for sequential recommendation, on this
library's cluster-gated router (cluster = head), with the SASRec baseline: data (RecBole .inter
files, planted-facet synthetic data, leave-one-out), model, metrics, training; ``python -m gavamoe.fame``."""
