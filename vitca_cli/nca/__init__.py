"""The paper's cellular automaton and nothing else: model, attention, UNetCA, the rollout, masking, corruptions."""
