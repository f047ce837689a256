"""Plain nn.Modules: the stage-1 sVQ model family (svq/) and the stage-2 GPT (gpt.py)."""
