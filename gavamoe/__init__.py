"""GaVaMoE explainable recommender (model package; arrives with the stage 1 and stage 2 issues)."""
